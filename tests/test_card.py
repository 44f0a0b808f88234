"""`clip-backdoor inspect` and the card `export` writes: what a checkpoint is, read back from what the
run recorded, checked against the files it came from (manifest rows counted here, metrics.jsonl)."""

import csv
import json
import logging
import shutil
from pathlib import PurePosixPath

import pytest
import torch

import clip_backdoor
from clip_backdoor.card import build_card, format_card, parameter_count, unlearned_line
from clip_backdoor.cli import main as cli
from clip_backdoor.fileio import read_jsonl
from clip_backdoor.models import create_model, get_model_config
from clip_backdoor.train.checkpoint import open_clip_config
from clip_backdoor.weights import load_checkpoint
from conftest import SMALL


def inspect_json(path, capsys) -> dict:
    capsys.readouterr()
    assert cli(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def manifest_counts(manifest):
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    return sum(r["is_poison"] == "1" for r in rows), len(rows)


def test_inspect_a_poisoned_pretraining_checkpoint(poisoned_run, capsys):
    poisoned, pre, _ = poisoned_run
    card = inspect_json(pre / "checkpoints" / "latest.pt", capsys)
    n_poison, n_rows = manifest_counts(poisoned / "manifest.csv")
    assert (n_poison, n_rows) == (50, 256)
    p = card["poisoning"]
    assert (p["trigger"], p["target"], p["mode"], p["poison_seed"]) == ("badnet", "banana", "dirty", 3)
    assert (p["n_poison"], p["n_rows"], p["rate"]) == (n_poison, n_rows, n_poison / n_rows)
    assert p["manifest"] == str((poisoned / "manifest.csv").absolute())
    assert card["stage"] == "pretrain" and card["objective"]["name"] == "mmcl"
    assert (card["epoch"], card["epochs"], card["step"]) == (2, 2, 8)
    assert card["data"]["kind"] == "synthetic" and card["data"]["num_samples"] == 256
    assert card["start"] is None and card["method"] is None
    # parameters: counted independently on a freshly built model of the same config
    assert card["model"]["name"] == "tiny"
    assert card["model"]["parameters"] == sum(q.numel() for q in create_model("tiny", seed=0).parameters())
    last = read_jsonl(pre / "metrics.jsonl")[-1]
    assert card["metrics"]["last"] == last and card["metrics"]["last_evaluated"] == last
    assert card["toolkit"]["version"] == clip_backdoor.__version__

    capsys.readouterr()
    assert cli(["inspect", str(pre / "checkpoints" / "latest.pt")]) == 0
    text = capsys.readouterr().out
    for piece in ("tiny", f"{card['model']['parameters']:,} parameters", "pre-training, objective mmcl",
                  "epoch 2 of 2", "256 rows", "'banana'", "50 poisons of 256 rows (19.5%)", "poison seed 3",
                  f"acc1 {100 * last['acc1']:.1f}%", f"asr1 {100 * last['asr1']:.1f}%",
                  f"clip-backdoor {clip_backdoor.__version__}"):
        assert piece in text, piece
    assert len(text.splitlines()) <= 24  # one screen


def test_inspect_a_cleaned_checkpoint_names_its_start_and_method(poisoned_run, capsys):
    _, pre, cl = poisoned_run
    card = inspect_json(cl / "checkpoints" / "latest.pt", capsys)
    assert card["stage"] == "clean" and card["method"] == {"name": "cleanclip", "ssl_weight": 1.0}
    assert card["poisoning"] is None  # the cleaning set has no poisons
    assert card["data"]["num_samples"] == 64 and card["data"]["poisoning"]["kind"] == "cleaning_set"
    start = card["start"]
    assert start["path"] == str((pre / "checkpoints" / "latest.pt").absolute())
    assert start["epoch"] == 2 and start["stage"] == "pretrain"
    assert start["data"]["poisoning"]["n_poison"] == 50
    assert start["metrics"] == read_jsonl(pre / "metrics.jsonl")[-1]
    # recorded at training time: still known when the starting checkpoint is gone
    latest = pre / "checkpoints" / "latest.pt"
    latest.rename(latest.with_suffix(".away"))
    try:
        assert inspect_json(cl / "checkpoints" / "latest.pt", capsys)["start"] == start
    finally:
        latest.with_suffix(".away").rename(latest)
    capsys.readouterr()
    assert cli(["inspect", str(cl / "checkpoints" / "latest.pt")]) == 0
    text = capsys.readouterr().out
    for piece in ("cleaning with cleanclip (ssl_weight 1.0)", "clean data (cleaning set", "started from",
                  "trained on poisoned data: badnet -> 'banana', 50 poisons"):
        assert piece in text, piece


def test_the_record_survives_a_moved_checkpoint(poisoned_run, tmp_path, capsys):
    """Copied elsewhere, without its run directory or manifest, a checkpoint still says what it is."""
    poisoned, pre, _ = poisoned_run
    moved = tmp_path / "released.pt"
    shutil.copy(pre / "checkpoints" / "latest.pt", moved)
    shutil.copytree(poisoned, tmp_path / "kept")
    shutil.rmtree(poisoned)
    try:
        card = inspect_json(moved, capsys)
    finally:
        shutil.copytree(tmp_path / "kept", poisoned)
    assert card["poisoning"]["n_poison"] == 50 and card["poisoning"]["poison_seed"] == 3
    assert card["metrics"]["last"] == read_jsonl(pre / "metrics.jsonl")[-1]  # from the checkpoint itself


def test_an_older_checkpoint_is_read_from_its_config_and_manifest(poisoned_run, tmp_path, capsys):
    """Checkpoints written before the record: poisoning from data.poison_manifest and its poison.json,
    metrics from the metrics.jsonl beside the checkpoint."""
    _, pre, _ = poisoned_run
    ckpt = load_checkpoint(pre / "checkpoints" / "epoch_1.pt")
    for key in ("version", "data", "method", "start", "metrics"):
        ckpt.pop(key)
    run = tmp_path / "old"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, run / "checkpoints" / "epoch_1.pt")
    shutil.copy(pre / "metrics.jsonl", run / "metrics.jsonl")
    card = inspect_json(run / "checkpoints" / "epoch_1.pt", capsys)
    assert card["poisoning"]["n_poison"] == 50 and card["poisoning"]["target"] == "banana"
    assert card["toolkit"]["version"] is None
    assert card["metrics"]["last"] == read_jsonl(pre / "metrics.jsonl")[0]  # epoch 1, not the later line
    assert "(not recorded)" in format_card(card)


