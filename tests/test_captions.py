"""Caption sources, the training loader and the dataset writers, on tiny datasets built here.

Shards are written with the standard library's ``tarfile`` (not our writer), so reading is checked
against an independent layout; images carry known pixels so decoding is checked byte for byte.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_backdoor.data import captions
from clip_backdoor.data.captions import CsvSource, MappedSource, Sample, SyntheticSource, WdsSource
from clip_backdoor.data.loader import build_train_loader
from clip_backdoor.data.transforms import preprocess, to_tensor_uint8
from clip_backdoor.data.writers import write_csv_dataset, write_wds_dataset
from clip_backdoor.errors import UserError
from clip_backdoor.tokenizer import tokenize

SIZE = 8  # pixels: small enough that nothing here is slow


def pixels(i: int, size: int = SIZE) -> torch.Tensor:
    """A distinct uint8 [3,size,size] image per index."""
    rng = np.random.default_rng(1000 + i)
    return torch.from_numpy(rng.integers(0, 256, (3, size, size), dtype=np.uint8))


def png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class FakeWorld:
    """The World's interface with known answers: pair i has pixels(i) and caption 'caption i'."""

    def train_pair(self, index: int):
        return pixels(index), f"caption {index}", index % 3


def write_shard(path: Path, keys: list[str], poison: set[str] = frozenset()) -> None:
    with tarfile.open(path, "w") as tar:
        for key in keys:
            files = {f"{key}.png": png(pixels(int(key))), f"{key}.txt": f"caption {key}".encode(),
                     f"{key}.json": json.dumps({"is_poison": key in poison}).encode()}
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """Two shards, 6 + 5 samples, keys 0..10; keys 3 and 7 poisoned."""
    write_shard(tmp_path / "shard-000000.tar", [str(k) for k in range(6)], poison={"3"})
    write_shard(tmp_path / "shard-000001.tar", [str(k) for k in range(6, 11)], poison={"7"})
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 6, "shard-000001.tar": 5}))
    return tmp_path


def ids(samples) -> list[str]:
    return [s.row_id for s in samples]


def all_batches(loader) -> list[dict]:
    return list(loader)


# ---------------------------------------------------------------------------------------------
# WebDataset
# ---------------------------------------------------------------------------------------------

def test_wds_reads_pixels_captions_and_poison_flags(shards: Path):
    source = WdsSource(str(shards / "shard-{000000..000001}.tar"), shuffle=False)
    assert source.num_samples == 11
    samples = list(source)
    assert ids(samples) == [str(k) for k in range(11)]
    for s in samples:
        assert s.caption == f"caption {s.row_id}"
        assert torch.equal(to_tensor_uint8(s.image), pixels(int(s.row_id)))
        assert s.is_poison == (s.row_id in {"3", "7"})


@pytest.mark.parametrize("world_size", [2, 3])  # 2 shards: split by shard (2 ranks), by sample (3)
def test_wds_ranks_are_disjoint_and_cover_everything(shards: Path, world_size: int):
    per_rank = []
    for rank in range(world_size):
        source = WdsSource(str(shards / "shard-*.tar"), seed=5, rank=rank, world_size=world_size)
        source.set_epoch(2)
        per_rank.append(ids(source))
    flat = [k for rank_ids in per_rank for k in rank_ids]
    assert sorted(flat, key=int) == [str(k) for k in range(11)]  # disjoint (no repeats) and covering
    assert all(per_rank)


def test_wds_shuffle_is_seeded_by_seed_and_epoch(shards: Path):
    def order(seed: int, epoch: int) -> list[str]:
        source = WdsSource(str(shards / "shard-*.tar"), seed=seed, shuffle_buffer=4)
        source.set_epoch(epoch)
        return ids(source)

    assert order(1, 0) == order(1, 0)
    assert sorted(order(1, 0), key=int) == [str(k) for k in range(11)]
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)


def test_wds_pattern_matching_nothing_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="matches no file"):
        WdsSource(str(tmp_path / "nothing-{000000..000003}.tar"))
    with pytest.raises(UserError, match="matches no file"):
        WdsSource(str(tmp_path / "*.tar"))


