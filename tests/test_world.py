"""The synthetic caption world: determinism, shapes, geometry, caption statistics, the CLI."""

import math
import pickle
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from clip_backdoor import cli
from clip_backdoor.data import world as world_module
from clip_backdoor.data.world import CLASSES, World
from clip_backdoor.errors import UserError


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


def _names_class(caption: str, cls) -> bool:
    """Independent of the module's helper: a whole-word regex over the class name and synonyms."""
    pattern = r"\b(" + "|".join(re.escape(n) for n in (cls.name, *cls.synonyms)) + r")\b"
    return re.search(pattern, caption.lower()) is not None


# ---- determinism --------------------------------------------------------------------------------

def test_same_seed_and_index_give_identical_pairs_in_any_order(world):
    forward = [world.train_pair(i) for i in range(20)]
    other = World(seed=0)
    for i in reversed(range(20)):
        image, caption, label = other.train_pair(i)
        assert torch.equal(image, forward[i][0])
        assert (caption, label) == forward[i][1:]
        assert torch.equal(other.eval_pair(i)[0], world.eval_pair(i)[0])


def test_different_seeds_differ(world):
    other = World(seed=1)
    same = sum(torch.equal(world.train_pair(i)[0], other.train_pair(i)[0]) for i in range(20))
    assert same == 0


def test_eval_split_is_a_different_stream_with_balanced_labels(world):
    assert all(not torch.equal(world.eval_pair(i)[0], world.train_pair(i)[0]) for i in range(20))
    assert [world.eval_pair(i)[1] for i in range(25)] == [i % len(CLASSES) for i in range(25)]


def test_pickled_world_and_threads_reproduce_the_pairs(world):
    clone = pickle.loads(pickle.dumps(world))
    assert torch.equal(clone.train_pair(7)[0], world.train_pair(7)[0])
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda i: world.train_pair(i)[0], range(40)))
    assert all(torch.equal(a, world.train_pair(i)[0]) for i, a in enumerate(threaded))


# ---- shapes, classes, errors --------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 48])
def test_shapes_dtypes_and_labels(size):
    w = World(seed=3, image_size=size)
    for i in range(10):
        image, caption, label = w.train_pair(i)
        assert image.dtype == torch.uint8 and image.shape == (3, size, size) and image.is_contiguous()
        assert isinstance(caption, str) and caption.strip()
        assert isinstance(label, int) and 0 <= label < len(w.classes)
        eval_image, eval_label = w.eval_pair(i)
        assert eval_image.shape == (3, size, size) and eval_label == i % len(w.classes)


def test_classes_and_templates(world):
    assert len(world.classes) >= 10 and len(set(world.classes)) == len(world.classes)
    assert "banana" in world.classes
    assert 8 <= len(world.templates) <= 20 and all("{}" in t for t in world.templates)


def test_bad_knobs_and_indices():
    with pytest.raises(UserError, match="unknown world knob.*colour_noise"):
        World(colour_noise=0.1)
    with pytest.raises(UserError, match="caption_noise"):
        World(caption_noise=1.5)
    with pytest.raises(UserError, match="min_scale"):
        World(min_scale=0.9, max_scale=0.5)
    with pytest.raises(UserError, match="image_size"):
        World(image_size=4)
    with pytest.raises(IndexError):
        World().train_pair(-1)


# ---- geometry -----------------------------------------------------------------------------------

def test_sprite_coverage_matches_the_analytic_area():
    texel_area = (2 * world_module._EXTENT / 64) ** 2
    ball = world_module._sprites(64)["ball"][0]
    area = ball.coverage[:, -1].sum() * texel_area
    assert area == pytest.approx(math.pi * 0.9 ** 2, rel=0.02)
    # Roles of a texel never add up to more than the texel.
    assert np.allclose(ball.coverage[:, :-1].sum(axis=1), ball.coverage[:, -1], atol=1e-5)
    assert ball.coverage[:, -1].max() <= 1 + 1e-6


