"""Held-out selection's data side: two disjoint evaluation splits (synthetic index ranges, a seeded
per-class partition of a file set, or a second set), evaluated in one pass and counted apart."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from clip_backdoor.attacks.triggers import get_trigger
from clip_backdoor.data.classification import (
    EvalSplits,
    SyntheticEvalSet,
    open_eval_set,
    split_positions,
)
from clip_backdoor.data.world import World
from clip_backdoor.errors import UserError
from clip_backdoor.evaluate import evaluate_model
from clip_backdoor.models import create_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny", seed=0)


def test_synthetic_validation_follows_the_test_images_unless_told_otherwise():
    splits = open_eval_set({"kind": "synthetic", "n": 20, "world": {"seed": 0}, "val_n": 10}, 32)
    assert isinstance(splits, EvalSplits) and len(splits) == 30 and splits.val_from == 20
    world = World(seed=0, image_size=32)
    for position, index in ((0, 0), (19, 19), (20, 20), (29, 29)):
        image, label = world.eval_pair(index)
        assert torch.equal(splits[position][0], image) and splits[position][1] == label
    far = open_eval_set({"kind": "synthetic", "n": 20, "world": {"seed": 0}, "val_n": 10, "val_start": 500},
                        32)
    image, label = world.eval_pair(503)
    clean, to_trigger, got = far.views(23)
    assert torch.equal(clean, image) and torch.equal(to_trigger, image) and got == label
    assert not isinstance(open_eval_set({"kind": "synthetic", "n": 20}, 32), EvalSplits)  # no val_n


@pytest.mark.parametrize("start", [0, 10, 19])
def test_overlapping_synthetic_splits_name_the_key(start):
    with pytest.raises(UserError, match=rf"eval.val_start: validation images \[{start}, {start + 10}\) "
                                        r"overlap the test images \[0, 20\)"):
        open_eval_set({"kind": "synthetic", "n": 20, "val_n": 10, "val_start": start}, 32)


def test_one_pass_counts_each_split_apart(model):
    """Oracle: the test split alone gives the same numbers (same images, same trigger draws), and the
    two splits' counts add up to those of the 70 images evaluated as one set."""
    world = World(seed=0, image_size=32)
    trigger = get_trigger("badnet", size=8)
    kwargs = {"target": "banana", "trigger": trigger, "seed": 3, "batch_size": 16}  # batches straddle it
    splits = EvalSplits(SyntheticEvalSet(world, 40), SyntheticEvalSet(world, 30, start=40))
    both = evaluate_model(model, splits, **kwargs)
    alone = evaluate_model(model, SyntheticEvalSet(world, 40), **kwargs)
    whole = evaluate_model(model, SyntheticEvalSet(world, 70), **kwargs)
    assert {k: both[k] for k in alone} == alone
    assert (both["n"], both["val_n"], both["n_asr"] + both["val_n_asr"]) == (40, 30, whole["n_asr"])
    counts = (("acc1", "n"), ("acc5", "n"), ("asr1", "n_asr"), ("asr5", "n_asr"), ("ra1", "n_asr"))
    for metric, count in counts:
        hits = both[metric] * both[count] + both[f"val_{metric}"] * both[f"val_{count}"]
        assert hits == pytest.approx(whole[metric] * whole[count]), metric
    no_val = evaluate_model(model, SyntheticEvalSet(world, 40), target=None, trigger=None)
    assert not any(k.startswith("val_") for k in no_val)


def image_folder(root, classes=("apple", "banana", "cherry"), per_class=6):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (40 * c, 10 * i, 100)).save(root / name / f"{i}.png")
    return root


def test_partition_is_seeded_stratified_disjoint_and_complete():
    labels = [0] * 10 + [1] * 6 + [2] * 4
    test, val = split_positions(labels, 0.5, seed=0)
    assert sorted(test + val) == list(range(20)) and not set(test) & set(val)
    assert [sum(labels[p] == c for p in val) for c in range(3)] == [5, 3, 2]
    assert split_positions(labels, 0.5, seed=0) == (test, val)
    assert split_positions(labels, 0.5, seed=1) != (test, val)


def test_file_set_partition_and_second_set(tmp_path):
    root = image_folder(tmp_path / "val_images")
    splits = open_eval_set({"kind": "imagefolder", "root": str(root), "val_fraction": 0.5, "split_seed": 4},
                           8)
    assert isinstance(splits, EvalSplits) and (len(splits.test), len(splits.validation)) == (9, 9)
    assert not {p for p, _ in splits.test.items} & {p for p, _ in splits.validation.items}
    assert splits.classes == ["apple", "banana", "cherry"]
    other = image_folder(tmp_path / "other", per_class=2)
    second = open_eval_set({"kind": "imagefolder", "root": str(root), "val_path": str(other)}, 8)
    assert (second.val_from, len(second)) == (18, 24)
    with pytest.raises(UserError, match=r"eval.val_path: 18 of its images are also in the test set"):
        open_eval_set({"kind": "imagefolder", "root": str(root), "val_path": str(root)}, 8)
    with pytest.raises(UserError, match="eval.val_fraction: 1.0 must lie strictly between 0 and 1"):
        open_eval_set({"kind": "imagefolder", "root": str(root), "val_fraction": 1.0}, 8)
    with pytest.raises(UserError, match="eval.val_fraction: give a validation set"):
        open_eval_set({"kind": "imagefolder", "root": str(root), "val_path": str(other),
                       "val_fraction": 0.5}, 8)