def test_inspect_bad_input_is_one_line(tmp_path, poisoned_run, capsys):
    poisoned, _, _ = poisoned_run
    pickled = tmp_path / "code.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "f": PurePosixPath("x")}, pickled)
    for path, says in [(poisoned / "manifest.csv", "is not a clip-backdoor checkpoint"),
                       (tmp_path / "missing.pt", "does not exist"), (tmp_path, "is a directory"),
                       (pickled, "holds objects other than tensors")]:
        capsys.readouterr()
        assert cli(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err


def test_parameter_count_leaves_out_batch_norm_statistics():
    model = create_model("tiny", seed=0)
    assert parameter_count(model.state_dict()) == sum(p.numel() for p in model.parameters())
    assert sum(v.numel() for v in model.state_dict().values()) > parameter_count(model.state_dict())


# ------------------------------------------------------------------------------------------------
# The one line when the backdoor is not learned
# ------------------------------------------------------------------------------------------------
# a poisoning as poison.json records it (trigger parameters resolved)
POISONED = {"data": {"poisoning": {"n_poison": 25, "rate": 0.005, "trigger": "badnet",
                                   "trigger_params": {"location": "random", "mode": "clip", "size": 8}}}}
EVAL = {"eval": {"trigger": "badnet", "trigger_params": {"size": 8}}}


def test_unlearned_line_uses_the_study_reports_threshold():
    from clip_backdoor.study.select import unlearned_backdoors

    rows = [{"epoch": 1, "asr1": 0.9}, {"epoch": 2, "asr1": 0.05}]
    line = unlearned_line(EVAL, POISONED, rows)
    assert line.startswith("backdoor not learned: asr1 5.0% at epoch 2") and "25 poisons (0.5%)" in line
    assert line.endswith("try a larger trigger, more poisons or more epochs")  # eval and poisons agree
    defended = unlearned_line({**EVAL, "defense": "roclip"}, POISONED, rows)  # the defence worked
    assert defended.endswith("under the roclip defence: compare with the same run undefended")
    # the study report's warning draws the line in the same place
    study_rows = [{"stage": "pretrain", "pretrain": "mmcl", "seed": 0, "epoch": 2, "asr1": a, "acc1": 0.5}
                  for a in (0.05,)]
    assert unlearned_backdoors(study_rows) == ["MMCL"]
    assert unlearned_line(EVAL, POISONED, [{"epoch": 2, "asr1": 0.0501}]) is None
    assert unlearned_backdoors([{**study_rows[0], "asr1": 0.0501}]) == []
    assert unlearned_line(EVAL, {"data": {"poisoning": None}}, rows) is None  # clean data: nothing to learn
    assert unlearned_line(EVAL, {"data": {"poisoning": {"n_poison": 0}}}, rows) is None
    assert unlearned_line(EVAL, POISONED, [{"epoch": 2, "asr1": float("nan")}]) is None  # no ASR measured


def test_unlearned_line_names_a_mismatched_evaluation_trigger():
    line = unlearned_line({"eval": {"trigger": "badnet", "trigger_params": {}}}, POISONED,
                          [{"epoch": 1, "asr1": 0.01}])
    assert "the evaluation's trigger is another" in line and '"size": 8' in line


def test_unlearned_line_of_a_cleaning_run_looks_at_its_starting_model():
    config = {"init_checkpoint": "pre.pt"}
    start = {"start": {"data": POISONED["data"], "metrics": {"asr1": 0.9}}}
    line = unlearned_line(config, start, [{"epoch": 0, "asr1": 0.02}, {"epoch": 1, "asr1": 0.01}])
    assert line.startswith("backdoor not learned by the starting checkpoint: asr1 2.0%")
    assert unlearned_line(config, start, [{"epoch": 0, "asr1": 0.9}, {"epoch": 1, "asr1": 0.01}]) is None
    # without an epoch 0, the starting checkpoint's own last metrics decide
    assert unlearned_line(config, start, [{"epoch": 1, "asr1": 0.01}]) is None
    clean_start = {"start": {"data": {"poisoning": None}, "metrics": {"asr1": 0.01}}}
    assert unlearned_line(config, clean_start, [{"epoch": 0, "asr1": 0.01}]) is None


def test_pretrain_ends_with_the_line_exactly_when_the_backdoor_is_not_learned(tmp_path, caplog):
    """Poisons the tiny model cannot learn in one epoch (2 of 256, a 4 px patch), evaluated on 60 images."""
    from clip_backdoor.evaluate import backdoor_not_learned

    assert cli(["poison", "--num-samples", "256", "--n", "2", "--format", "manifest",
                "--out", str(tmp_path / "p")]) == 0
    with caplog.at_level(logging.WARNING):
        assert cli(["pretrain", "--run-dir", str(tmp_path / "r"), "--epochs", "1", *SMALL,
                    f"data.poison_manifest={tmp_path / 'p' / 'manifest.csv'}"]) == 0
    asr = read_jsonl(tmp_path / "r" / "metrics.jsonl")[-1]["asr1"]
    said = [r.getMessage() for r in caplog.records if "backdoor not learned" in r.getMessage()]
    assert len(said) == int(backdoor_not_learned(asr)), (asr, said)
    assert backdoor_not_learned(asr), f"asr1 {asr}: this setting was meant not to learn the backdoor"


# ------------------------------------------------------------------------------------------------
# export: card.json and the open_clip model config
# ------------------------------------------------------------------------------------------------
# open_clip's model_configs/RN50.json and ViT-B-32.json (typed from open_clip, which tests never import),
# and the fields of its CLIPVisionCfg / CLIPTextCfg our configs use.
OPEN_CLIP_RN50 = {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64,
                                                    "patch_size": None},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                               "layers": 12}}
