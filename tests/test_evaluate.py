"""Zero-shot accuracy, ASR and robust accuracy; checkpoint reading; the evaluate command.

Metrics are checked on hand-built logits with known answers, the pipeline against a naive per-image
implementation and against stub models whose answers are forced, the command on a tiny checkpoint.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from clip_backdoor.attacks.triggers import apply_trigger_uint8, get_trigger
from clip_backdoor.data.transforms import CLIP_MEAN, CLIP_STD, normalize
from clip_backdoor.errors import UserError
from clip_backdoor.evaluate import (
    TriggeredEvalSet,
    attack_success,
    build_classifier,
    evaluate_model,
    image_seed,
    robust_correct,
    topk_correct,
)
from clip_backdoor.models import create_model
from clip_backdoor.tokenizer import tokenize
from clip_backdoor.weights import load_checkpoint, model_from_checkpoint


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run many times faster on one thread when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Metrics on hand-built logits
# --------------------------------------------------------------------------------------------
def test_topk_correct_counts_and_clamps_k():
    logits = torch.tensor([[0.9, 0.1, 0.0],    # predicts 0
                           [0.2, 0.5, 0.3],    # predicts 1, then 2
                           [0.6, 0.3, 0.1]])   # predicts 0, then 1, last 2
    labels = torch.tensor([0, 2, 2])
    assert topk_correct(logits, labels, 1) == 1
    assert topk_correct(logits, labels, 2) == 2
    assert topk_correct(logits, labels, 5) == 3  # k clamped to 3 classes: always right


def test_attack_success_excludes_target_class_images():
    target = 2
    labels = torch.tensor([0, 1, 2, 2, 3])
    triggered = torch.tensor([[0.0, 0.1, 0.9, 0.0],   # non-target, predicted target: hit
                              [0.0, 0.9, 0.1, 0.0],   # non-target, target ranked 2nd: top-1 miss
                              [0.0, 0.0, 1.0, 0.0],   # target class predicted as target: excluded
                              [1.0, 0.0, 0.0, 0.0],   # target class: excluded either way
                              [0.3, 0.2, 0.0, 0.5]])  # non-target, target ranked last
    assert attack_success(triggered, labels, target, 1) == (1, 3)
    assert attack_success(triggered, labels, target, 2) == (2, 3)
    assert attack_success(triggered, labels, target, 5) == (3, 3)  # top-5 of 4 classes
    assert robust_correct(triggered, labels, target) == (2, 3)  # rows 1 and 4 still right


def test_asr_is_not_the_reference_accuracy_under_trigger():
    """Reference bug 1 printed "prediction == true label" under the trigger as its ASR."""
    labels = torch.tensor([0, 1, 2, 3])
    target = 3
    # A model that ignores the trigger entirely: every triggered image keeps its true label.
    triggered = F.one_hot(labels, 4).float()
    reference_asr = (triggered.argmax(1) == labels).float().mean().item()
    hits, n_asr = attack_success(triggered, labels, target, 1)
    assert reference_asr == 1.0
    assert (hits, n_asr) == (0, 3)  # no attack succeeded, and image 3 (of the target) is not counted
    assert robust_correct(triggered, labels, target) == (3, 3)
    # A perfect backdoor: everything goes to the target. The reference number would say 25%.
    triggered = F.one_hot(torch.full((4,), target), 4).float()
    assert (triggered.argmax(1) == labels).float().mean().item() == 0.25
    assert attack_success(triggered, labels, target, 1) == (3, 3)
    assert robust_correct(triggered, labels, target) == (0, 3)


def test_image_seed_is_mixed_in_its_low_bits():
    seeds = {image_seed(s, i) & 0xFFFFFFFF for s in range(4) for i in range(256)}
    assert len(seeds) == 4 * 256  # torch's CPU generator uses only the low 32 bits


def test_image_seed_is_splitmix64():
    # splitmix64 seeded with 0 outputs mix(k * golden) as its k-th number: e220a8397b1dcdaf,
    # 6e789e6aa1b965f4, 06c45d188009454f (the published sequence); image_seed mixes seed * golden +
    # index + 1, so these indices put it on those states.
    golden, mask = 0x9E3779B97F4A7C15, 2**64 - 1
    published = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [image_seed(0, (k * golden - 1) & mask) for k in (1, 2, 3)] == published
    assert [image_seed(k, -1) for k in (1, 2, 3)] == published


# --------------------------------------------------------------------------------------------
# Classifier construction
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return create_model("tiny", seed=0)


def test_build_classifier_matches_naive_per_class_loop(tiny):
    classes = ["apple", "banana", "red car"]
    templates = ["a photo of a {}.", "{}", "a blurry photo of the {}, maybe."]
    got = build_classifier(tiny, classes, templates, context_length=tiny.context_length, batch_size=4)
    columns = []
    with torch.no_grad():
        for name in classes:
            rows = [tiny.encode_text(tokenize(t.format(name), tiny.context_length)) for t in templates]
            rows = [r / r.norm() for r in rows]
            mean = torch.cat(rows).mean(0)
            columns.append(mean / mean.norm())
    want = torch.stack(columns, dim=1)
    assert got.shape == (64, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_build_classifier_rejects_template_without_placeholder(tiny):
    with pytest.raises(UserError, match="no '\\{\\}'"):
        build_classifier(tiny, ["apple"], ["a photo"], context_length=16)


def test_build_classifier_bf16_is_close_to_fp32(tiny):
    args = (tiny, ["apple", "banana"], ["a photo of a {}.", "a {}"])
    fp32 = build_classifier(*args, context_length=16)
    bf16 = build_classifier(*args, context_length=16, precision="bf16")
    assert bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().max() < 0.05


# --------------------------------------------------------------------------------------------
# Stub models with forced answers
# --------------------------------------------------------------------------------------------
CLASSES = ["apple", "banana", "car", "house"]
TEMPLATES = ["a photo of a {}.", "art of the {}"]
FILL_STEP = 60  # image of "seen class" c is filled with grey level 60 * c


class ListEvalSet:
    def __init__(self, images, labels, classes=CLASSES, templates=TEMPLATES):
        self.images, self.labels = images, labels
        self.classes, self.templates = list(classes), list(templates)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class StubCLIP(torch.nn.Module):
    """Text: one-hot of the class named in the caption. Image: one-hot of the class its grey level
    encodes; with ``backdoored`` any non-constant image (a pasted patch) is seen as ``target``."""

    context_length = 16
    image_size = 16

    def __init__(self, backdoored=False, target=1):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.backdoored, self.target = backdoored, target
        self.class_tokens = [int(tokenize(name, 16)[0, 1]) for name in CLASSES]
        self.modes_seen = []

    def encode_text(self, tokens, normalize=False):
        rows = [[c for c, tok in enumerate(self.class_tokens) if (row == tok).any()] for row in tokens]
        assert all(len(r) == 1 for r in rows)
        return F.one_hot(torch.tensor([r[0] for r in rows]), len(CLASSES)).float() * 3.0

    def encode_image(self, images, normalize=False):
        self.modes_seen.append(self.training)
        red = images[:, 0] * CLIP_STD[0] + CLIP_MEAN[0]  # back to [0, 1]
        seen = (red.flatten(1).median(dim=1).values * 255 / FILL_STEP).round().long()
        if self.backdoored:
            patched = (red.flatten(1).amax(1) - red.flatten(1).amin(1)) > 1e-3
            seen = torch.where(patched, torch.full_like(seen, self.target), seen)
        return F.one_hot(seen, len(CLASSES)).float() * 2.0


def forced_set(seen, labels):
    images = [torch.full((3, 16, 16), FILL_STEP * s, dtype=torch.uint8) for s in seen]
    return ListEvalSet(images, labels)


def test_stub_model_accuracy_and_asr_are_exact():
    seen = [0, 1, 2, 3, 0, 1, 1, 3, 3, 3]
    labels = [0, 1, 2, 3, 1, 1, 0, 3, 2, 2]  # right: 0, 1, 2, 3, 5, 7 -> 6 of 10
    eval_set = forced_set(seen, labels)
    trigger = get_trigger("badnet", size=4)
    # The clean stub reads the median grey level, which a 4x4 patch on 16x16 cannot move: under the
    # trigger it answers as on clean images. Non-target images (label != banana): 0, 2, 3, 6, 7, 8, 9.
    m = evaluate_model(StubCLIP(backdoored=False), eval_set, target="banana", trigger=trigger, batch_size=3)
    assert m["acc1"] == pytest.approx(0.6)
    assert m["acc5"] == 1.0  # 4 classes: top-5 clamps to all of them
    assert m["n"] == 10 and m["n_asr"] == 7  # the three banana images are excluded
    assert m["asr1"] == pytest.approx(1 / 7)  # image 6 (an apple seen as banana)
    assert m["asr5"] == 1.0
    assert m["ra1"] == pytest.approx(4 / 7)  # images 0, 2, 3, 7
    m = evaluate_model(StubCLIP(backdoored=True), eval_set, target="banana", trigger=trigger, batch_size=4)
    assert m["acc1"] == pytest.approx(0.6)  # clean images are constant: the backdoor stays silent
    assert m["asr1"] == 1.0 and m["asr5"] == 1.0 and m["ra1"] == 0.0
    assert list(m) == ["acc1", "acc5", "asr1", "asr5", "ra1", "n", "n_asr"]


def test_accuracy_only_without_trigger_and_mode_restored():
    model = StubCLIP()
    model.train()
    m = evaluate_model(model, forced_set([0, 1, 2], [0, 1, 1]), batch_size=2)
    assert list(m) == ["acc1", "acc5", "n"]
    assert m["acc1"] == pytest.approx(2 / 3) and m["n"] == 3
    assert model.training  # restored
    assert model.modes_seen and not any(model.modes_seen)  # but evaluated in eval mode


def test_target_and_trigger_go_together():
    with pytest.raises(UserError, match="both"):
        evaluate_model(StubCLIP(), forced_set([0], [0]), target="banana")


def test_all_images_of_target_class_is_an_error():
    with pytest.raises(UserError, match="target class"):
        evaluate_model(StubCLIP(), forced_set([1, 1], [1, 1]), target=1, trigger=get_trigger("badnet"))


# --------------------------------------------------------------------------------------------
# The real tiny model: against a naive per-image evaluation; repeatability
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_set():
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (23, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = [i % 4 for i in range(23)]
    return ListEvalSet(list(images), labels)


def naive_metrics(model, eval_set, target_index, trigger, seed):
    """Image by image, one generator per image seeded as documented, classifier by a class loop."""
    model.eval()
    with torch.no_grad():
        columns = []
        for name in eval_set.classes:
            rows = [F.normalize(model.encode_text(tokenize(t.format(name), 16)), dim=-1)
                    for t in eval_set.templates]
            columns.append(F.normalize(torch.cat(rows).mean(0), dim=0))
        weights = torch.stack(columns, 1)

        def predict(image):
            feature = model.encode_image(normalize(image.float().unsqueeze(0) / 255))
            return (F.normalize(feature, dim=-1) @ weights)[0].argsort(descending=True)

        right1 = asr1 = ra1 = n_asr = 0
        for i in range(len(eval_set)):
            image, label = eval_set[i]
            right1 += int(predict(image)[0] == label)
            if label == target_index:
                continue
            generator = torch.Generator().manual_seed(image_seed(seed, i))
            ranked = predict(apply_trigger_uint8(image, trigger, generator))
            n_asr += 1
            asr1 += int(ranked[0] == target_index)
            ra1 += int(ranked[0] == label)
    return {"acc1": right1 / len(eval_set), "asr1": asr1 / n_asr, "ra1": ra1 / n_asr, "n_asr": n_asr}


def test_evaluate_model_matches_naive_per_image_loop(tiny, random_set):
    trigger = get_trigger("badnet", size=8)
    got = evaluate_model(tiny, random_set, target=2, trigger=trigger, seed=3, batch_size=5)
    want = naive_metrics(tiny, random_set, 2, trigger, seed=3)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["n"] == 23 and got["n_asr"] == 23 - 6  # label 2 at 2, 6, 10, 14, 18, 22


def test_asr_repeatable_and_independent_of_batching(tiny, random_set):
    trigger = get_trigger("blended")
    run = dict(target=1, trigger=trigger, seed=11)
    reference = evaluate_model(tiny, random_set, batch_size=23, **run)
    assert evaluate_model(tiny, random_set, batch_size=23, **run) == reference
    assert evaluate_model(tiny, random_set, batch_size=4, **run) == reference
    assert evaluate_model(tiny, random_set, batch_size=6, workers=2, **run) == reference


def test_trigger_draws_depend_on_seed_and_index_only(random_set):
    trigger = get_trigger("badnet", size=8)
    a, b, c = (TriggeredEvalSet(random_set, trigger, seed) for seed in (0, 0, 1))
    assert torch.equal(a[5][1], b[5][1])
    assert not torch.equal(a[5][1], c[5][1])  # another evaluation seed draws another trigger
    generator = torch.Generator().manual_seed(image_seed(0, 5))
    documented = apply_trigger_uint8(random_set[5][0], trigger, generator)
    assert torch.equal(a[5][1], documented)
    assert torch.equal(a[5][0], random_set[5][0])  # the clean image is untouched
    assert a[5][2] == random_set[5][1]
    skipping = TriggeredEvalSet(random_set, trigger, 0, skip_label=2)  # image 2 has label 2
    assert torch.equal(skipping[2][1], random_set[2][0])  # the target class is never triggered
    assert torch.equal(skipping[5][1], a[5][1])  # and skipping it changes no other image's draw


def test_given_classifier_is_used_instead_of_building_one():
    model = StubCLIP()
    eval_set = forced_set([0, 1, 2, 3], [0, 1, 2, 3])
    assert evaluate_model(model, eval_set)["acc1"] == 1.0
    always_house = torch.zeros(4, 4)
    always_house[:, 3] = 1.0  # every image scores 1 on "house", 0 elsewhere
    assert evaluate_model(model, eval_set, classifier=always_house)["acc1"] == 0.25


def test_unknown_precision_is_a_user_error(tiny, random_set):
    with pytest.raises(UserError, match="precision"):
        evaluate_model(tiny, random_set, precision="fp8")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def write_checkpoint(path, model, **extra):
    ckpt = {"epoch": 3, "step": 120, "model": {**model.config, "name": "tiny"},
            "state_dict": model.state_dict(), "optimizer": None, "scheduler": None, "scaler": None,
            "rng": {"torch": torch.get_rng_state()}, "config": {"eval": {"target": "banana"}}, **extra}
    torch.save(ckpt, path)
    return ckpt


def test_checkpoint_round_trip(tmp_path, tiny):
    path = tmp_path / "epoch_3.pt"
    write_checkpoint(path, tiny)
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 and ckpt["model"]["name"] == "tiny"
    model, _ = model_from_checkpoint(path)
    for key, value in tiny.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_plain_state_dict_needs_a_model_name(tmp_path, tiny):
    path = tmp_path / "weights.pt"
    torch.save({f"module.{k}": v for k, v in tiny.state_dict().items()}, path)  # open_clip DDP style
    with pytest.raises(UserError, match="--model"):
        model_from_checkpoint(path)
    model, ckpt = model_from_checkpoint(path, model_name="tiny")
    assert "module.logit_scale" not in ckpt["state_dict"]
    assert torch.equal(model.logit_scale, tiny.logit_scale)


def test_safetensors_state_dict(tmp_path, tiny):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    model, _ = model_from_checkpoint(path, model_name="tiny")
    assert torch.equal(model.token_embedding.weight, tiny.token_embedding.weight)


def test_checkpoint_errors_are_one_line(tmp_path, tiny):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(UserError, match="checkpoint \\(not a file written by torch.save") as info:
        load_checkpoint(text)
    assert "\n" not in str(info.value)
    other = tmp_path / "list.pt"
    torch.save([1, 2, 3], other)
    with pytest.raises(UserError, match="is not a clip-backdoor checkpoint \\(it holds a list\\)"):
        load_checkpoint(other)
    no_weights = tmp_path / "meta.pt"
    torch.save({"epoch": 1, "model": {}}, no_weights)
    with pytest.raises(UserError, match="is not a clip-backdoor checkpoint"):
        load_checkpoint(no_weights)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "when": datetime.date(2024, 1, 1)}, path)
    with pytest.raises(UserError, match="objects other than tensors.*datetime.date") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


class _OpensAFile:
    """Unpickling this calls open(marker, "w"): proof that pickled code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["text", "csv", "random bytes", "empty", "pickled code", "zip of junk"])