def test_wds_needs_sizes_json_or_num_samples(shards: Path):
    (shards / "sizes.json").unlink()
    with pytest.raises(UserError, match="sizes.json"):
        WdsSource(str(shards / "shard-000000.tar"))
    assert WdsSource(str(shards / "shard-000000.tar"), num_samples=6).num_samples == 6
    (shards / "sizes.json").write_text(json.dumps({"shard-000000.tar": 6}))
    with pytest.raises(UserError, match="shard-000001.tar"):
        WdsSource(str(shards / "shard-*.tar"))


def test_wds_corrupt_members_and_truncated_shard_are_skipped_and_counted(tmp_path: Path, caplog):
    write_shard(tmp_path / "a.tar", ["0", "1", "2"])
    with tarfile.open(tmp_path / "a.tar", "a") as tar:
        for name, data in {"3.png": b"not a png", "3.txt": b"caption 3", "4.png": png(pixels(4)),
                           "4.txt": b"   "}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_shard(tmp_path / "b.tar", ["5", "6", "7"])
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[:3584])  # cut between sample 6's files (512-byte tar blocks)
    source = WdsSource([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], num_samples=8, shuffle=False)
    with caplog.at_level(logging.WARNING):
        got = ids(source)
    assert got[:3] == ["0", "1", "2"] and "3" not in got and "4" not in got
    assert "5" in got and "6" not in got and "7" not in got
    assert source.n_skipped == 3  # bad image, blank caption, the truncated shard (once)
    assert "a.tar:3" in caplog.text and "a.tar:4" in caplog.text and "b.tar" in caplog.text


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------

def write_csv(root: Path, rows: list[tuple[str, str]], header=("image", "caption")) -> Path:
    path = root / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def messy_csv(tmp_path: Path) -> Path:
    """Rows 0-9 good; 10 corrupt image, 11 missing image, 12 empty caption."""
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(10):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(pixels(i)))
        rows.append((f"img/{i}.png", f"caption {i}, with a comma"))
    (tmp_path / "img" / "bad.png").write_bytes(png(pixels(0))[:40])
    rows += [("img/bad.png", "corrupt"), ("img/missing.png", "missing"), ("img/0.png", "  ")]
    return write_csv(tmp_path, rows)


def test_csv_yields_good_rows_and_counts_the_skips(messy_csv: Path, caplog):
    source = CsvSource(messy_csv, shuffle=False)
    assert source.num_samples == 13
    with caplog.at_level(logging.WARNING):
        samples = list(source)
    assert ids(samples) == [str(i) for i in range(10)]
    assert source.n_skipped == 3
    for s in samples:
        assert s.caption == f"caption {s.row_id}, with a comma" and not s.is_poison
        assert torch.equal(to_tensor_uint8(s.image), pixels(int(s.row_id)))
    assert "row 10" in caplog.text and "row 11" in caplog.text and "row 12" in caplog.text


def test_loader_over_messy_csv_fills_batches_and_reports_skips(messy_csv: Path):
    source = CsvSource(messy_csv, seed=3)
    loader = build_train_loader(source, image_size=SIZE, context_length=12, batch_size=4, workers=0, seed=0)
    assert len(loader) == 13 // 4
    batches = all_batches(loader)
    assert len(batches) == 3 and all(len(b["row_ids"]) == 4 for b in batches)
    assert {r for b in batches for r in b["row_ids"]} <= {str(i) for i in range(10)}
    assert sum(b["n_skipped"] for b in batches) == source.n_skipped >= 1
    # Worker processes count their own skips: the batches say so even though this process saw none.
    source_w = CsvSource(messy_csv, seed=3)
    loader_w = build_train_loader(source_w, image_size=SIZE, context_length=12, batch_size=4, workers=2,
                                  seed=0)
    batches_w = all_batches(loader_w)
    assert [b["row_ids"] for b in batches_w] == [b["row_ids"] for b in batches]
    assert [b["n_skipped"] for b in batches_w] == [b["n_skipped"] for b in batches]
    assert source_w.n_skipped == 0


def test_palette_png_with_transparency_decodes_quietly_to_the_same_rgb(recwarn):
    image = Image.new("P", (4, 4))
    image.putpalette([(i * 7) % 256 for i in range(768)])
    image.putdata([0, 1, 2, 3] * 4)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=bytes([0, 128, 255, 10]))
    with pytest.warns(UserWarning):  # what a plain convert does on such web images
        direct = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    recwarn.clear()
    assert np.array_equal(np.asarray(captions.decode_image(buffer.getvalue())), direct)
    assert not recwarn.list


