"""The study keys behind a trustworthy headline (seeds, confidence, validation split, clean baseline),
their bad input, and one tiny end-to-end study that produces environment.json, the clean baselines,
both evaluation splits with per-checkpoint intervals, and the headline sentence."""

from __future__ import annotations

import csv

import pytest
import yaml

from clip_backdoor.cli import main as cli
from clip_backdoor.environment import read_environment
from clip_backdoor.errors import UserError
from clip_backdoor.study import runner, select
from clip_backdoor.study.expand import expand
from clip_backdoor.study.spec import load_spec, parse_spec
from clip_backdoor.study.stats import wilson
from test_study import tiny


def error_of(tmp_path, data: dict) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as info:
        load_spec(path)
    return str(info.value)


@pytest.mark.parametrize("change, message", [
    ({"seeds": 3}, "seeds: expected a list of distinct integers such as [0, 1, 2], got 3"),
    ({"seeds": "0,1,2"}, "seeds: expected a list of distinct integers"),
    ({"seeds": [0, 1, 1]}, "seeds[2]: 1 is listed twice"),
    ({"seeds": [0, 1.5]}, "seeds[1]: 1.5 is not an integer"),
    ({"seeds": [True]}, "seeds[0]: True is not an integer"),
    ({"seeds": []}, "seeds: give at least one training seed"),
    ({"confidence": 1.5}, "confidence: 1.5 must lie strictly between 0 and 1"),
    ({"confidence": 0}, "confidence: 0 must lie strictly between 0 and 1"),
    ({"confidence": 1}, "confidence: 1 must lie strictly between 0 and 1"),
    ({"confidence": "high"}, "confidence: 'high' must lie strictly between 0 and 1"),
    ({"confidence": True}, "confidence: True must lie strictly between 0 and 1"),
    ({"eval": {"n": 40, "val_n": 20, "val_start": 30}}, "eval.val_start: validation images [30, 50) overlap"),
    ({"eval": {"n": 40, "val_fraction": 0.5}}, "eval.val_fraction: applies to imagefolder / labels_csv"),
    ({"eval": {"kind": "imagefolder", "path": "/data/val", "val_n": 100}},
     "eval.val_n: applies to the synthetic"),
    ({"eval": {"kind": "imagefolder", "path": "/data/val", "val_path": "/data/val"}},
     "eval.val_path: '/data/val' is eval.path itself"),
    ({"eval": {"kind": "labels_csv", "path": "/data/l.csv", "val_fraction": 2}},
     "eval.val_fraction: 2.0 must lie in (0, 1)"),
])
def test_bad_input_is_one_line_naming_the_key(tmp_path, change, message):
    text = error_of(tmp_path, tiny(**change))
    assert message in text and "\n" not in text