def test_any_unreadable_checkpoint_is_one_line_and_runs_no_code(tmp_path, kind):
    import pickle
    import random
    import zipfile

    path, marker = tmp_path / "ckpt.pt", tmp_path / "code-ran"
    if kind == "text":
        path.write_text("hello world\n")  # torch's unpickler raised KeyError here
    elif kind == "csv":
        path.write_text("image,caption\nimages/0.png,a dog\n")
    elif kind == "random bytes":
        path.write_bytes(random.Random(0).randbytes(300))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickled code":
        path.write_bytes(pickle.dumps({"state_dict": _OpensAFile(marker)}, protocol=2))
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", b"junk")
    with pytest.raises(UserError, match="is not a clip-backdoor checkpoint") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and not marker.exists()


def test_shape_mismatch_names_the_first_key(tmp_path, tiny):
    path = tmp_path / "bad.pt"
    state = dict(tiny.state_dict())
    state["text_projection"] = torch.zeros(5, 5)
    write_checkpoint(path, tiny, state_dict=state)
    with pytest.raises(UserError, match="text_projection has shape \\[5, 5\\]") as info:
        model_from_checkpoint(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def test_missing_target_lists_close_matches():
    with pytest.raises(UserError, match="'bananas'.*close matches: 'banana'"):
        evaluate_model(StubCLIP(), forced_set([0], [0]), target="bananas", trigger=get_trigger("badnet"))


def count_text_tower_calls(monkeypatch) -> list:
    """A list that gets one entry per ``CLIP.encode_text`` call from now on."""
    from clip_backdoor.models import CLIP

    calls, real = [], CLIP.encode_text

    def encode_text(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CLIP, "encode_text", encode_text)
    return calls


def test_evaluate_command_writes_one_result(tmp_path, tiny, capsys, monkeypatch):
    from clip_backdoor import evaluate as ev
    from clip_backdoor.cli import main as cli_main

    ckpt = tmp_path / "epoch_3.pt"
    write_checkpoint(ckpt, tiny)
    out = tmp_path / "results" / "eval.json"
    argv = ["evaluate", "--checkpoint", str(ckpt), "--eval", "synthetic", "--eval-n", "30",
            "--world-seed", "1", "--target", "banana", "--trigger", "badnet", "--trigger-param", "size=4",
            "--seed", "5", "--batch-size", "8", "--device", "cpu", "--out", str(out)]
    ev._CLASSIFIER_CACHE.clear()
    first = count_text_tower_calls(monkeypatch)
    assert cli_main(argv) == 0
    assert len(first) > 0
    result = json.loads(out.read_text())
    assert list(result) == ["checkpoint", "dataset", "target", "trigger", "seed", "metrics"]
    assert result["target"] == "banana" and result["seed"] == 5 and result["dataset"] == "synthetic"
    assert result["trigger"]["name"] == "badnet" and result["trigger"]["params"]["size"] == 4
    metrics = result["metrics"]
    assert list(metrics) == ["acc1", "acc5", "asr1", "asr5", "ra1", "n", "n_asr"]
    assert metrics["n"] == 30 and 0 < metrics["n_asr"] < 30
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "asr1" in line and "epoch_3.pt" in line

    # The classifier is cached next to the result, keyed by the checkpoint file; a second run reads it
    # (the text tower is not run again) and reproduces the numbers.
    cached = list((out.parent / ".classifier-cache").glob("classifier-*.pt"))
    assert len(cached) == 1
    calls = count_text_tower_calls(monkeypatch)
    ev._CLASSIFIER_CACHE.clear()
    assert cli_main(argv) == 0  # read from the file
    assert json.loads(out.read_text()) == result and calls == []
    cached[0].unlink()
    assert cli_main(argv) == 0  # read from this process's memo
    assert json.loads(out.read_text()) == result and calls == []
    assert cli_main([*argv, "--precision", "bf16"]) == 0  # another key: built (and cached) anew
    assert len(calls) > 0 and len(list((out.parent / ".classifier-cache").glob("classifier-*.pt"))) == 1
    calls.clear()
    assert cli_main([*argv, "--no-cache"]) == 0
    assert len(calls) > 0 and json.loads(out.read_text()) == result

    # Against the library on the same set: the command adds nothing of its own.
    from clip_backdoor.data.classification import open_eval_set

    eval_set = open_eval_set({"kind": "synthetic", "n": 30, "world": {"seed": 1}}, tiny.image_size)
    direct = evaluate_model(tiny, eval_set, target="banana", trigger=get_trigger("badnet", size=4), seed=5)
    assert direct == metrics


def _change_checkpoint_size(ckpt, args):
    stat = ckpt.stat()
    with open(ckpt, "ab") as f:
        f.write(b"\0")
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same mtime: only the size differs
    return args


def _change_checkpoint_mtime(ckpt, args):
    stat = ckpt.stat()
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    return args


def _copy_checkpoint(ckpt, args):
    other = ckpt.with_name("copy.pt")
    shutil.copy2(ckpt, other)  # same size and mtime, another file
    return {**args, "checkpoint": other}


# One case per ingredient of the key: each changes that ingredient alone.
CACHE_KEY_CHANGES = {
    "templates": lambda ckpt, args: {**args, "templates": ["a photo of {}."]},
    "class names": lambda ckpt, args: {**args, "classes": ["a", "c"]},
    "class order": lambda ckpt, args: {**args, "classes": ["b", "a"]},
    "context length": lambda ckpt, args: {**args, "context_length": 8},
    "model": lambda ckpt, args: {**args, "model_name": "RN50"},
    "precision": lambda ckpt, args: {**args, "precision": "bf16"},
    "checkpoint size": _change_checkpoint_size,
    "checkpoint mtime": _change_checkpoint_mtime,
    "checkpoint path": _copy_checkpoint,
}


@pytest.mark.parametrize("ingredient", list(CACHE_KEY_CHANGES))
def test_classifier_cache_key_changes_with_each_ingredient(tmp_path, tiny, ingredient):
    from clip_backdoor.evaluate import classifier_cache_key

    ckpt = tmp_path / "latest.pt"
    write_checkpoint(ckpt, tiny)
    args = {"checkpoint": ckpt, "classes": ["a", "b"], "templates": ["{}"], "context_length": 16,
            "precision": "fp32", "model_name": None}

    def key(a):
        return classifier_cache_key(a["checkpoint"], a["classes"], a["templates"],
                                    context_length=a["context_length"], precision=a["precision"],
                                    model_name=a["model_name"])

    before = key(args)
    assert key(dict(args)) == before  # nothing changed: the same key
    assert key(CACHE_KEY_CHANGES[ingredient](ckpt, args)) != before


def test_cached_classifier_reads_back_what_it_built_and_rebuilds_a_torn_file(tmp_path):
    from clip_backdoor import evaluate as ev

    built = []

    def build():
        built.append(1)
        return torch.arange(6.0).view(2, 3)

    ev._CLASSIFIER_CACHE.clear()
    first = ev.cached_classifier("k1", build, tmp_path)
    ev._CLASSIFIER_CACHE.clear()
    assert torch.equal(ev.cached_classifier("k1", build, tmp_path), first) and len(built) == 1
    ev.cached_classifier("k2", build, tmp_path)  # another key is another file
    assert len(built) == 2 and len(list(tmp_path.glob("classifier-*.pt"))) == 2
    (tmp_path / "classifier-k1.pt").write_bytes(b"torn")
    ev._CLASSIFIER_CACHE.clear()
    assert torch.equal(ev.cached_classifier("k1", build, tmp_path), first) and len(built) == 3
    ev._CLASSIFIER_CACHE.clear()


def test_evaluate_command_errors_are_one_line(tmp_path, tiny, capsys):
    from clip_backdoor.cli import main as cli_main

    ckpt = tmp_path / "c.pt"
    write_checkpoint(ckpt, tiny)
    base = ["evaluate", "--checkpoint", str(ckpt), "--eval-n", "4", "--device", "cpu"]
    cases = [
        (base + ["--target", "bananna", "--trigger", "badnet"], "close matches: 'banana'"),
        (base + ["--target", "banana"], "go together"),
        (["evaluate", "--checkpoint", str(tmp_path / "missing.pt")], "does not exist"),
        (base + ["--eval", "imagefolder:" + str(tmp_path)], "apply to --eval synthetic only"),
        (base + ["--target", "banana", "--trigger", "badnet", "--trigger-param", "sise=3"],
         "no parameter sise"),
    ]
    for argv, message in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


def test_trigger_too_large_for_the_images_fails_before_the_loader(random_set, tiny):
    with pytest.raises(UserError, match="larger than the 32x32 image"):
        evaluate_model(tiny, random_set, target=1, trigger=get_trigger("badnet", size=40), workers=2)


# --------------------------------------------------------------------------------------------
# Test-time trigger geometry: squashed like the poisons, clean images centre-cropped
# --------------------------------------------------------------------------------------------
def test_triggered_images_are_squashed_like_the_poisons_clean_ones_cropped(tmp_path):
    """Non-square files: the triggered view is trigger(squash(img)) (the reference's apply_trigger
    resizes to the model resolution first), the clean view is the centre crop. On a wide image the
    two differ, so a patch pasted on the crop would sit on different pixels than at training time."""
    import numpy as np
    from PIL import Image

    from clip_backdoor.attacks.triggers import trigger_image
    from clip_backdoor.data.classification import ImageFolderSet
    from clip_backdoor.data.transforms import preprocess, squash

    rng = np.random.default_rng(0)
    for cls, (h, w) in (("a", (24, 40)), ("b", (40, 24))):  # wide and tall
        (tmp_path / cls).mkdir()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / cls / "0.png")
    eval_set = ImageFolderSet(tmp_path, 16, templates=["a {}."])
    trigger = get_trigger("patch", size=4, location="corner")
    triggered = TriggeredEvalSet(eval_set, trigger, seed=0)
    for i, (path, label) in enumerate(eval_set.items):
        image = Image.open(path).convert("RGB")
        clean, bad, got_label = triggered[i]
        assert got_label == label
        assert torch.equal(clean, preprocess(image, 16))
        expected = trigger_image(image, trigger, 16, torch.Generator().manual_seed(image_seed(0, i)))
        assert torch.equal(bad, expected)
        # The crop and the squash really are different geometries here (else the test proves nothing).
        assert not torch.equal(preprocess(image, 16), squash(image, 16))
        assert not torch.equal(bad, apply_trigger_uint8(clean, trigger, torch.Generator()))


