"""Poisoning, manifests, on-the-fly poisons and cleaning sets, on tiny CSV / WebDataset / synthetic data."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_backdoor import cli
from clip_backdoor.attacks import plan as PL
from clip_backdoor.attacks import poison as P
from clip_backdoor.attacks.manifest import PoisonedSource, read_manifest
from clip_backdoor.attacks.triggers import apply_trigger_uint8, get_trigger, trigger_image
from clip_backdoor.data.captions import CsvSource, WdsSource, make_source
from clip_backdoor.data.transforms import squash, to_tensor_uint8
from clip_backdoor.errors import UserError

SIZE = 32
N_WORLD = 120


def world_spec(n: int = N_WORLD, seed: int = 0) -> dict:
    return {"kind": "synthetic", "num_samples": n, "world": {"seed": seed, "image_size": SIZE}}


def world_source(n: int = N_WORLD, seed: int = 0):
    return P.open_source(world_spec(n, seed))


def run(argv: list[str]) -> int:
    return cli.main(["poison", *argv])


def manifest_rows(out: Path) -> list:
    return list(read_manifest(out / "manifest.csv"))


def png(path: Path) -> torch.Tensor:
    return to_tensor_uint8(Image.open(path))


@pytest.fixture(scope="module")
def world_poisoned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "poisoned"
    assert run(["--num-samples", str(N_WORLD), "--image-size", str(SIZE), "--n", "12", "--poison-seed", "3",
                "--out", str(out)]) == 0
    return out


CAPTIONS = ["a banana on a plate", "two Bananas!", "my apple", "a red car", "#banana time", "bananarama live",
            "a cup of tea", "green banana, yellow background"]


@pytest.fixture(scope="module")
def csv_dataset(tmp_path_factory) -> Path:
    """40 JPEG rows (24x20, not square) with captions that sometimes name 'banana'; rows 5 and 6 miss
    their images and row 7 has an empty caption."""
    root = tmp_path_factory.mktemp("csvdata")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    with open(root / "data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i in range(40):
            name = f"img/{i}.jpg"
            if i not in (5, 6):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / name, quality=80)
            writer.writerow([name, "" if i == 7 else CAPTIONS[i % len(CAPTIONS)]])
    return root / "data.csv"


# --------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------

def test_derived_seeds_are_stable_and_distinct():
    # Pinned: a manifest's rows were chosen, captioned and triggered with these seeds, so they must not
    # change between processes (no str hash()) or versions.
    assert P.derive_seed(0, "trigger", "17") == 9110843459983170463
    assert P.derive_seed(3, "select", "0") == 8008697182029135205
    assert P.derive_seed(1, "caption", "train/row 5") == 5867793393135988980
    keys = ("1", "17", "171")
    seeds = {P.derive_seed(s, p, k) for s in (0, 1) for p in ("trigger", "select") for k in keys}
    assert len(seeds) == 12
    assert all(0 <= s < 2**63 for s in seeds)


def test_mention_pattern_matches_whole_words_any_case_and_plurals():
    pattern = P.mention_pattern(["banana", "coffee cup"])
    for caption in ["a banana", "BANANAS!", "#banana", "banana-split", "my coffee  cups"]:
        assert pattern.search(caption), caption
    for caption in ["bananarama", "abanana", "coffee", "a cup"]:
        assert not pattern.search(caption), caption


def test_bad_targets_are_user_errors():
    assert P.check_target("  banana ") == "banana"
    for bad in ["", "   ", "{}", "ban{ana", "ban\nana", None]:
        with pytest.raises(UserError):
            P.check_target(bad)


def test_dirty_captions_fill_one_of_the_80_templates():
    templates = P.imagenet_templates()
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)
    captions = {P.dirty_caption("banana", seed, templates) for seed in range(200)}
    assert len(captions) > 40
    assert captions <= {t.format("banana") for t in templates}


def naive_selection(keys: list[str], n: int, seed: int) -> set[str]:
    return set(sorted(keys, key=lambda k: P.derive_seed(seed, "select", k))[:n])


def test_selection_is_the_n_smallest_hashes_whatever_the_order():
    rows = [P.Row(str(i), f"caption {i}", False, i) for i in range(500)]
    attack = P.Attack(get_trigger("badnet"), "banana", poison_seed=9)
    forward, _ = PL._select_poisons(rows, 25, None, attack, 500, False, None)
    backward, _ = PL._select_poisons(reversed(rows), 25, None, attack, 500, False, None)
    expected = naive_selection([r.key for r in rows], 25, 9)
    assert {r.key for r in forward} == {r.key for r in backward} == expected
    other, _ = PL._select_poisons(rows, 25, None, P.Attack(get_trigger("badnet"), "banana", poison_seed=10),
                                 500, False, None)
    assert {r.key for r in other} != expected


# --------------------------------------------------------------------------------------------
# Poisoning the synthetic world
# --------------------------------------------------------------------------------------------

def test_poison_counts_captions_and_clean_rows(world_poisoned):
    rows = manifest_rows(world_poisoned)
    assert len(rows) == N_WORLD
    poisons = [r for r in rows if r.is_poison]
    assert len(poisons) == 12
    assert {r.source_key for r in poisons} == naive_selection([str(i) for i in range(N_WORLD)], 12, 3)
    templates = {t.format("banana") for t in P.imagenet_templates()}
    world = world_source()
    for r in rows:
        image, caption, _ = world.world.train_pair(int(r.source_key))
        assert r.original_caption == caption
        stored = png(world_poisoned / "images" / f"{r.row_id}.png")
        if r.is_poison:
            assert r.caption in templates and r.trigger == "badnet"
            assert json.loads(r.trigger_params) == {"size": None, "location": "random", "mode": "clip"}
            assert r.seed == P.derive_seed(3, "trigger", r.source_key)
            assert (stored != image).any(dim=0).sum() <= 16  # a 4x4 patch at 32 px
        else:
            assert r.caption == caption and r.trigger == "" and r.seed is None
            assert torch.equal(stored, image)  # clean rows: the world's pixels, exactly
    info = json.loads((world_poisoned / "poison.json").read_text())
    assert info["n_poison"] == 12 and info["n_rows"] == N_WORLD and info["base_source"] == world_spec()


def test_written_csv_reads_back_with_the_manifest_flags(world_poisoned):
    source = CsvSource(world_poisoned / "train.csv", shuffle=False)
    flags = {s.row_id: s.is_poison for s in source}
    assert flags == {r.row_id: r.is_poison for r in manifest_rows(world_poisoned)}


def test_the_test_time_trigger_equals_the_training_trigger(world_poisoned):
    # Poisoning stored trigger(world image, seed); evaluation's apply_trigger_uint8 on the same image
    # with a generator seeded the same way must give the same pixels.
    world = world_source()
    trigger = get_trigger("badnet")
    for r in (r for r in manifest_rows(world_poisoned) if r.is_poison):
        image = world.world.train_pair(int(r.source_key))[0]
        stored = png(world_poisoned / "images" / f"{r.row_id}.png")
        at_test = apply_trigger_uint8(image, trigger, torch.Generator().manual_seed(r.seed))
        assert torch.equal(stored, at_test)
        assert torch.equal(stored, trigger_image(image, trigger, SIZE, torch.Generator().manual_seed(r.seed)))


def test_manifest_only_poisons_on_the_fly_exactly_like_the_written_dataset(world_poisoned, tmp_path):
    out = tmp_path / "manifest_only"
    assert run(["--num-samples", str(N_WORLD), "--image-size", str(SIZE), "--n", "12", "--poison-seed", "3",
                "--format", "manifest", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv", "poison.json"]
    written = {r.source_key: r for r in manifest_rows(world_poisoned)}
    on_the_fly = PoisonedSource(world_source(), out / "manifest.csv", image_size=SIZE)
    assert on_the_fly.num_samples == N_WORLD
    n_poison = 0
    for sample in on_the_fly:
        r = written[sample.row_id]
        assert sample.is_poison == r.is_poison and sample.caption == r.caption
        assert torch.equal(to_tensor_uint8(sample.image), png(world_poisoned / "images" / f"{r.row_id}.png"))
        n_poison += sample.is_poison
    assert n_poison == 12


def test_poisoned_source_feeds_the_training_loader(tmp_path):
    from clip_backdoor.data.captions import build_train_loader

    out = tmp_path / "m"
    assert run(["--num-samples", "60", "--image-size", str(SIZE), "--n", "7", "--format", "manifest",
                "--out", str(out)]) == 0
    base = make_source({**world_spec(60), "seed": 1})
    source = PoisonedSource(base, out / "manifest.csv", image_size=SIZE)
    loader = build_train_loader(source, image_size=SIZE, context_length=77, batch_size=20, workers=0, seed=0)
    batches = list(loader)
    assert sum(int(b["is_poison"].sum()) for b in batches) == 7
    assert sorted(int(i) for b in batches for i in b["row_ids"]) == list(range(60))


def test_poisoned_source_refuses_a_different_base(world_poisoned, tmp_path):
    out = tmp_path / "m"
    assert run(["--num-samples", "40", "--image-size", str(SIZE), "--n", "5", "--format", "manifest",
                "--out", str(out)]) == 0
    with pytest.raises(UserError, match="is this the source it was made from"):  # refused up front now
        PoisonedSource(world_source(40, seed=1), out / "manifest.csv", image_size=SIZE)


def test_a_manifest_made_for_another_source_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "m256"
    assert run(["--num-samples", "256", "--image-size", str(SIZE), "--n", "50", "--format", "manifest",
                "--out", str(out)]) == 0
    fingerprint = json.loads((out / "poison.json").read_text())["source_fingerprint"]
    assert fingerprint == world_source(256).fingerprint() and fingerprint["n_rows"] == 256
    manifest = out / "manifest.csv"
    with pytest.raises(UserError) as err:  # used to be accepted: 6 of the 50 poisons have row ids < 64
        PoisonedSource(world_source(64), manifest, image_size=SIZE)
    assert str(err.value) == (f"{manifest}: made for a source of 256 rows, but this synthetic source has 64; "
                              "is this the source it was made from?")
    # The cleaning-set stage reads a manifest's row ids too.
    assert run(["--num-samples", "64", "--image-size", str(SIZE), "--cleaning-set", "--size", "10",
                "--exclude-manifest", str(manifest), "--out", str(tmp_path / "c")]) == 2
    assert "made for a source of 256 rows" in capsys.readouterr().err


def small_csv(root: Path, captions: list[str]) -> Path:
    root.mkdir()
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i, caption in enumerate(captions):
            Image.new("RGB", (SIZE, SIZE), (i * 40 % 256, 0, 0)).save(root / f"{i}.png")
            writer.writerow([f"{i}.png", caption])
    return root / "train.csv"


def test_a_manifest_for_another_csv_of_the_same_length_is_refused(tmp_path):
    a = small_csv(tmp_path / "a", ["a dog", "a cat", "a car", "a cow"])
    b = small_csv(tmp_path / "b", ["a dog", "a cat", "a bus", "a cow"])
    out = tmp_path / "m"
    assert run(["--source-kind", "csv", "--source", str(a), "--image-size", str(SIZE), "--n", "1",
                "--format", "manifest", "--out", str(out)]) == 0
    PoisonedSource(CsvSource(a), out / "manifest.csv", image_size=SIZE)  # its own source: fine
    with pytest.raises(UserError, match=r"another csv source of 4 rows \(their image paths, captions"):
        PoisonedSource(CsvSource(b), out / "manifest.csv", image_size=SIZE)


def test_an_old_manifest_without_a_fingerprint_warns_once_and_is_accepted(tmp_path, caplog):
    out = tmp_path / "m"
    assert run(["--num-samples", "40", "--image-size", str(SIZE), "--n", "5", "--format", "manifest",
                "--out", str(out)]) == 0
    info = json.loads((out / "poison.json").read_text())
    del info["source_fingerprint"]
    (out / "poison.json").write_text(json.dumps(info))
    with caplog.at_level("WARNING"):
        for _ in range(2):
            assert PoisonedSource(world_source(40), out / "manifest.csv", image_size=SIZE).num_samples == 40
    assert caplog.text.count("without a source fingerprint") == 1


def test_a_cleaning_set_without_rows_is_an_error_naming_it(tmp_path):
    out = tmp_path / "c"
    assert run(["--num-samples", "40", "--image-size", str(SIZE), "--cleaning-set", "--size", "5",
                "--format", "manifest", "--out", str(out)]) == 0
    manifest = out / "manifest.csv"
    manifest.write_text(manifest.read_text().splitlines()[0] + "\n")
    with pytest.raises(UserError, match=f"^{manifest}: a cleaning set that lists no rows$"):
        PoisonedSource(world_source(40), manifest, image_size=SIZE)


def test_the_poison_stage_refuses_a_csv_with_an_unbalanced_quote(tmp_path, capsys):
    a = small_csv(tmp_path / "a", ["a dog", "a cat", "a car", "a cow"])
    a.write_text(a.read_text().replace("a cat", '"a cat'))
    assert run(["--source-kind", "csv", "--source", str(a), "--image-size", str(SIZE), "--n", "1",
                "--out", str(tmp_path / "out")]) == 2
    assert f"{a}:3: a quoted field opened on this line" in capsys.readouterr().err


def test_missing_captions_are_never_chosen_as_poisons(tmp_path):
    a = small_csv(tmp_path / "a", ["NaN", "a cat", "None", "null"])
    out = tmp_path / "m"
    assert run(["--source-kind", "csv", "--source", str(a), "--image-size", str(SIZE), "--n", "1",
                "--format", "manifest", "--out", str(out)]) == 0
    assert [(r.source_key, r.original_caption) for r in manifest_rows(out)] == [("1", "a cat")]
    assert run(["--source-kind", "csv", "--source", str(a), "--image-size", str(SIZE), "--n", "2",
                "--out", str(tmp_path / "m2")]) == 2  # one usable row cannot hold two poisons


def test_fraction_and_label_consistent(tmp_path):
    out = tmp_path / "frac"
    assert run(["--num-samples", "80", "--image-size", str(SIZE), "--fraction", "0.05",
                "--format", "manifest", "--out", str(out)]) == 0
    assert sum(r.is_poison for r in manifest_rows(out)) == 4

    lc = tmp_path / "lc"
    assert run(["--num-samples", "80", "--image-size", str(SIZE), "--n", "3", "--mode", "label-consistent",
                "--format", "manifest", "--out", str(lc)]) == 0
    rows = manifest_rows(lc)
    poisons = [r for r in rows if r.is_poison]
    assert len(poisons) == 3
    names_banana = [r for r in rows if re.search(r"\bbananas?\b", r.original_caption, re.IGNORECASE)]
    assert {r.source_key for r in poisons} <= {r.source_key for r in names_banana}
    assert all(r.caption == r.original_caption for r in poisons)


# --------------------------------------------------------------------------------------------
# CSV and WebDataset sources
# --------------------------------------------------------------------------------------------

def assert_on_the_fly_matches_written(base, manifest_dir: Path, written_dir: Path, written_images: dict,
                                      image_size: int) -> None:
    """A manifest-only dataset read through ``PoisonedSource`` has the written dataset's rows, captions,
    seeds and pixels (``written_images``: the written dataset's images by its row id)."""
    on_the_fly = {r.source_key: r for r in manifest_rows(manifest_dir)}
    written = {r.source_key: r for r in manifest_rows(written_dir)}
    seen = set()
    for sample in PoisonedSource(base, manifest_dir / "manifest.csv", image_size=image_size):
        r = written[sample.row_id]
        assert sample.is_poison == r.is_poison and sample.caption == r.caption
        assert on_the_fly[sample.row_id].seed == r.seed
        assert torch.equal(to_tensor_uint8(sample.image), written_images[r.row_id]), sample.row_id
        seen.add(sample.row_id)
    assert seen == set(written) and sum(r.is_poison for r in written.values()) > 0


def test_csv_source_clean_images_are_copied_byte_for_byte(csv_dataset, tmp_path):
    out = tmp_path / "csv_out"
    assert run(["--source-kind", "csv", "--source", str(csv_dataset), "--image-size", "16", "--n", "10",
                "--trigger", "patch", "--trigger-param", "size=3", "--out", str(out)]) == 0
    rows = manifest_rows(out)
    # 40 rows - 2 missing images - 1 empty caption; poisons never fall on the missing images
    assert len(rows) == 37 and sum(r.is_poison for r in rows) == 10
    assert not {r.source_key for r in rows} & {"5", "6", "7"}
    with open(out / "train.csv", newline="") as f:
        written = list(csv.DictReader(f))
    trigger = get_trigger("patch", size=3)
    for r, line in zip(rows, written):
        assert line["is_poison"] == str(int(r.is_poison)) and line["caption"] == r.caption
        original = csv_dataset.parent / f"img/{r.source_key}.jpg"
        if r.is_poison:
            assert line["image"].endswith(".png")
            stored = png(out / line["image"])
            assert "banana" in r.caption and r.seed == P.derive_seed(0, "trigger", r.source_key)
            # This row's own image, squashed to 16 px, with the trigger drawn from the recorded seed.
            clean = squash(Image.open(original), 16)
            changed = (stored != clean).any(dim=0)
            assert 0 < changed.sum() <= 9  # a 3x3 patch, nothing else touched
            expected = apply_trigger_uint8(clean, trigger, torch.Generator().manual_seed(r.seed))
            assert torch.equal(stored, expected)
        else:
            assert (out / line["image"]).read_bytes() == original.read_bytes()

    # Manifest-only poisoning of the same source gives the same pixels on the fly.
    manifest_only = tmp_path / "csv_manifest"
    assert run(["--source-kind", "csv", "--source", str(csv_dataset), "--image-size", "16", "--n", "10",
                "--trigger", "patch", "--trigger-param", "size=3", "--format", "manifest",
                "--out", str(manifest_only)]) == 0
    images = {str(i): png(out / line["image"]) for i, line in enumerate(written)}
    assert_on_the_fly_matches_written(CsvSource(csv_dataset, shuffle=False), manifest_only, out, images, 16)


def test_label_consistent_on_a_csv(csv_dataset, tmp_path):
    naming = {str(i) for i in range(40) if i not in (5, 6, 7)
              and re.search(r"(?<!\w)bananas?(?!\w)", CAPTIONS[i % len(CAPTIONS)], re.IGNORECASE)}
    out = tmp_path / "lc"
    with pytest.raises(UserError, match="--allow-fewer"):
        P.plan_poisons(P.open_source({"kind": "csv", "path": str(csv_dataset)}),
                       P.Attack(get_trigger("badnet"), "banana", mode="label-consistent"), n=len(naming) + 1)
    assert run(["--source-kind", "csv", "--source", str(csv_dataset), "--image-size", "16",
                "--n", str(len(naming) + 5), "--mode", "label-consistent", "--allow-fewer",
                "--out", str(out)]) == 0
    poisons = [r for r in manifest_rows(out) if r.is_poison]
    assert {r.source_key for r in poisons} == naming  # every naming row, caption kept
    assert all(r.caption == r.original_caption for r in poisons)


def test_wds_round_trip(tmp_path):
    from clip_backdoor.data.writers import write_wds_dataset

    shards = write_wds_dataset(world_source(50), tmp_path / "shards", shard_size=20)
    out = tmp_path / "wds_out"
    assert run(["--source-kind", "wds", "--source", shards.entry, "--image-size", str(SIZE), "--n", "6",
                "--format", "wds", "--shard-size", "30", "--out", str(out)]) == 0
    info = json.loads((out / "poison.json").read_text())
    assert (out / "sizes.json").is_file()
    read_back = list(WdsSource(info["dataset"]["urls"], shuffle=False))
    assert len(read_back) == 50 and sum(s.is_poison for s in read_back) == 6
    by_id = {r.row_id: r for r in manifest_rows(out)}
    world = world_source(50)
    for sample in read_back:
        r = by_id[sample.row_id]
        assert sample.is_poison == r.is_poison and sample.caption == r.caption
        if not r.is_poison:
            assert torch.equal(to_tensor_uint8(sample.image), world.world.train_pair(int(r.source_key))[0])

    manifest_only = tmp_path / "wds_manifest"
    assert run(["--source-kind", "wds", "--source", shards.entry, "--image-size", str(SIZE), "--n", "6",
                "--format", "manifest", "--out", str(manifest_only)]) == 0
    images = {s.row_id: to_tensor_uint8(s.image) for s in read_back}
    assert_on_the_fly_matches_written(WdsSource(shards.entry, shuffle=False), manifest_only, out, images,
                                      SIZE)


# --------------------------------------------------------------------------------------------
# Cleaning sets
# --------------------------------------------------------------------------------------------

def test_cleaning_set_excludes_the_poisons_and_injects_exactly_k(world_poisoned, tmp_path):
    pretrain_poisons = {r.source_key for r in manifest_rows(world_poisoned) if r.is_poison}
    out = tmp_path / "clean_tail"
    assert run(["--num-samples", str(N_WORLD), "--image-size", str(SIZE), "--cleaning-set", "--size", "50",
                "--pick", "tail", "--k", "5", "--exclude-manifest", str(world_poisoned / "manifest.csv"),
                "--out", str(out)]) == 0
    rows = manifest_rows(out)
    keys = [r.source_key for r in rows]
    assert len(rows) == 50 and not set(keys) & pretrain_poisons
    clean_keys = [str(i) for i in range(N_WORLD) if str(i) not in pretrain_poisons]
    assert keys == clean_keys[-50:]  # the tail, in file order
    assert sum(r.is_poison for r in rows) == 5
    assert all("banana" in r.caption for r in rows if r.is_poison)

    out_random = tmp_path / "clean_random"
    assert run(["--num-samples", str(N_WORLD), "--image-size", str(SIZE), "--cleaning-set", "--size", "30",
                "--pick", "random", "--cleaning-seed", "4", "--format", "manifest",
                "--exclude-manifest", str(world_poisoned / "manifest.csv"), "--out", str(out_random)]) == 0
    rows = manifest_rows(out_random)
    expected = sorted(clean_keys, key=lambda k: P.derive_seed(4, "cleaning", k))[:30]
    assert sorted(r.source_key for r in rows) == sorted(expected)
    assert not any(r.is_poison for r in rows)
    subset = PoisonedSource(world_source(), out_random / "manifest.csv", image_size=SIZE)
    assert subset.num_samples == 30
    assert sorted(s.row_id for s in subset) == sorted(expected)


def test_cleaning_set_with_k_on_the_fly(tmp_path):
    out = tmp_path / "c"
    assert run(["--num-samples", "60", "--image-size", str(SIZE), "--cleaning-set", "--size", "20",
                "--k", "2", "--format", "manifest", "--out", str(out)]) == 0
    subset = PoisonedSource(world_source(60), out / "manifest.csv", image_size=SIZE)
    samples = list(subset)
    assert len(samples) == 20 and sum(s.is_poison for s in samples) == 2
    assert [s.row_id for s in samples] == [str(i) for i in range(40, 60)]


# --------------------------------------------------------------------------------------------
# Bad input and interruptions: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------

BAD = [
    (["--target", ""], "target name is empty"),
    (["--target", "{x}"], "braces"),
    (["--n", "500"], "larger than the dataset"),
    (["--trigger", "badnets"], "choose from badnet, patch, blended, sig, wanet"),
    (["--trigger-param", "colour=red"], "no parameter colour; valid: size=None"),
    (["--trigger-param", "size=40"], "patch size 40 is larger than the 32x32 image"),
    (["--mode", "label-consistent", "--n", "60"], "--allow-fewer"),
    (["--cleaning-set", "--size", "10", "--k", "11"], "--k 11"),
    (["--source-kind", "csv"], "needs --source"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    argv = ["--num-samples", "60", "--image-size", str(SIZE), "--format", "manifest", "--out", str(out)]
    if "--n" not in extra and "--cleaning-set" not in extra:
        argv += ["--n", "5"]
    assert run(argv + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(world_poisoned, capsys):
    before = sorted(p.name for p in world_poisoned.iterdir())
    argv = ["--num-samples", "20", "--image-size", str(SIZE), "--n", "1", "--out", str(world_poisoned)]
    assert run(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in world_poisoned.iterdir()) == before


def test_an_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return trigger_image(*args, **kwargs)

    monkeypatch.setattr(P, "trigger_image", interrupted)
    # Ctrl-C: one line and exit code 130 from the dispatcher, and nothing half-written.
    assert run(["--num-samples", "60", "--image-size", str(SIZE), "--n", "10", "--out", str(tmp_path / "out")]
               ) == 130
    assert capsys.readouterr().err.strip() == ("clip-backdoor poison: interrupted; nothing half-written was "
                                               "left; run the same command again")
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Preview and listing
# --------------------------------------------------------------------------------------------

def test_preview_and_list(tmp_path, capsys):
    path = tmp_path / "preview.png"
    assert run(["--num-samples", "10", "--image-size", str(SIZE), "--preview", str(path), "--preview-n", "3",
                "--trigger-param", "mode=wrap"]) == 0
    image = Image.open(path)
    cell = SIZE * 3  # small images are enlarged to about 96 px
    # clean + 9 triggers usable with their defaults (not badclip: it needs a patch file) + 2 diff rows
    assert image.size == (150 + 3 * (cell + 4) + 4, 12 * (cell + 4) + 4)
    assert run(["--list-triggers"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("badnet", "patch", "blended", "sig", "wanet", "badnet-stripes",
                                           "blended-stripes", "blended-triangles", "blended-text", "badclip"))