def test_bad_input_from_the_command_line_is_exit_2(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(tiny()))
    assert cli(["study", "list", str(path), "confidence=95"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "confidence: 95 must lie strictly between 0 and 1" in err
    assert cli(["study", "list", str(path), "seeds=3"]) == 2
    assert "seeds: expected a list" in capsys.readouterr().err


def test_clean_baseline_runs_sort_next_to_their_poisoned_twin(tmp_path):
    spec = parse_spec(tiny(seeds=[0, 1],
                           pretrain={"objectives": ["mmcl", "mmcl+ssl"], "clean_baseline": True}))
    plan = expand(spec, tmp_path / "s")
    pre = [r.name for r in plan.runs if r.stage in ("pretrain", "baseline")]
    assert pre == [f"pretrain/{o}{c},seed={s}" for s in (0, 1) for o in ("mmcl", "mmcl+ssl")
                   for c in ("", ",clean")]
    # As a file browser lists them: per objective, its clean baselines, then its poisoned runs.
    assert sorted(pre) == ["pretrain/mmcl+ssl,clean,seed=0", "pretrain/mmcl+ssl,clean,seed=1",
                           "pretrain/mmcl+ssl,seed=0", "pretrain/mmcl+ssl,seed=1",
                           "pretrain/mmcl,clean,seed=0", "pretrain/mmcl,clean,seed=1",
                           "pretrain/mmcl,seed=0", "pretrain/mmcl,seed=1"]
    for run in plan.runs:
        if run.stage == "baseline":
            twin = plan.run(run.name.replace(",clean", ""))
            assert run.cfg.data.poison_manifest is None and twin.cfg.data.poison_manifest
            same = ("seed", "epochs", "batch_size", "model", "objective", "optim", "eval")
            assert all(getattr(run.cfg, k) == getattr(twin.cfg, k) for k in same)
            assert run.cfg.data.num_samples == twin.cfg.data.num_samples and run.depends_on is None
    assert not any(r.depends_on and ",clean" in r.depends_on for r in plan.runs)  # nothing cleans those
    only_mmcl = parse_spec(tiny(pretrain={"objectives": ["mmcl",
                                                         {"name": "mmcl+ssl", "clean_baseline": True}]}))
    assert [r.name for r in expand(only_mmcl, tmp_path / "t").runs if r.stage == "baseline"] == \
        ["pretrain/mmcl+ssl,clean,seed=0"]


@pytest.fixture(scope="module")
def headline_study(tmp_path_factory):
    spec = parse_spec(tiny(pretrain={"clean_baseline": True}, eval={"n": 40, "val_n": 30, "batch_size": 40},
                           cleaning={"methods": [{"name": "cleanclip", "k": [0]}], "lrs": [1e-3]},
                           confidence=0.9))
    root = tmp_path_factory.mktemp("study") / "tiny"
    assert runner.run_study(spec, root) == 0
    return spec, root


def test_every_run_records_its_environment(headline_study):
    spec, root = headline_study
    for run in expand(spec, root).runs:
        (entry,) = read_environment(root / run.name)
        assert entry["from_epoch"] == 0 and entry["torch"]["threads"] == 1 and entry["packages"]
    assert (root / "report/environment.json").is_file()
    assert "<h2>Environment</h2>" in (root / "report/index.html").read_text()


def test_results_have_the_baseline_both_splits_and_intervals(headline_study):
    _, root = headline_study
    with open(root / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    baseline = [r for r in rows if r["stage"] == "baseline"]
    assert [r["run"] for r in baseline] == ["pretrain/mmcl,clean,seed=0"] and baseline[0]["asr1"] != ""
    for r in rows:
        assert (r["n"], r["val_n"]) == ("40", "30") and r["val_acc1"] != "" and r["val_asr1"] != ""
        for metric, count in select.INTERVALS:
            lo, hi = wilson(round(float(r[metric]) * int(r[count])), int(r[count]), 0.9)  # the study's level
            assert (float(r[f"{metric}_lo"]), float(r[f"{metric}_hi"])) == pytest.approx((lo, hi))
            assert float(r[f"{metric}_lo"]) <= float(r[metric]) <= float(r[f"{metric}_hi"])


def test_headline_shows_floor_validation_finding_and_environment(headline_study, capsys):
    spec, root = headline_study
    headline = (root / "report/headline.md").read_text()
    assert "| clean model acc / ASR (%) |" in headline and "| validation → test |" in headline
    assert "| oracle's optimism |" in headline and "90% Student-t" in headline
    assert "The paper's finding" in headline and "cannot be tested" in headline  # no MMCL+SSL runs here
    assert "Threshold-free" in headline and "**Environment** (recorded by 3 of 3 runs)" in headline
    assert "All recorded runs ran in this same environment." in headline
    runner.report(expand(spec, root))
    printed = capsys.readouterr().out
    assert "The paper's finding" in printed and "**Environment**" in printed


def test_only_pretrain_includes_the_clean_baselines(tmp_path, monkeypatch):
    import clip_backdoor.train.loop as loop

    trained = []
    monkeypatch.setattr(loop, "train", lambda cfg, recipe=None: trained.append(cfg.run_dir) or {})
    spec = parse_spec(tiny(pretrain={"clean_baseline": True}))
    assert runner.run_study(spec, tmp_path / "s", only="pretrain") == 0
    names = ("pretrain/mmcl,clean,seed=0", "pretrain/mmcl,seed=0")
    assert sorted(trained) == [str(tmp_path / "s" / n) for n in names]