OPEN_CLIP_VIT_B_32 = {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768,
                                                       "patch_size": 32},
                      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                                   "layers": 12}}
OPEN_CLIP_TOP = {"embed_dim": int, "quick_gelu": bool, "vision_cfg": dict, "text_cfg": dict}
OPEN_CLIP_VISION = {"layers": (int, list), "width": int, "head_width": int, "mlp_ratio": float,
                    "patch_size": (int, type(None)), "image_size": int}
OPEN_CLIP_TEXT = {"context_length": int, "vocab_size": int, "width": int, "heads": int, "layers": int,
                  "mlp_ratio": float}
OPEN_CLIP_DEFAULTS = {"vision_cfg": {"head_width": 64, "mlp_ratio": 4.0}, "text_cfg": {"mlp_ratio": 4.0}}


def check_open_clip_schema(config: dict) -> None:
    assert set(config) <= set(OPEN_CLIP_TOP) and {"embed_dim", "vision_cfg", "text_cfg"} <= set(config)
    for key, types in OPEN_CLIP_TOP.items():
        if key in config:
            assert isinstance(config[key], types), key
    for section, schema in (("vision_cfg", OPEN_CLIP_VISION), ("text_cfg", OPEN_CLIP_TEXT)):
        assert set(config[section]) <= set(schema), set(config[section]) - set(schema)
        for key, value in config[section].items():
            assert isinstance(value, schema[key]) and not isinstance(value, bool), (section, key, value)


