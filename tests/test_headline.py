"""The headline's new parts on constructed results with known answers: the threshold-free rule, the
clean baseline, validation-selected test-reported picks and the oracle's optimism, per-checkpoint
Wilson intervals, and the report's environment section (shown once; differing runs named)."""

from __future__ import annotations

import json

import pytest

from clip_backdoor.errors import UserError
from clip_backdoor.study import select
from clip_backdoor.study.headline import headline_table
from clip_backdoor.study.report import study_confidence, write_report
from clip_backdoor.study.select import (
    COLUMNS,
    KEEP_RULE,
    Point,
    clean_baselines,
    interval_cells,
    min_asr_keeping,
    read_results,
    select_per_seed,
    selection_table,
)
from clip_backdoor.study.stats import wilson
from test_report import write_study
from test_select import pick, row, run


# --------------------------------------------------------------------------------------------
# The threshold-free rule
# --------------------------------------------------------------------------------------------
def test_min_asr_keeping_90_percent_of_the_poisoned_accuracy():
    points = [Point(1e-4, 1, 0.46, 0.30), Point(1e-4, 2, 0.45, 0.20),  # 0.45 = exactly 90% of 0.50: kept
              Point(1e-3, 1, 0.449, 0.01), Point(1e-3, 2, 0.30, 0.0),  # lost too much
              Point(1e-5, 1, 0.49, 0.20)]  # ties at ASR 0.20: the higher accuracy wins
    assert min_asr_keeping(points, 0.50) == (points[4], "ok")
    assert min_asr_keeping(points[2:4], 0.50) == (None, "none")
    assert min_asr_keeping(points, None) == (None, "no-baseline")
    assert min_asr_keeping([], 0.5) == (None, "no-points")
    rows = run(1e-4, [(0.46, 0.30), (0.45, 0.20)]) + run(1e-3, [(0.449, 0.01), (0.30, 0.0)])
    r = pick(select_per_seed(rows), KEEP_RULE)
    assert (r["asr1"], r["acc1"], r["lr"], r["epoch"], r["peeks_at_asr"]) == (0.20, 0.45, 1e-4, 2, True)
    assert pick(select_per_seed(rows), "min-asr")["asr1"] == 0.0  # the τ-free rule is not min-asr


# --------------------------------------------------------------------------------------------
# The clean baseline
# --------------------------------------------------------------------------------------------
def baseline_rows(seed=0, pretrain="mmcl", per_epoch=((0.52, 0.02), (0.55, 0.03), (0.56, 0.01))):
    return [row(seed, "baseline", pretrain, epoch=e, acc1=a, asr1=s) for e, (a, s) in enumerate(per_epoch, 1)]


def test_clean_baseline_is_measured_at_the_poisoned_models_epoch():
    rows = [row(0, "pretrain", "mmcl", epoch=e, acc1=0.5, asr1=0.9) for e in (1, 2, 3)]
    rows += run(1e-4, [(0.45, 0.01)], poisoned=(0.5, 0.9))
    for r in rows:
        if r["stage"] == "clean":
            r["start_epoch"] = 2  # cleaning starts from pre-training epoch 2
    rows += baseline_rows()
    assert clean_baselines(rows)[(0, "mmcl")]["acc1"] == 0.55  # epoch 2, like the poisoned model
    assert clean_baselines(rows[::-1])[(0, "mmcl")]["acc1"] == 0.55  # whatever the row order
    only_baseline = [r for r in rows if r["stage"] != "clean"]  # no start epoch: the last epochs
    assert clean_baselines(only_baseline)[(0, "mmcl")]["acc1"] == 0.56
    assert (0, "mmcl") in select.poisoned_models(rows)  # the baseline is never the poisoned model
    assert select.poisoned_models(rows)[(0, "mmcl")]["acc1"] == 0.5
    table = headline_table(rows)
    assert "| clean model acc / ASR (%) |" in table
    assert "| MMCL | 50.0 / 90.0 | 55.0 / 3.0 | CleanCLIP |" in table
    assert "Clean model: the same pre-training without poisons" in table
    assert "clean model" not in headline_table([r for r in rows if r["stage"] != "baseline"])


# --------------------------------------------------------------------------------------------
# Validation-selected, test-reported
# --------------------------------------------------------------------------------------------
def val_run(lr, points, **kwargs):
    """A cleaning run whose epochs carry (acc1, asr1, val_acc1, val_asr1)."""
    rows = run(lr, [(a, s) for a, s, _, _ in points], **kwargs)
    rows[0].update(val_acc1=rows[0]["acc1"], val_asr1=rows[0]["asr1"])
    for r, (_, _, va, vs) in zip(rows[1:], points):
        r.update(val_acc1=va, val_asr1=vs)
    return rows