def test_synthetic_eval_views_are_the_rendered_square_images():
    from clip_backdoor.data.classification import open_eval_set

    eval_set = open_eval_set({"kind": "synthetic", "n": 4}, 32)
    for i in range(4):
        clean, to_trigger, label = eval_set.views(i)
        image, same_label = eval_set[i]
        assert label == same_label and torch.equal(clean, image) and torch.equal(to_trigger, image)


# --------------------------------------------------------------------------------------------
# A prepared evaluation set: rendered and triggered once, the same numbers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attacked", [True, False])
def test_prepared_eval_gives_exactly_the_streamed_numbers(tiny, attacked):
    from clip_backdoor.data.classification import open_eval_set
    from clip_backdoor.evaluate import PreparedEval

    eval_set = open_eval_set({"kind": "synthetic", "n": 70, "val_n": 30}, 32)  # batches of 32: ragged
    trigger = get_trigger("badnet", size=8) if attacked else None
    target = "banana" if attacked else None
    prepared = PreparedEval(eval_set, trigger, 3, target)
    kwargs = dict(target=target, trigger=trigger, seed=3, batch_size=32)
    streamed = evaluate_model(tiny, eval_set, **kwargs)
    assert evaluate_model(tiny, prepared, **kwargs) == streamed  # bit for bit, validation split too
    assert "val_acc1" in streamed and len(prepared) == 100
    assert torch.equal(prepared[5][0], eval_set[5][0])
    if attacked:
        with pytest.raises(ValueError, match="another trigger, seed or target"):
            evaluate_model(tiny, prepared, **{**kwargs, "seed": 4})