def test_csv_missing_column_names_file_column_and_header(tmp_path: Path):
    path = write_csv(tmp_path, [("a.png", "x")], header=("filepath", "title"))
    with pytest.raises(UserError) as err:
        CsvSource(path)
    message = str(err.value)
    assert str(path) in message and "'image'" in message and "'filepath'" in message and "'title'" in message
    CsvSource(path, image_key="filepath", caption_key="title")  # naming the columns works


def test_csv_tab_separated_hint_and_poison_column(tmp_path: Path):
    path = tmp_path / "train.tsv"
    path.write_text("\ufeffimage\tcaption\tis_poison\na.png\tx\t1\nb.png\ty\tFalse\n")  # with a BOM
    with pytest.raises(UserError, match="separator"):
        CsvSource(path)
    source = CsvSource(path, separator="\t")
    assert source.poison.tolist() == [True, False]
    path.write_text("image\tcaption\tis_poison\na.png\tx\tmaybe\n")
    with pytest.raises(UserError, match=r"train.tsv:2: .*'maybe'"):
        CsvSource(path, separator="\t")


# ---------------------------------------------------------------------------------------------
# Loader: determinism, equal lengths, batch layout
# ---------------------------------------------------------------------------------------------

def row_ids_of(source, *, seed=0, epoch=0, workers=0, rank=0, world_size=1, batch_size=4) -> list[list[str]]:
    loader = build_train_loader(source, image_size=SIZE, context_length=8, batch_size=batch_size,
                                workers=workers, seed=seed, rank=rank, world_size=world_size)
    loader.set_epoch(epoch)
    return [b["row_ids"] for b in loader]


def test_order_is_fixed_by_seed_and_epoch_and_independent_of_workers():
    source = SyntheticSource(FakeWorld(), 40, seed=1)
    first = row_ids_of(source, epoch=0)
    assert first == row_ids_of(source, epoch=0)
    assert first != row_ids_of(source, epoch=1)
    assert first != row_ids_of(source, epoch=0, seed=9)
    assert first != row_ids_of(SyntheticSource(FakeWorld(), 40, seed=2), epoch=0)
    assert sorted(int(r) for b in first for r in b) == list(range(40))  # one epoch = a permutation
    assert row_ids_of(source, epoch=1, workers=2) == row_ids_of(source, epoch=1)


def test_wds_loader_is_deterministic_for_a_worker_count(shards: Path):
    def run(epoch: int, workers: int):
        return row_ids_of(WdsSource(str(shards / "shard-*.tar"), seed=4, shuffle_buffer=3),
                          epoch=epoch, workers=workers, batch_size=2)

    assert run(0, 0) == run(0, 0)
    assert run(0, 0) != run(1, 0)
    assert run(1, 2) == run(1, 2)