def test_validation_chooses_and_test_reports():
    # lr 1e-4 epoch 1 looks best on test (0.48, ASR 0.01) but its validation ASR is 0.12;
    # lr 1e-3 epoch 2 is the best on validation (0.44, ASR 0.02); its test numbers are (0.42, 0.06).
    rows = val_run(1e-4, [(0.48, 0.01, 0.47, 0.12), (0.40, 0.00, 0.41, 0.30)])
    rows += val_run(1e-3, [(0.30, 0.00, 0.31, 0.01), (0.42, 0.06, 0.44, 0.02)])
    per_seed = select_per_seed(rows, taus=(0.05,))
    oracle = pick(per_seed, "asr<=5%", selected_on="test")
    held = pick(per_seed, "asr<=5%", selected_on="validation")
    assert (oracle["lr"], oracle["epoch"], oracle["acc1"]) == (1e-4, 1, 0.48)
    assert (held["lr"], held["epoch"], held["acc1"], held["asr1"]) == (1e-3, 2, 0.42, 0.06)
    assert (held["val_acc1"], held["val_asr1"]) == (0.44, 0.02)
    assert held["rel_change"] == pytest.approx((0.42 - 0.50) / 0.50)
    # min ASR: oracle 0.00 (the test ASR itself), validation picks 1e-3 epoch 1 (val 0.01): test 0.00
    assert pick(per_seed, "min-asr", selected_on="validation")["asr1"] == 0.0
    table = {(r["rule"], r["selected_on"]): r for r in selection_table(rows, taus=(0.05,))}
    assert table[("asr<=5%", "validation")]["optimism_mean"] == pytest.approx(0.48 - 0.42)
    assert table[("min-asr", "validation")]["optimism_mean"] == pytest.approx(0.0)
    assert "optimism_mean" not in table[("asr<=5%", "test")]
    lines = headline_table(rows).splitlines()
    # keeping ≥ 90% (acc ≥ 0.45 on test, val acc ≥ 0.45 on validation) leaves lr 1e-4 epoch 1 either way
    assert lines[2] == ("| MMCL | 50.0 / 99.0 | CleanCLIP | oracle (test) | 48.0 | 1.0 | 1/1 | -4.0% | 0.0 "
                        "| 1.0 |")
    assert lines[3] == "|  |  |  | validation → test | 42.0 | 6.0 | 1/1 | -16.0% | 0.0 | 1.0 |"
    assert lines[4] == "|  |  |  | oracle's optimism | +6.0 |  | 1 paired |  | +0.0 | +0.0 |"


def test_optimism_over_seeds_is_a_mean_with_its_interval():
    rows = []
    for seed, (oracle_acc, held_acc) in enumerate(((0.48, 0.42), (0.47, 0.45), (0.46, 0.40))):
        rows += val_run(1e-4, [(oracle_acc, 0.01, 0.30, 0.20)], seed=seed)  # best on test only
        rows += val_run(1e-3, [(held_acc, 0.02, 0.44, 0.02)], seed=seed)  # best on validation
    (r,) = [t for t in selection_table(rows, taus=(0.05,)) if (t["rule"], t["selected_on"]) ==
            ("asr<=5%", "validation")]
    gaps = [0.06, 0.02, 0.06]
    mean, sd = sum(gaps) / 3, (sum((g - sum(gaps) / 3) ** 2 for g in gaps) / 2) ** 0.5
    assert r["optimism_mean"] == pytest.approx(mean) and r["n_paired"] == 3
    assert r["optimism_ci"] == pytest.approx(4.3027 * sd / 3 ** 0.5, rel=1e-4)  # t_{0.975, 2}


def test_points_without_validation_numbers_are_left_out_of_validation_selection():
    rows = val_run(1e-4, [(0.48, 0.01, 0.47, 0.01)]) + run(1e-3, [(0.49, 0.0)], method="ssl")
    per_seed = select_per_seed(rows, taus=(0.05,))
    assert pick(per_seed, "asr<=5%", method="ssl", selected_on="validation")["status"] == "no-validation"
    assert pick(per_seed, "asr<=5%", method="ssl", selected_on="test")["acc1"] == 0.49