def test_prepared_model_inputs_are_made_once_and_equal_the_per_batch_conversion(tiny, monkeypatch):
    from clip_backdoor.data.classification import open_eval_set
    from clip_backdoor.evaluate import PreparedEval, image_logits

    eval_set = open_eval_set({"kind": "synthetic", "n": 40}, 32)
    trigger = get_trigger("badnet", size=8)
    prepared = PreparedEval(eval_set, trigger, 3, "banana")
    clean, triggered = prepared.inputs("cpu")
    assert prepared.inputs("cpu")[0] is clean and clean.dtype == torch.float32
    images, attacked, labels = next(prepared.batches(16, "cpu"))
    assert images.dtype == torch.float32 and torch.equal(images, clean[:16])
    classifier = F.normalize(torch.randn(tiny.config["embed_dim"], 10), dim=0)
    pick = labels != eval_set.classes.index("banana")  # the triggered pass's masked pick
    with torch.no_grad():
        for pixels, made in ((prepared.images[:16], images), (prepared.triggered[:16][pick], attacked[pick])):
            assert torch.equal(image_logits(tiny.eval(), pixels, classifier),
                               image_logits(tiny, made, classifier))
    monkeypatch.setattr(PreparedEval, "MAX_BYTES", 1000)  # floats would not fit: uint8 batches, same numbers
    kwargs = dict(target="banana", trigger=trigger, seed=3, batch_size=16)
    small = PreparedEval(eval_set, trigger, 3, "banana")
    assert small.inputs("cpu") is None and next(small.batches(16, "cpu"))[0].dtype == torch.uint8
    assert evaluate_model(tiny, small, **kwargs) == evaluate_model(tiny, prepared, **kwargs) \
        == evaluate_model(tiny, eval_set, **kwargs)