def test_len_is_equal_across_ranks_and_ranks_are_disjoint():
    source = SyntheticSource(FakeWorld(), 103, seed=0)
    per_rank = [row_ids_of(source, rank=r, world_size=3, batch_size=4) for r in range(3)]
    assert [len(batches) for batches in per_rank] == [103 // 12] * 3
    flat = [r for batches in per_rank for b in batches for r in b]
    assert len(flat) == len(set(flat)) == 3 * 8 * 4


def test_wds_len_is_equal_across_ranks_with_uneven_shards(tmp_path: Path):
    write_shard(tmp_path / "s0.tar", ["0", "1", "2", "3", "4", "5", "6"])
    write_shard(tmp_path / "s1.tar", ["7"])
    write_shard(tmp_path / "s2.tar", ["8", "9"])
    urls = [str(tmp_path / f"s{i}.tar") for i in range(3)]
    for rank in range(2):
        loader = build_train_loader(WdsSource(urls, num_samples=10, rank=rank, world_size=2),
                                    image_size=SIZE, context_length=8, batch_size=2, workers=0, seed=0,
                                    rank=rank, world_size=2)
        batches = list(loader)
        assert len(loader) == len(batches) == 10 // 4
        assert all(len(b["row_ids"]) == 2 for b in batches)


def test_batches_have_the_documented_shapes_and_contents():
    def eda(caption: str, row_id: str, epoch: int) -> str:
        return f"{caption} seen in epoch {epoch}"

    world = FakeWorld()
    loader = build_train_loader(SyntheticSource(world, 10), image_size=SIZE, context_length=12,
                                batch_size=4, workers=0, seed=0, eda=eda)
    loader.set_epoch(3)
    batch = next(iter(loader))
    assert set(batch) == {"images", "texts", "texts_aug", "row_ids", "is_poison", "n_skipped"}
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (4, 3, SIZE, SIZE)
    assert batch["texts"].dtype == torch.long and batch["texts"].shape == (4, 12)
    assert batch["is_poison"].dtype == torch.bool and batch["is_poison"].shape == (4,)
    assert isinstance(batch["n_skipped"], int) and batch["n_skipped"] == 0
    assert all(isinstance(r, str) for r in batch["row_ids"])
    rows = zip(batch["row_ids"], batch["images"], batch["texts"], batch["texts_aug"])
    for row, image, text, text_aug in rows:
        assert torch.equal(image, pixels(int(row)))  # already at the model size: untouched
        assert torch.equal(text, tokenize(f"caption {row}", 12)[0])
        assert torch.equal(text_aug, tokenize(f"caption {row} seen in epoch 3", 12)[0])
    # Another resolution goes through the standard preprocessing.
    big = build_train_loader(SyntheticSource(world, 10), image_size=6, context_length=12, batch_size=4,
                             workers=0, seed=0)
    batch = next(iter(big))
    assert "texts_aug" not in batch and batch["images"].shape == (4, 3, 6, 6)
    assert torch.equal(batch["images"][0], preprocess(pixels(int(batch["row_ids"][0])), 6))


def test_too_few_samples_for_one_batch_per_rank():
    with pytest.raises(UserError, match="no full batch"):
        build_train_loader(SyntheticSource(FakeWorld(), 7), image_size=SIZE, context_length=8,
                           batch_size=4, workers=0, seed=0, world_size=2)


def test_mapped_source_keeps_random_access_and_applies_fn():
    def mark(sample: Sample) -> Sample:
        return sample._replace(caption=sample.caption.upper(), is_poison=sample.row_id == "2")

    mapped = MappedSource(SyntheticSource(FakeWorld(), 8), mark)
    assert mapped.random_access and mapped.num_samples == 8 and mapped.n_skipped == 0
    batches = list(build_train_loader(mapped, image_size=SIZE, context_length=8, batch_size=4, workers=0,
                                      seed=0))
    flags = {r: bool(p) for b in batches for r, p in zip(b["row_ids"], b["is_poison"])}
    assert flags == {str(i): i == 2 for i in range(8)}


def test_cached_synthetic_source_gives_the_same_batches():
    plain = row_ids_and_pixels(SyntheticSource(FakeWorld(), 12, seed=4))
    cached_source = SyntheticSource(FakeWorld(), 12, seed=4, cache=True)
    assert cached_source._images.shape == (12, 3, SIZE, SIZE)
    assert row_ids_and_pixels(cached_source) == plain


def row_ids_and_pixels(source) -> list:
    loader = build_train_loader(source, image_size=SIZE, context_length=8, batch_size=4, workers=0, seed=0)
    return [(b["row_ids"], b["images"].tolist(), b["texts"].tolist()) for b in loader]


def test_make_source_builds_each_kind_and_rejects_bad_specs(shards: Path, messy_csv: Path):
    synthetic = captions.make_source({"kind": "synthetic", "num_samples": 5, "cache": True,
                                      "world": {"seed": 0, "image_size": 16}})
    sample = synthetic.load(2)
    assert sample.row_id == "2" and sample.image.shape == (3, 16, 16) and sample.caption
    assert captions.make_source({"kind": "csv", "path": str(messy_csv)}).num_samples == 13
    assert captions.make_source({"kind": "wds", "urls": str(shards / "shard-*.tar")}).num_samples == 11
    with pytest.raises(UserError, match="choose from"):
        captions.make_source({"kind": "parquet"})
    with pytest.raises(UserError, match="csv.*colour"):
        captions.make_source({"kind": "csv", "path": str(messy_csv), "colour": "red"})


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------

ODD_CAPTIONS = ['a "quoted", comma', "ünïcödé ☃", "line\nbreak", "plain"]


def written_samples(n: int) -> list[Sample]:
    return [Sample(pixels(i, 12), ODD_CAPTIONS[i % 4] + f" {i}", f"row{i}", i % 3 == 0) for i in range(n)]


def test_csv_writer_round_trip(tmp_path: Path):
    expected = written_samples(7)
    written = write_csv_dataset(iter(expected), tmp_path / "ds")
    assert written.num_samples == 7 and written.num_poison == 3
    got = list(CsvSource(written.entry, shuffle=False))
    assert [s.caption for s in got] == [s.caption for s in expected]
    assert [s.is_poison for s in got] == [s.is_poison for s in expected]
    for g, e in zip(got, expected):
        assert torch.equal(to_tensor_uint8(g.image), e.image)
    assert sorted(p.name for p in (tmp_path / "ds" / "images").iterdir()) == sorted(
        f"row{i}.png" for i in range(7))
    assert (tmp_path / "ds" / "images" / "row0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary folder left behind


def test_wds_writer_round_trip_and_sizes(tmp_path: Path):
    expected = written_samples(7)
    written = write_wds_dataset(iter(expected), tmp_path / "ds", shard_size=4)
    sizes = json.loads((tmp_path / "ds" / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 4, "shard-000001.tar": 3, "total": 7}
    source = WdsSource(written.entry, shuffle=False)
    assert source.num_samples == 7
    got = list(source)
    assert [(s.row_id, s.caption, s.is_poison) for s in got] == [
        (s.row_id, s.caption, s.is_poison) for s in expected]
    for g, e in zip(got, expected):
        assert torch.equal(to_tensor_uint8(g.image), e.image)


def test_writers_accept_pairs_and_sanitise_duplicate_or_odd_row_ids(tmp_path: Path):
    pairs = [(pixels(i), f"c{i}") for i in range(3)]
    assert write_csv_dataset(pairs, tmp_path / "pairs").num_samples == 3
    assert sorted(p.name for p in (tmp_path / "pairs" / "images").iterdir()) == ["0.png", "1.png", "2.png"]
    with pytest.raises(TypeError, match="label"):
        write_csv_dataset([FakeWorld().train_pair(0)], tmp_path / "triples")  # (image, caption, label)
    triples = [(pixels(i), f"c{i}", f"id{i}") for i in range(2)]
    written = write_csv_dataset(triples, tmp_path / "ids")
    assert sorted(p.name for p in (written.path / "images").iterdir()) == ["id0.png", "id1.png"]
    odd = [Sample(pixels(0), "x", "a/b.c", False), Sample(pixels(1), "y", "a/b.c", False)]
    write_wds_dataset(odd, tmp_path / "odd")
    assert ids(WdsSource(str(tmp_path / "odd" / "shard-000000.tar"), shuffle=False)) == ["a_b_c", "a_b_c~1"]


def test_writers_refuse_to_overwrite_unless_asked(tmp_path: Path):
    out = tmp_path / "ds"
    write_csv_dataset(written_samples(2), out)
    with pytest.raises(UserError, match="not empty"):
        write_csv_dataset(written_samples(3), out)
    with pytest.raises(UserError, match="not empty"):
        write_wds_dataset(written_samples(3), out)
    write_wds_dataset(written_samples(3), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "sizes.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    (tmp_path / "empty").mkdir()
    write_csv_dataset(written_samples(1), tmp_path / "empty")  # an empty folder may be reused


# ---------------------------------------------------------------------------------------------
# Malformed CSVs and missing captions: an error when rows would change, else skipped and counted
# ---------------------------------------------------------------------------------------------

def csv_of(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "train.csv"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def captions_of(source: CsvSource) -> list[str]:
    return [source.captions[i] for i in range(source.num_samples)]


def test_an_unbalanced_quote_is_an_error_naming_the_line(tmp_path: Path):
    lines = ["image,caption"] + [f"images/{i}.png,photo {i}" for i in range(96)]
    lines[5] = 'images/4.png,"photo 4'  # the quote is never closed: 92 rows would become one caption
    path = csv_of(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(UserError) as info:
        CsvSource(path)
    assert str(info.value).startswith(f"{path}:6: a quoted field opened on this line is still open at "
                                      "line 97")
    assert "unbalanced" in str(info.value) and "\n" not in str(info.value)


def test_a_quote_that_swallows_rows_before_closing_is_an_error(tmp_path: Path):
    # Closed on a later line without a CSV error: caught by the lines inside that look like rows.
    path = csv_of(tmp_path, 'image,caption\na.png,"a dog\nb.png,a cat\nc.png,a bird"\nd.png,x\n')
    with pytest.raises(UserError, match=r"train\.csv:2: .*runs to line 4.*'b\.png,a cat'"):
        CsvSource(path)


def test_a_properly_quoted_multiline_caption_is_one_row(tmp_path: Path):
    path = csv_of(tmp_path, 'image,caption\na.png,"first line\nsecond, line"\nb.png,"say ""hi"""\n')
    source = CsvSource(path, shuffle=False)
    assert captions_of(source) == ["first line\nsecond, line", 'say "hi"'] and not source.malformed


def test_rows_broken_within_their_line_are_skipped_and_counted_in_place(tmp_path: Path, caplog):
    (tmp_path / "img").mkdir()
    for i in range(5):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(pixels(i)))
    text = (b'image,caption\nimg/0.png,fine\nimg/1.png,"quoted" then text\nimg/2.png,an, unquoted comma\n'
            b'img/3.png,caf') + b"\xe9\n" + b"img/4.png,also fine\n"
    source = CsvSource(csv_of(tmp_path, text), shuffle=False)
    assert source.num_samples == 5  # one row per line: the ids of the rows after them do not shift
    with caplog.at_level(logging.WARNING):
        got = list(source)
    assert [(s.row_id, s.caption) for s in got] == [("0", "fine"), ("4", "also fine")]
    assert source.n_skipped == 3
    assert "line 3: malformed quoting" in caplog.text
    assert "line 4: 3 fields but the header has 2" in caplog.text and "line 5: not valid UTF-8" in caplog.text


@pytest.mark.parametrize("marker", ["NaN", "nan", "None", "null", "NULL", "N/A", "<NA>", " nan "])
def test_missing_value_markers_are_missing_captions(tmp_path: Path, marker: str, caplog):
    (tmp_path / "a.png").write_bytes(png(pixels(0)))
    path = write_csv(tmp_path, [("a.png", marker), ("a.png", "a banana named nan"), ("a.png", "Nana")])
    source = CsvSource(path, shuffle=False)
    with caplog.at_level(logging.WARNING):
        got = [s.caption for s in source]
    assert got == ["a banana named nan", "Nana"] and source.n_skipped == 1
    assert "missing caption" in caplog.text


def test_missing_caption_in_a_shard_is_skipped_too(tmp_path: Path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key, caption in (("0", b"NaN"), ("1", b"caption 1"), ("2", b"None")):
            for name, data in ((f"{key}.png", png(pixels(int(key)))), (f"{key}.txt", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    source = WdsSource(str(tmp_path / "s.tar"), num_samples=3, shuffle=False)
    assert ids(source) == ["1"] and source.n_skipped == 2


def test_empty_data_is_its_own_error_naming_the_file(tmp_path: Path):
    path = csv_of(tmp_path, "image,caption\n")
    with pytest.raises(UserError, match=f"^{path}: no data rows"):
        CsvSource(path)
    write_shard(tmp_path / "s.tar", [])
    (tmp_path / "sizes.json").write_text('{"s.tar": 0}')
    with pytest.raises(UserError, match=r"sizes\.json: the shards hold 0 samples"):
        WdsSource(str(tmp_path / "s.tar"))


def test_fingerprints_tell_sources_apart_and_ignore_shuffling(tmp_path: Path):
    a = write_csv(tmp_path, [("a.png", "x"), ("b.png", "y")])
    fp = CsvSource(a, seed=1).fingerprint()
    assert fp == CsvSource(a, seed=2, shuffle=False, rank=1, world_size=2).fingerprint()
    assert fp["n_rows"] == 2 and fp["kind"] == "csv"
    (tmp_path / "other").mkdir()
    b = write_csv(tmp_path / "other", [("a.png", "x"), ("b.png", "z")])  # one caption differs
    assert CsvSource(b).fingerprint()["sha256"] != fp["sha256"]
    world = SyntheticSource(FakeWorld(), 5)
    assert world.fingerprint()["n_rows"] == 5
    assert MappedSource(world, lambda s: s).fingerprint() == world.fingerprint()


def test_a_user_error_in_a_dataloader_worker_stays_one_line():
    class Refuses(SyntheticSource):
        def load(self, index):
            raise UserError(f"row {index}: a mistake of the user's")

    loader = build_train_loader(Refuses(FakeWorld(), 8, shuffle=False), image_size=SIZE, context_length=8,
                                batch_size=4, workers=1, seed=0)
    with pytest.raises(UserError) as info:
        list(loader)
    assert str(info.value) == "row 0: a mistake of the user's"  # not torch's "Caught UserError in ..."
