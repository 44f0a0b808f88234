"""Defences and detection in a study: spec expansion and validation, the runner's detect and filter
steps end to end on a study that trains in seconds, and the report's defended rows and AUROC."""

import csv
import json

import pytest
import yaml

from clip_backdoor.cli import main as cli
from clip_backdoor.errors import UserError
from clip_backdoor.study import select
from clip_backdoor.study.expand import expand
from clip_backdoor.study.report import detection_display, read_detection
from clip_backdoor.study.spec import load_spec, parse_spec

SAFE = {"name": "safeclip", "params": {"inmodal_warmup": 1, "multimodal_warmup": 1, "bank_size": 32}}
ROCLIP = {"name": "roclip", "params": {"period": 2, "pool_size": 32}}
FILTER = {"name": "filter", "params": {"detector": "dao", "budget": 0.25}}


def tiny(**sections) -> dict:
    """Three defences of one objective on 192 pairs (24 poisoned), two epochs, no cleaning."""
    spec = {
        "name": "tinydef",
        "seeds": [0],
        "data": {"num_samples": 192, "workers": 0, "world": {"seed": 0}},
        "attack": {"n": 24, "target": "banana", "trigger_params": {"size": 8}},
        "pretrain": {"objectives": ["mmcl"], "epochs": 3, "batch_size": 48, "lr": 2e-3, "warmup_steps": 2,
                     "defenses": [SAFE, ROCLIP, FILTER]},
        "detection": {"detectors": ["kdist", "lid"], "batch_size": 96, "k": 4, "lid_k": 8},
        "cleaning": {"methods": []},
        "eval": {"n": 40, "batch_size": 40},
        "run": {"jobs": 1, "threads": 1},
    }
    for name, values in sections.items():
        spec[name] = {**spec[name], **values} if isinstance(spec.get(name), dict) else values
    return spec


def error_of(tmp_path, data: dict) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as info:
        load_spec(path)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------
def test_expansion_adds_defended_runs_next_to_the_undefended_ones(tmp_path):
    spec = parse_spec(tiny(seeds=[0, 1], pretrain={"objectives": ["mmcl", "mmcl+ssl"]}))
    plan = expand(spec, tmp_path / "s")
    names = [r.name for r in plan.runs]
    per_seed = ["pretrain/{o},seed={s}".format(o=o, s="{s}") for o in ("mmcl", "mmcl+ssl")]
    per_seed += [f"pretrain/{o},defense={d},seed={{s}}" for o in ("mmcl", "mmcl+ssl")
                 for d in ("safeclip", "roclip", "filter-dao-0.25")]
    assert names == [n.format(s=s) for s in (0, 1) for n in per_seed]
    run = plan.run("pretrain/mmcl+ssl,defense=safeclip,seed=1")
    assert run.pretrain == "mmcl+ssl,defense=safeclip" and run.cfg.defense == "safeclip"
    assert run.cfg.defense_params["inmodal_warmup"] == 1 and run.cfg.defense_params["share_cap"] == 0.85
    assert run.cfg.objective.ssl_weight == 1.0 and run.depends_on is None and run.after is None
    base = plan.run("pretrain/mmcl,seed=0")
    assert base.after["kind"] == "detect" and base.after["detectors"] == ["kdist", "lid", "dao"]  # + filter's
    assert base.after["out"] == str(tmp_path / "s" / "pretrain" / "mmcl,seed=0" / "detection")
    filt = plan.run("pretrain/mmcl,defense=filter-dao-0.25,seed=0")
    assert filt.depends_on == "pretrain/mmcl,seed=0" and filt.cfg.defense is None
    detection = tmp_path / "s" / "pretrain" / "mmcl,seed=0" / "detection"
    assert filt.before["scores"] == str(detection / "scores.csv")
    assert filt.cfg.data.poison_manifest == str(
        tmp_path / "s" / "data" / "filtered" / "mmcl,defense=filter-dao-0.25,seed=0" / "manifest.csv")
    assert filt.before["budget"] == 0.25 and filt.before["detector"] == "dao"