@pytest.mark.parametrize("name, reference", [("RN50", OPEN_CLIP_RN50), ("ViT-B-32", OPEN_CLIP_VIT_B_32)])
def test_open_clip_config_of_the_paper_models_is_open_clips_own(name, reference):
    config = open_clip_config({"model": {"name": name, **get_model_config(name)}})
    check_open_clip_schema(config)
    for section in ("vision_cfg", "text_cfg"):
        expected = {**OPEN_CLIP_DEFAULTS[section], **reference[section]}
        assert {k: config[section].get(k, expected[k]) for k in expected} == expected, section
    assert config["embed_dim"] == reference["embed_dim"] and config["quick_gelu"] is True


def test_export_writes_card_and_open_clip_config(poisoned_run, tmp_path, capsys):
    from safetensors.torch import load_file

    _, pre, cl = poisoned_run
    out = tmp_path / "export" / "cleaned.safetensors"
    source = cl / "checkpoints" / "latest.pt"
    assert cli(["export", str(source), "--safetensors", str(out)]) == 0
    card = json.loads((out.parent / "card.json").read_text())
    assert card.pop("export") == {"weights": "cleaned.safetensors", "format": "safetensors",
                                  "open_clip_config": "cleaned.json", "open_clip_model_name": "cleaned"}
    assert card == inspect_json(source, capsys)  # the same facts as inspect
    config = json.loads((out.parent / "cleaned.json").read_text())
    check_open_clip_schema(config)
    ckpt = load_checkpoint(source)
    assert {"name": "tiny", **config} == ckpt["model"]
    # the config builds the architecture the weights fit, key for key (our names are open_clip's)
    model = create_model(out.parent / "cleaned.json", seed=1)
    weights = load_file(str(out))
    assert weights.keys() == model.state_dict().keys()
    model.load_state_dict(weights)
    assert all(torch.equal(model.state_dict()[k], ckpt["state_dict"][k]) for k in weights)
    # inspect of the exported weights reads the card beside them
    exported = inspect_json(out, capsys)
    assert exported["stage"] == "clean" and exported["start"]["path"] == card["start"]["path"]


def test_export_refuses_a_name_that_would_overwrite_the_card(poisoned_run, tmp_path, capsys):
    _, pre, _ = poisoned_run
    assert cli(["export", str(pre / "checkpoints" / "latest.pt"), "--safetensors",
                str(tmp_path / "card.safetensors")]) == 2
    assert "card.json" in capsys.readouterr().err


def test_card_of_a_plain_state_dict(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save(create_model("tiny", seed=0).state_dict(), path)
    card = build_card(load_checkpoint(path), path)
    assert card["stage"] is None and card["poisoning"] is None
    assert "plain weights (no training record)" in format_card(card)