# --------------------------------------------------------------------------------------------
# Per-checkpoint intervals
# --------------------------------------------------------------------------------------------
def test_interval_cells_are_wilson_intervals_of_the_counts():
    cells = interval_cells({"acc1": 0.25, "n": 300, "asr1": 0.0, "n_asr": 270, "val_acc1": 0.5, "val_n": 10})
    assert (cells["acc1_lo"], cells["acc1_hi"]) == wilson(75, 300)
    assert (cells["asr1_lo"], cells["asr1_hi"]) == wilson(0, 270) and cells["asr1_lo"] == 0.0
    assert (cells["val_acc1_lo"], cells["val_acc1_hi"]) == wilson(5, 10)
    assert "val_asr1_lo" not in cells  # no val_asr1 / val_n_asr: nothing to say
    assert interval_cells({"acc1": float("nan"), "n": 10}) == {}
    wide = interval_cells({"asr1": 0.05, "n_asr": 100}, 0.99)
    narrow = interval_cells({"asr1": 0.05, "n_asr": 100}, 0.8)
    assert wide["asr1_lo"] < narrow["asr1_lo"] < 0.05 < narrow["asr1_hi"] < wide["asr1_hi"]


def test_interval_columns_are_read_as_fractions(tmp_path):
    path = tmp_path / "results.csv"
    header = ",".join(COLUMNS)
    cells = dict.fromkeys(COLUMNS, "")
    cells.update(seed="0", stage="clean", pretrain="mmcl", epoch="1", asr1="0.5", asr1_lo="0.4",
                 asr1_hi="1.5")
    path.write_text(header + "\n" + ",".join(cells[c] for c in COLUMNS) + "\n")
    with pytest.raises(UserError, match=r"column 'asr1_hi': 1.5 is not a fraction"):
        read_results(path)


# --------------------------------------------------------------------------------------------
# The report: confidence from study.yaml, the environment once, differing runs named
# --------------------------------------------------------------------------------------------
def fingerprint(**changes):
    base = {"from_epoch": 0, "python": {"version": "3.11.7"},
            "torch": {"version": "2.13.0+cpu", "threads": 1, "cpu_capability": "AVX512"},
            "cpu": {"model": "Test CPU"}, "packages": {"numpy": "2.4.6", "torch": "2.13.0"}}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        base[section] = {**base[section], key: value}
    return base


def environment_study(tmp_path, study_yaml="name: env\nconfidence: 0.9\n"):
    rows = run(1e-4, [(0.45, 0.01)]) + [row(0, "pretrain", "mmcl", epoch=1, acc1=0.5, asr1=0.99)]
    for r in rows:
        r["run"] = ("pretrain/mmcl,seed=0" if r["stage"] == "pretrain"
                    else "clean/mmcl,seed=0/cleanclip/lr=1e-4")
    study = write_study(tmp_path / "s", rows, study_yaml=study_yaml)
    return study


def write_env(study, run_name, *entries):
    (study / run_name).mkdir(parents=True, exist_ok=True)
    (study / run_name / "environment.json").write_text(json.dumps({"fingerprints": list(entries)}))


def test_report_shows_the_environment_once_and_names_runs_that_differ(tmp_path):
    study = environment_study(tmp_path)
    write_env(study, "pretrain/mmcl,seed=0", fingerprint())
    write_env(study, "clean/mmcl,seed=0/cleanclip/lr=1e-4", fingerprint(),
              {**fingerprint(torch__threads=2), "from_epoch": 3})
    index = write_report(study)
    headline = (study / "report/headline.md").read_text()
    assert headline.count("**Environment**") == 1
    assert "Test CPU" in headline and "CPU capability AVX512" in headline
    assert "**Runs differ** in 1 field(s):" in headline
    assert ("- `torch.threads`: 1: 2 run(s) (clean/mmcl,seed=0/cleanclip/lr=1e-4, pretrain/mmcl,seed=0); "
            "2: 1 run(s) (clean/mmcl,seed=0/cleanclip/lr=1e-4@epoch 3)") in headline  # results.csv's order
    summary = json.loads((study / "report/environment.json").read_text())
    assert summary["common"]["packages.numpy"] == "2.4.6"
    assert list(summary["differences"]) == ["torch.threads"]
    page = index.read_text()
    assert "<h2>Environment</h2>" in page and "torch.threads" in page
    assert "90% Student-t" in headline  # the confidence level comes from study.yaml


def test_report_says_when_runs_have_no_fingerprint(tmp_path):
    study = environment_study(tmp_path)
    write_report(study)
    assert "**Environment:** not recorded" in (study / "report/headline.md").read_text()
    write_env(study, "pretrain/mmcl,seed=0", fingerprint())
    write_report(study)
    text = (study / "report/headline.md").read_text()
    assert "recorded by 1 of 2 runs" in text and "1 run(s) have no environment.json: clean/mmcl" in text


def test_study_confidence_falls_back_to_095(tmp_path):
    assert study_confidence(tmp_path) == 0.95
    (tmp_path / "study.yaml").write_text("confidence: 0.8\n")
    assert study_confidence(tmp_path) == 0.8
    (tmp_path / "study.yaml").write_text("confidence: 7\n")
    assert study_confidence(tmp_path) == 0.95