def test_no_detection_without_detectors_or_a_filter(tmp_path):
    spec = parse_spec(tiny(pretrain={"defenses": [SAFE]}, detection={"detectors": []}))
    assert all(r.after is None and r.before is None for r in expand(spec, tmp_path).runs)


@pytest.mark.parametrize(("change", "message"), [
    ({"pretrain": {"defenses": ["safe-clip"]}}, "pretrain.defenses[0]: unknown defense 'safe-clip'"),
    ({"pretrain": {"defenses": [{"name": "filter", "params": {"detector": "dao"}}]}},
     "pretrain.defenses[0].params.budget: required"),
    ({"pretrain": {"defenses": [{"name": "filter", "params": {"detector": "lof", "budget": 0.1}}]}},
     "pretrain.defenses[0].params.detector: 'lof' is not one of kdist, lid, dao"),
    ({"pretrain": {"defenses": [{"name": "filter", "params": {"budget": 1.5}}]}},
     "pretrain.defenses[0].params.budget: 1.5 must be a fraction"),
    ({"pretrain": {"defenses": [{"name": "safeclip", "params": {"inmodal_warmup": 3}}]}},
     "pretrain.defenses[0]: defense safeclip: inmodal_warmup + multimodal_warmup = 3 + 1 leaves no filtering "
     "epoch in a run of epochs=3"),
    ({"pretrain": {"defenses": [{"name": "roclip", "params": {"period": 4}}]}},
     "pretrain.defenses[0]: defense roclip: period=4 exceeds epochs=3"),
    ({"pretrain": {"objectives": ["ssl"], "defenses": ["roclip"]}}, "replaces the MMCL term"),
    ({"pretrain": {"defenses": ["roclip", {"name": "roclip", "params": {"period": 3}}]}},
     "pretrain.defenses (labels; give each a label)[1]: 'roclip' is listed twice"),
    ({"pretrain": {"defenses": [{"name": "roclip", "lr": 1}]}}, "pretrain.defenses[0].lr: unknown key"),
    ({"pretrain": {"defenses": [{"name": 3}]}}, "pretrain.defenses[0].name: expected a defence name, got 3"),
    ({"pretrain": {"defenses": [{"name": "roclip", "params": [1]}]}},
     "pretrain.defenses[0].params: expected a mapping, got [1]"),
    ({"detection": {"detectors": ["dao", "lof"]}}, "detection.detectors: unknown detector 'lof'"),
    ({"detection": {"k": 200}},
     "detection.k=200 needs 201 reference points, but a batch of 96 pairs gives 190"),
    ({"data": {"kind": "wds", "path": "x-{0..1}.tar"}},
     "filter-then-retrain reads a subset of the rows, which needs data.kind synthetic or csv"),
])
def test_bad_defense_and_detection_settings_name_their_key(tmp_path, change, message):
    assert message in error_of(tmp_path, tiny(**change))


def test_labels_and_order_of_defended_models():
    assert select.objective_label("mmcl+ssl,defense=safeclip") == "MMCL+SSL + SafeCLIP"
    assert select.objective_label("mmcl,defense=filter-dao-0.1") == "MMCL + filter-then-retrain (dao, 0.1)"
    names = ["mmcl+ssl", "mmcl,defense=roclip", "mmcl+ssl,defense=safeclip", "mmcl", "mmcl,defense=safeclip",
             "mmcl,defense=filter-dao-0.1"]
    assert sorted(names, key=select.objective_key) == [
        "mmcl", "mmcl,defense=safeclip", "mmcl,defense=roclip", "mmcl,defense=filter-dao-0.1", "mmcl+ssl",
        "mmcl+ssl,defense=safeclip"]


def test_a_defended_model_at_low_asr_is_not_an_unlearned_backdoor():
    rows = [{"seed": "0", "stage": "pretrain", "pretrain": p, "epoch": "1", "acc1": "0.5", "asr1": a}
            for p, a in (("mmcl", "0.9"), ("mmcl,defense=safeclip", "0.01"))]
    assert select.unlearned_backdoors(rows) == [] and select.uneven_backdoors(rows) == []
    rows.append({"seed": "0", "stage": "pretrain", "pretrain": "mmcl+ssl", "epoch": "1", "acc1": "0.5",
                 "asr1": "0.02"})
    assert select.unlearned_backdoors(rows) == ["MMCL+SSL"]