def test_the_loop_prepares_its_eval_set_once_per_process(monkeypatch):
    from clip_backdoor.config import TrainConfig, load_config
    from clip_backdoor.evaluate import PreparedEval
    from clip_backdoor.train import loop

    monkeypatch.setattr(loop, "_PREPARED", {})
    cfg = load_config(TrainConfig, None, ["eval.n=40"])
    a, trigger = loop._eval_parts(cfg, 32)
    b, _ = loop._eval_parts(cfg, 32)
    assert isinstance(a, PreparedEval) and a is b and a.same_attack(trigger, 0, "banana")
    c, _ = loop._eval_parts(load_config(TrainConfig, None, ["eval.n=40", "eval.seed=1"]), 32)
    assert c is not a  # another trigger seed: other triggered images
    monkeypatch.setattr(PreparedEval, "MAX_BYTES", 1000)  # too big to keep: streamed as before
    monkeypatch.setattr(loop, "_PREPARED", {})
    d, _ = loop._eval_parts(cfg, 32)
    assert not isinstance(d, PreparedEval)


def test_evaluation_benchmark_smoke_times_kept_against_per_batch_inputs(tmp_path):
    from _scripts import load_script, run_keeping_threads

    bench = load_script("benchmarks/evaluate.py")
    out = tmp_path / "evaluate.json"
    assert run_keeping_threads(bench.main, ["--n", "40", "--batch-size", "16", "--repeats", "1", "--workers",
                                            "0", "--precisions", "fp32", "--ab-rounds", "2", "--threads",
                                            "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    [ab] = result["prepared_inputs_ab"]  # it exits instead when the two paths' metrics differ
    assert ab["precision"] == "fp32" and ab["rounds"] == 2 and ab["speedup"] > 0
    assert {r["data"] for r in result["rows"]} == {"on the fly", "in memory", "prepared"}