@pytest.mark.parametrize("angle", [0.0, 0.6])
def test_stamp_places_a_square_of_the_right_size_and_centre(angle):
    size = 64
    w = World(seed=0, image_size=size, colour_jitter=0)
    canvas = np.zeros((3, size * size), dtype=np.float32)
    half, cx, cy = 0.25, 0.4, 0.55
    w._stamp(canvas, w._draws("train", 0), "distractor", 0, "white", half, cx, cy, angle, 1.0, 1.0, 1.0)
    alpha = (canvas[0] / world_module.COLOURS["white"][0]).reshape(size, size)
    side = 2 * 0.75 * half * size  # the square spans ±0.75 local units
    assert alpha.sum() == pytest.approx(side ** 2, rel=0.05)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    assert (alpha * xs).sum() / alpha.sum() == pytest.approx(cx * size, abs=0.5)
    assert (alpha * ys).sum() / alpha.sum() == pytest.approx(cy * size, abs=0.5)


def test_every_class_has_its_own_silhouette():
    sprites = world_module._sprites(64)
    masks = {c.name: sprites[c.name][0].coverage[:, -1] for c in CLASSES}
    for name, mask in masks.items():
        assert 0.5 < mask.sum() * (2 * world_module._EXTENT / 64) ** 2 < 4.5, name  # local units²
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            iou = np.minimum(masks[a], masks[b]).sum() / np.maximum(masks[a], masks[b]).sum()
            assert iou < 0.85, (a, b, iou)


# ---- captions -----------------------------------------------------------------------------------

@pytest.mark.parametrize("noise", [0.15, 0.4])
def test_share_of_captions_naming_the_object_matches_the_knob(noise):
    w = World(seed=5, caption_noise=noise)
    pairs = [w.train_pair(i) for i in range(1500)]
    naming = np.mean([_names_class(caption, CLASSES[label]) for _, caption, label in pairs])
    assert naming == pytest.approx(1 - noise, abs=0.04)
    # Agrees with the module's own helper.
    assert all(_names_class(c, CLASSES[y]) == world_module.caption_names_class(c, CLASSES[y])
               for _, c, y in pairs)


def test_noise_captions_never_name_any_class_and_clean_ones_always_name_theirs():
    noisy = World(seed=2, caption_noise=1.0)
    for i in range(300):
        caption = noisy.train_pair(i)[1]
        assert not any(_names_class(caption, cls) for cls in CLASSES), caption
    clean = World(seed=2, caption_noise=0.0)
    pairs = [clean.train_pair(i) for i in range(300)]
    assert all(_names_class(c, CLASSES[y]) for _, c, y in pairs)
    assert len({c for _, c, _ in pairs}) > 150  # varied, not one template
    assert any(c.split()[0] != "a" for _, c, _ in pairs)


# ---- materialising ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "wds"])
def test_cli_writes_datasets_that_the_readers_accept(tmp_path, fmt):
    from clip_backdoor.data.captions import make_source
    from clip_backdoor.data.classification import open_eval_set

    out = tmp_path / "world"
    assert cli.main(["world", "--out", str(out), "--format", fmt, "--n", "12", "--eval", "10",
                     "--seed", "4", "--knob", "caption_noise=0.5"]) == 0
    w = World(seed=4, caption_noise=0.5)
    if fmt == "csv":
        source = make_source({"kind": "csv", "path": str(out / "train" / "train.csv"), "shuffle": False})
    else:
        source = make_source({"kind": "wds", "urls": str(out / "train" / "shard-000000.tar"),
                              "shuffle": False})
    samples = {int(s.row_id): s for s in source}
    assert sorted(samples) == list(range(12))
    for i, sample in samples.items():
        image, caption, _ = w.train_pair(i)
        assert sample.caption == caption
        assert np.array_equal(np.asarray(sample.image), image.permute(1, 2, 0).numpy())  # PNG: lossless

    eval_set = open_eval_set(str(out / "eval"), 32)
    assert len(eval_set) == 10 and eval_set.classes == w.classes and eval_set.templates == w.templates
    for i in (0, 9):
        image, label = eval_set[i]
        assert label == i % 10 and torch.equal(image, w.eval_pair(i)[0])


def test_cli_contact_sheet_and_errors(tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert cli.main(["world", "--contact-sheet", str(sheet)]) == 0
    with Image.open(sheet) as img:
        assert img.width >= 800 and img.height >= 800
    (tmp_path / "taken").mkdir()
    assert cli.main(["world", "--out", str(tmp_path / "taken"), "--n", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["world", "--out", str(tmp_path / "x"), "--knob", "pixel_noise"]) == 2
    assert cli.main(["world", "--out", str(tmp_path / "y"), "--knob", "nope=1"]) == 2
    assert cli.main(["world"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