def _pre(seed, pretrain, acc, asr, epoch=2):
    return {"seed": str(seed), "stage": "pretrain", "pretrain": pretrain, "epoch": str(epoch),
            "acc1": str(acc), "asr1": str(asr)}


def test_defence_effects_are_paired_by_seed_against_the_same_objective_undefended():
    import math
    import statistics

    from clip_backdoor.study.defense_effects import defense_display, defense_effects, defense_sentences

    undefended = {0: (0.40, 0.90), 1: (0.36, 0.96), 2: (0.38, 0.99)}
    defended = {0: (0.20, 0.30), 1: (0.15, 0.04), 2: (0.18, 0.10), 3: (0.5, 0.0)}  # seed 3: no partner
    rows = [_pre(s, "mmcl", *v) for s, v in undefended.items()]
    rows += [_pre(s, "mmcl", 0.1, 0.1, epoch=1) for s in undefended]  # an earlier epoch: not the model
    rows += [_pre(s, "mmcl,defense=safeclip", *v) for s, v in defended.items()]
    rows += [_pre(0, "mmcl+ssl", 0.4, 0.8)]  # another objective, undefended only: no effect record
    [effect] = defense_effects(rows)
    assert effect["pretrain"] == "mmcl,defense=safeclip" and effect["seeds"] == [0, 1, 2]
    d = [defended[s][1] - undefended[s][1] for s in (0, 1, 2)]  # by hand
    t = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(3))
    test = effect["asr1_test"]
    assert test.n == 3 and math.isclose(test.mean, statistics.fmean(d)) and math.isclose(test.t, t)
    assert effect["asr1_change"] == pytest.approx(d)
    assert effect["acc1_change"] == pytest.approx([-0.20, -0.21, -0.20])
    assert effect["kept_out"] == 1  # only seed 1 at ASR <= 5%
    [row] = defense_display([effect])
    assert row["pre-training"] == "MMCL + SafeCLIP" and row["seeds at ASR ≤ 5%"] == "1 / 3"
    assert row["ASR: undefended → defended (%)"] == "95.0 → 14.7"
    assert row["defended ASR per seed (%)"] == "30.0, 4.0, 10.0"
    text = defense_sentences([effect])
    assert text.startswith("MMCL + SafeCLIP against MMCL undefended, paired over 3 seeds: ASR 95.0% → 14.7%")
    assert "kept out (ASR ≤ 5%) in 1 of 3 seeds" in text


def test_a_defences_study_headline_speaks_of_the_defences_not_of_cleaning():
    from clip_backdoor.study.headline import conclusions, headline_rows

    rows = [_pre(s, p, 0.4, a) for s in (0, 1, 2) for p, a in (("mmcl", 0.9), ("mmcl,defense=roclip", 0.2))]
    text = conclusions(rows)
    assert "MMCL + RoCLIP against MMCL undefended" in text and "paper's finding" not in text
    assert [r["cleaning"] for r in headline_rows(rows)] == ["(undefended; not cleaned)",
                                                           "(defended; not cleaned)"]
    cleaning = [{"seed": "0", "stage": "clean", "pretrain": "mmcl", "method": "cleanclip", "k": "0",
                 "lr": "1e-4", "epoch": "1", "acc1": "0.3", "asr1": "0.5", "run": "r"}]
    both = conclusions(rows + cleaning)  # with cleaning runs the paper's finding is back
    assert "paper's finding" in both and "MMCL + RoCLIP against" in both
    assert "defence" not in conclusions(rows[:1] + cleaning)  # no defended model: no defence sentence


# --------------------------------------------------------------------------------------------
# Runner, end to end
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    path = root / "tinydef.yaml"
    path.write_text(yaml.safe_dump(tiny()))
    assert cli(["study", "run", str(path), "--out", str(root / "out")]) == 0
    return path, root / "out"


def test_study_runs_defences_detection_and_filter(finished):
    _, out = finished
    for name in ("mmcl,seed=0", "mmcl,defense=safeclip,seed=0", "mmcl,defense=roclip,seed=0",
                 "mmcl,defense=filter-dao-0.25,seed=0"):
        assert (out / "pretrain" / name / "finished.json").is_file(), name
    summary = json.loads((out / "pretrain" / "mmcl,seed=0" / "detection" / "detection.json").read_text())
    assert summary["n_rows"] == 192 and summary["n_poison"] == 24 and set(summary["metrics"]) == {
        "kdist", "lid", "dao"}
    info = json.loads((out / "data" / "filtered" / "mmcl,defense=filter-dao-0.25,seed=0" / "poison.json")
                      .read_text())
    assert info["subset"] and info["n_rows"] == 144 and info["filtered"]["n_removed"] == 48
    assert info["n_poison"] + info["filtered"]["n_poison_removed"] == 24
    run_dir = out / "pretrain" / "mmcl,defense=filter-dao-0.25,seed=0"
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["resolved"]["steps_per_epoch"] == 3  # 144 kept pairs / batch 48: it trained on the subset
    safe = [json.loads(line) for line in
            (out / "pretrain" / "mmcl,defense=safeclip,seed=0" / "metrics.jsonl").read_text().splitlines()]
    assert "loss_inmodal" in safe[0] and safe[1]["lr"] == 5e-6 and safe[0]["method"]["name"] == "safeclip"
    with open(out / "results.csv", newline="") as f:
        pretrains = {r["pretrain"] for r in csv.DictReader(f)}
    assert pretrains == {"mmcl", "mmcl,defense=safeclip", "mmcl,defense=roclip",
                         "mmcl,defense=filter-dao-0.25"}
    rows = read_detection(out / "detection.csv")
    assert {(r["kind"], r["detector"]) for r in rows} == {("scores", "kdist"), ("scores", "lid"),
                                                          ("scores", "dao"), ("filter", "dao")}
    scores, filters = detection_display(rows)
    assert [r["detector"] for r in scores] == ["kdist", "lid", "dao"]
    assert filters[0]["pairs removed"] == "48" and filters[0]["pre-training"].startswith("MMCL + filter")
    page = (out / "report" / "index.html").read_text()
    assert "Poisoned-sample detection" in page and "MMCL + SafeCLIP" in page
    assert (out / "report" / "detection.md").is_file()
    headline = (out / "report" / "headline.md").read_text()
    assert "MMCL + RoCLIP" in headline and "(defended; not cleaned)" in headline
    assert "MMCL + SafeCLIP against MMCL undefended, paired over 1 seed" in headline
    assert "Defences against the same objective undefended" in page
    assert "The study has no cleaning stage" in page and "has no cleaning runs yet" not in page
    effects = (out / "report" / "defenses.md").read_text()
    assert "MMCL + filter-then-retrain (dao, 0.25)" in effects
    with open(out / "report" / "defenses.csv", newline="") as f:
        assert {r["defense"] for r in csv.DictReader(f)} == {"safeclip", "roclip", "filter-dao-0.25"}


def test_a_rerun_trains_nothing_and_a_missing_detection_is_redone(finished, caplog):
    path, out = finished
    detection = out / "pretrain" / "mmcl,seed=0" / "detection" / "detection.json"
    before = detection.read_text()
    with caplog.at_level("INFO"):
        assert cli(["study", "run", str(path), "--out", str(out)]) == 0
    assert "skipping 4 finished runs (of 4)" in caplog.text
    detection.unlink()
    caplog.clear()
    with caplog.at_level("INFO"):
        assert cli(["study", "run", str(path), "--out", str(out)]) == 0
    assert "1 runs to do" in caplog.text and "is finished (epoch 3 of 3); nothing to do" in caplog.text
    redone = json.loads(detection.read_text())
    old = json.loads(before)
    assert redone["metrics"] == old["metrics"]  # the same model and batches: the same scores
