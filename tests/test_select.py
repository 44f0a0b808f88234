"""Selection rules on hand-built results whose answers are known, and against a naive brute force.

Every test builds rows the way ``read_results`` returns them (or writes a CSV and reads it back), so
the expected winners can be read off the rows by eye.
"""

from __future__ import annotations

import csv
import random

import pytest

from clip_backdoor.errors import UserError
from clip_backdoor.study.headline import headline_table
from clip_backdoor.study.select import (
    COLUMNS,
    format_lr,
    poisoned_models,
    read_results,
    select_per_seed,
    selection_table,
)


def row(seed=0, stage="clean", pretrain="mmcl", method="cleanclip", lr=1e-4, k=0, epoch=1, acc1=0.5,
        asr1=0.5, **extra) -> dict:
    r = dict.fromkeys(COLUMNS)
    r.update(seed=seed, stage=stage, pretrain=pretrain, method=method if stage == "clean" else None,
             lr=lr if stage == "clean" else None, k=k if stage == "clean" else None, epoch=epoch, acc1=acc1,
             asr1=asr1, run=f"{stage}/{pretrain}/{method}/lr={lr}", **extra)
    return r


def run(lr, points, *, seed=0, pretrain="mmcl", method="cleanclip", k=0, poisoned=(0.50, 0.99)) -> list[dict]:
    """A cleaning run: epoch 0 = the poisoned model, then one (acc1, asr1) per epoch."""
    rows = [row(seed, "clean", pretrain, method, lr, k, 0, *poisoned)]
    rows += [row(seed, "clean", pretrain, method, lr, k, e, acc, asr)
             for e, (acc, asr) in enumerate(points, 1)]
    return rows


def pick(per_seed, rule, **match) -> dict:
    found = [r for r in per_seed if r["rule"] == rule and all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------------------------
# Reading results.csv
# --------------------------------------------------------------------------------------------
def write_csv(path, header, lines):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(lines)


def line_of(**cells) -> list[str]:
    """A results.csv line in COLUMNS order; unnamed cells are empty."""
    return [cells.get(c, "") for c in COLUMNS]


def test_read_results_types_and_empty_cells(tmp_path):
    path = tmp_path / "results.csv"
    write_csv(path, COLUMNS, [
        line_of(seed="0", stage="pretrain", pretrain="mmcl", epoch="3", step="300", acc1="0.25", acc5="0.5",
                asr1="0.9", asr5="0.95", n="100", n_asr="90", loss="1.5", loss_mmcl="1.5",
                run="pretrain/mmcl"),
        line_of(seed="1", stage="clean", pretrain="mmcl+ssl", method="cleanclip", lr="0.0003", k="5",
                start_epoch="21", epoch="0", step="0", init="transformed", acc1="0.2", asr1="nan",
                run="clean/x"),
    ])
    a, b = read_results(path)
    assert a["seed"] == 0 and a["epoch"] == 3 and a["step"] == 300 and a["n"] == 100
    assert a["acc1"] == 0.25 and a["method"] is None and a["lr"] is None and a["k"] is None
    assert a["ra1"] is None and a["loss_ssl"] is None and a["run"] == "pretrain/mmcl"
    assert a["start_epoch"] is None and a["init"] is None
    assert b["lr"] == pytest.approx(3e-4) and b["k"] == 5 and b["method"] == "cleanclip"
    assert b["start_epoch"] == 21 and b["init"] == "transformed"
    assert b["asr1"] != b["asr1"]  # NaN is kept as a float; selection skips it


def test_read_results_missing_metric_columns_and_extra_columns(tmp_path):
    path = tmp_path / "results.csv"
    write_csv(path, ["stage", "pretrain", "epoch", "acc1", "note"], [["pretrain", "ssl", "1.0", "0.1", "hi"]])
    (r,) = read_results(path)
    assert r["seed"] == 0 and r["epoch"] == 1 and r["asr1"] is None and r["note"] == "hi"


@pytest.mark.parametrize("header, line, message", [
    (COLUMNS, line_of(seed="0", stage="clean", pretrain="mmcl", method="cleanclip", lr="fast", k="0",
                      epoch="1"), "line 2, column 'lr'"),
    (COLUMNS, line_of(seed="0", stage="clean", pretrain="mmcl", method="cleanclip", lr="1e-4", k="0.5",
                      epoch="1"), "column 'k'"),
    (["stage", "pretrain", "epoch", "acc1"], ["clean", "mmcl", "1", "42.5"], "'acc1': 42.5 is not a"),
    (["stage", "epoch"], ["clean", "1"], "missing column 'pretrain'"),
    (["stage", "pretrain", "epoch"], ["clean", "mmcl", ""], "line 2: empty 'epoch'"),
])
def test_read_results_bad_input_names_line_and_column(tmp_path, header, line, message):
    path = tmp_path / "results.csv"
    write_csv(path, header, [line])
    with pytest.raises(UserError, match=message):
        read_results(path)


def test_string_rows_are_typed_like_the_csv(tmp_path):
    rows = run(1e-4, [(0.45, 0.01), (0.47, 0.20)], k=5) + run(1e-3, [(0.40, 0.0)], seed=1)
    as_strings = [{c: "" if r[c] is None else str(r[c]) for c in COLUMNS} for r in rows]
    path = tmp_path / "results.csv"
    write_csv(path, COLUMNS, [[r[c] for c in COLUMNS] for r in as_strings])
    assert headline_table(as_strings) == headline_table(read_results(path)) == headline_table(rows)
    assert selection_table(as_strings) == selection_table(rows)


def test_read_results_missing_file(tmp_path):
    with pytest.raises(UserError, match="results file not found"):
        read_results(tmp_path / "results.csv")


# --------------------------------------------------------------------------------------------
# Oracle rules
# --------------------------------------------------------------------------------------------
def test_best_at_asr_over_lrs_and_epochs_with_relative_change():
    rows = run(1e-5, [(0.49, 0.98), (0.48, 0.97)])             # never cleans
    rows += run(1e-4, [(0.47, 0.20), (0.46, 0.04), (0.44, 0.01)])
    rows += run(1e-3, [(0.30, 0.00), (0.45, 0.05)])            # 0.05 exactly counts as ≤ 5%
    per_seed = select_per_seed(rows)
    best5 = pick(per_seed, "asr<=5%")
    assert (best5["acc1"], best5["asr1"], best5["lr"], best5["epoch"]) == (0.46, 0.04, 1e-4, 2)
    assert best5["rel_change"] == pytest.approx((0.46 - 0.50) / 0.50)
    best1 = pick(per_seed, "asr<=1%")
    assert (best1["acc1"], best1["lr"], best1["epoch"]) == (0.44, 1e-4, 3)
    best10 = pick(per_seed, "asr<=10%")
    assert (best10["acc1"], best10["lr"]) == (0.46, 1e-4)
    lowest = pick(per_seed, "min-asr")
    assert (lowest["asr1"], lowest["acc1"], lowest["lr"], lowest["epoch"]) == (0.0, 0.30, 1e-3, 1)
    assert best5["poisoned_acc1"] == 0.50 and best5["n_points"] == 7


def test_tau_boundary_inclusive_even_for_count_ratios():
    rows = run(1e-4, [(0.40, 5 / 100), (0.45, 51 / 1000)])
    assert pick(select_per_seed(rows), "asr<=5%")["acc1"] == 0.40


def test_epoch_zero_is_never_a_cleaned_point():
    # The poisoned model would win every rule if it were a candidate (highest acc, zero "ASR").
    rows = run(1e-4, [(0.30, 0.02), (0.20, 0.01)], poisoned=(0.90, 0.0))
    per_seed = select_per_seed(rows)
    assert pick(per_seed, "asr<=5%")["epoch"] == 1
    assert pick(per_seed, "min-asr")["epoch"] == 2
    assert pick(per_seed, "best-acc")["epoch"] == 1
    assert all(r["epoch"] != 0 for r in per_seed if r["epoch"] is not None)


def test_no_qualifying_point_is_none_and_headline_says_so():
    rows = run(1e-4, [(0.49, 0.90), (0.48, 0.80)], method="mmcl")
    per_seed = select_per_seed(rows)
    r = pick(per_seed, "asr<=5%")
    assert r["status"] == "none" and r["acc1"] is None and r["lr"] is None and r["rel_change"] is None
    assert pick(per_seed, "min-asr")["asr1"] == 0.80
    table = headline_table(rows)
    assert "| MMCL | 50.0 / 99.0 | MMCL only | none | 0/1 |  | 80.0 | 80.0 |" in table


def test_headline_warns_when_the_backdoor_was_never_learned():
    rows = run(1e-4, [(0.45, 0.01)], poisoned=(0.5, 0.04))
    rows += run(1e-4, [(0.45, 0.01)], pretrain="mmcl+ssl", poisoned=(0.5, 0.90))
    table = headline_table(rows)
    assert "Warning: the poisoned MMCL model already has ASR ≤ 5%" in table
    assert "MMCL+SSL model" not in table
    assert "unequal strength" not in table  # the stronger warning says it already
    assert "Warning" not in headline_table(run(1e-4, [(0.45, 0.01)]))


def test_headline_notes_backdoors_of_unequal_strength():
    even = run(1e-4, [(0.45, 0.01)], poisoned=(0.5, 0.99))
    even += run(1e-4, [(0.45, 0.01)], pretrain="mmcl+ssl", poisoned=(0.5, 0.80))  # a gap of 19 points
    assert "unequal strength" not in headline_table(even)
    uneven = run(1e-4, [(0.45, 0.01)], poisoned=(0.5, 0.99))
    uneven += run(1e-4, [(0.45, 0.01)], pretrain="mmcl+ssl", poisoned=(0.5, 0.72))
    assert "unequal strength (ASR MMCL 99%, MMCL+SSL 72%)" in headline_table(uneven)


def test_ties_break_by_lower_asr_then_earlier_epoch_then_smaller_lr():
    rows = run(1e-3, [(0.40, 0.03), (0.40, 0.01)])
    rows += run(1e-4, [(0.40, 0.01), (0.40, 0.01)])
    per_seed = select_per_seed(rows)
    best = pick(per_seed, "asr<=5%")
    assert (best["asr1"], best["epoch"], best["lr"]) == (0.01, 1, 1e-4)
    lowest = pick(per_seed, "min-asr")
    assert (lowest["epoch"], lowest["lr"]) == (1, 1e-4)


def test_min_asr_tie_prefers_higher_accuracy():
    rows = run(1e-4, [(0.30, 0.10), (0.35, 0.10)])
    assert pick(select_per_seed(rows), "min-asr")["acc1"] == 0.35


def test_without_asr_oracle_rules_say_no_asr_and_realistic_rules_still_work():
    rows = run(1e-4, [(0.45, None), (0.47, None)], poisoned=(0.5, None))
    per_seed = select_per_seed(rows)
    assert pick(per_seed, "asr<=5%")["status"] == "no-asr"
    assert pick(per_seed, "min-asr")["status"] == "no-asr"
    assert pick(per_seed, "best-acc")["acc1"] == 0.47
    assert "no ASR" in headline_table(rows)


def test_nan_metrics_of_a_diverged_run_are_skipped():
    nan = float("nan")
    rows = run(1e-4, [(0.45, 0.02)]) + run(1e-2, [(nan, nan), (0.30, nan)])
    per_seed = select_per_seed(rows)
    assert pick(per_seed, "best-acc")["acc1"] == 0.45
    assert pick(per_seed, "asr<=5%")["lr"] == 1e-4
    assert pick(per_seed, "min-asr")["asr1"] == 0.02
    assert pick(per_seed, "last-epoch")["acc1"] == 0.45  # lr 1e-2's last finite point is 0.30


def test_run_with_only_epoch_zero_has_no_points():
    rows = run(1e-4, [])
    per_seed = select_per_seed(rows)
    assert {r["status"] for r in per_seed} == {"no-points"}
    assert "not yet" in headline_table(rows)


# --------------------------------------------------------------------------------------------
# Realistic rules
# --------------------------------------------------------------------------------------------
def test_last_epoch_rule_takes_each_lrs_last_epoch():
    rows = run(1e-5, [(0.60, 0.99), (0.41, 0.98)])   # best acc overall, but not at its last epoch
    rows += run(1e-4, [(0.30, 0.50), (0.45, 0.30)])  # best last epoch
    rows += run(1e-3, [(0.20, 0.01)])                # unfinished: its last epoch is 1
    per_seed = select_per_seed(rows)
    last = pick(per_seed, "last-epoch")
    assert (last["lr"], last["epoch"], last["acc1"], last["asr1"]) == (1e-4, 2, 0.45, 0.30)
    assert last["peeks_at_asr"] is False
    best = pick(per_seed, "best-acc")
    assert (best["lr"], best["epoch"], best["acc1"], best["asr1"]) == (1e-5, 1, 0.60, 0.99)


def test_realistic_rules_ignore_asr_on_ties():
    rows = run(1e-3, [(0.40, 0.99)])
    rows += run(1e-4, [(0.40, 0.00)])
    per_seed = select_per_seed(rows)
    # A tie is broken by the smaller lr, not by the lower ASR the realistic rule cannot see.
    assert pick(per_seed, "last-epoch")["asr1"] == 0.00
    rows = run(1e-4, [(0.40, 0.99)]) + run(1e-3, [(0.40, 0.00)])
    assert pick(select_per_seed(rows), "best-acc")["asr1"] == 0.99


# --------------------------------------------------------------------------------------------
# Poisoned model, seeds, k
# --------------------------------------------------------------------------------------------
def test_poisoned_model_is_the_pretraining_evaluation_at_the_start_epoch():
    rows = [row(0, "pretrain", "mmcl", epoch=e, acc1=a, asr1=s) for e, a, s in [(1, 0.1, 0.5), (2, 0.2, 0.9)]]
    rows += [row(0, "pretrain", "ssl", epoch=1, acc1=0.3, asr1=0.4)]
    rows += run(1e-4, [(0.2, 0.1)], pretrain="mmcl", poisoned=(0.21, 0.91))
    found = poisoned_models(rows)  # no start_epoch column: the last pre-training epoch
    assert found[(0, "mmcl")]["acc1"] == 0.2 and found[(0, "mmcl")]["source"] == "pretrain epoch 2"
    assert found[(0, "ssl")]["acc1"] == 0.3 and found[(0, "ssl")]["source"] == "pretrain epoch 1"
    for r in rows:  # cleaning from pre-training epoch 1: that epoch's evaluation is the baseline
        if r["stage"] == "clean":
            r["start_epoch"] = 1
    assert poisoned_models(rows)[(0, "mmcl")]["acc1"] == 0.1


def test_shrink_perturb_epoch_zero_is_never_the_baseline():
    """A study with shrink-perturb alone: its epoch 0 is the shrunk model (init: transformed)."""
    shrunk = run(1e-4, [(0.3, 0.2)], method="shrink-perturb", poisoned=(0.05, 0.0))
    shrunk[0]["init"] = "transformed"
    pretrain = [row(0, "pretrain", "mmcl", epoch=3, acc1=0.5, asr1=0.99)]
    found = poisoned_models(pretrain + shrunk)
    assert (found[(0, "mmcl")]["acc1"], found[(0, "mmcl")]["asr1"]) == (0.5, 0.99)
    assert poisoned_models(shrunk) == {}  # nothing else to go on: no baseline rather than a wrong one
    best = pick(select_per_seed(pretrain + shrunk), "asr<=5%")
    assert best["status"] == "none"
    assert pick(select_per_seed(pretrain + shrunk), "min-asr")["rel_change"] == pytest.approx(0.3 / 0.5 - 1)


def test_epoch_zero_of_an_untransformed_run_stands_in_without_pretraining_rows():
    rows = run(1e-4, [(0.2, 0.1)], method="shrink-perturb", poisoned=(0.05, 0.0))
    rows[0]["init"] = "transformed"
    rows += run(1e-4, [(0.2, 0.1)], method="cleanclip", poisoned=(0.21, 0.91))
    found = poisoned_models(rows)
    assert found[(0, "mmcl")]["acc1"] == 0.21 and found[(0, "mmcl")]["source"] == "clean epoch 0"


def test_seeds_aggregate_mean_and_t_interval_over_seeds_that_qualify():
    rows = run(1e-4, [(0.40, 0.02)], seed=0, poisoned=(0.50, 0.99))
    rows += run(1e-4, [(0.44, 0.04)], seed=1, poisoned=(0.52, 0.97))
    rows += run(1e-4, [(0.48, 0.30)], seed=2, poisoned=(0.54, 0.95))   # does not reach 5%
    (r,) = [t for t in selection_table(rows) if t["rule"] == "asr<=5%"]
    assert (r["n_seeds"], r["n_found"], r["seeds"]) == (3, 2, "0;1;2")
    assert (r["lrs"], r["epochs"]) == ("1e-4;1e-4", "1;1")
    assert r["acc1_mean"] == pytest.approx(0.42) and r["acc1_std"] == pytest.approx(0.02 * 2 ** 0.5)
    # t_{0.975, 1} = 12.7062, t_{0.975, 2} = 4.3027 (printed tables); half-width = t · s / √n
    assert r["acc1_ci"] == pytest.approx(12.7062 * 0.02 * 2 ** 0.5 / 2 ** 0.5, rel=1e-4)
    rel = [(0.40 - 0.50) / 0.50, (0.44 - 0.52) / 0.52]
    assert r["rel_change_mean"] == pytest.approx(sum(rel) / 2)
    assert r["poisoned_acc1_mean"] == pytest.approx(0.52) and r["poisoned_acc1_std"] == pytest.approx(0.02)
    assert r["poisoned_acc1_ci"] == pytest.approx(4.3027 * 0.02 / 3 ** 0.5, rel=1e-4)
    table = headline_table(rows)
    assert "| MMCL | 52.0 ± 5.0 / 97.0 ± 5.0 | CleanCLIP | 42.0 ± 25.4 | 2/3 |" in table
    assert "half-width of the 95% Student-t confidence interval over 3 seeds" in table
    wide = headline_table(rows, confidence=0.99)  # t_{0.995, 1} = 63.657
    assert "| CleanCLIP | 42.0 ± 127.3 | 2/3 |" in wide and "99% Student-t" in wide


def test_k_variants_are_separate_groups_sharing_the_poisoned_model():
    rows = run(1e-4, [(0.45, 0.01)], k=0)
    rows += run(1e-4, [(0.46, 0.35)], k=5)
    per_seed = select_per_seed(rows)
    assert pick(per_seed, "asr<=5%", k=0)["acc1"] == 0.45
    assert pick(per_seed, "asr<=5%", k=5)["status"] == "none"
    assert pick(per_seed, "min-asr", k=5)["asr1"] == 0.35
    table = headline_table(rows)
    lines = table.splitlines()
    assert lines[2] == "| MMCL | 50.0 / 99.0 | CleanCLIP | 45.0 | 1/1 | -10.0% | 1.0 | 1.0 |"
    assert lines[3] == "|  |  | CleanCLIP, k=5 | none | 0/1 |  | 35.0 | 35.0 |"


def test_headline_orders_objectives_and_methods_and_lists_objective_without_cleaning():
    rows = run(1e-4, [(0.4, 0.0)], pretrain="mmcl+ssl", method="ssl")
    rows += run(1e-4, [(0.4, 0.0)], pretrain="mmcl+ssl", method="cleanclip")
    rows += [row(0, "pretrain", "mmcl", epoch=1, acc1=0.3, asr1=0.9)]
    lines = headline_table(rows).splitlines()
    assert lines[2].startswith("| MMCL | 30.0 / 90.0 | (no cleaning runs yet) |")
    assert lines[3].startswith("| MMCL+SSL | 50.0 / 99.0 | CleanCLIP |")
    assert lines[4].startswith("|  |  | SSL only |")


def test_oracle_matches_naive_brute_force_on_random_studies():
    rng = random.Random(7)
    rows = []
    for seed in range(2):
        for pretrain in ("mmcl", "mmcl+ssl"):
            for method in ("cleanclip", "ssl"):
                for k in (0, 5):
                    for lr in (1e-5, 1e-4, 1e-3):
                        points = [(round(rng.random(), 2), round(rng.random() * 0.2, 2))
                                  for _ in range(rng.randint(0, 4))]
                        rows += run(lr, points, seed=seed, pretrain=pretrain, method=method, k=k)
    per_seed = select_per_seed(rows, taus=(0.05,))
    def group(r):
        return [x for x in rows if (x["seed"], x["pretrain"], x["method"], x["k"]) ==
                (r["seed"], r["pretrain"], r["method"], r["k"]) and x["epoch"] >= 1]

    for r in (r for r in per_seed if r["rule"] == "asr<=5%"):
        candidates = [x for x in group(r) if x["asr1"] <= 0.05]
        if not candidates:
            assert r["acc1"] is None
            continue
        assert r["acc1"] == max(x["acc1"] for x in candidates)
        chosen = [x for x in candidates if (x["lr"], x["epoch"]) == (r["lr"], r["epoch"])]
        assert chosen and chosen[0]["acc1"] == r["acc1"] and chosen[0]["asr1"] == r["asr1"]
    for r in (r for r in per_seed if r["rule"] == "min-asr" and r["status"] == "ok"):
        assert r["asr1"] == min(x["asr1"] for x in group(r))


def test_selection_table_has_every_rule_for_every_group():
    rows = run(1e-4, [(0.4, 0.0)]) + run(1e-4, [(0.4, 0.0)], method="ssl", k=5)
    table = selection_table(rows)
    assert [t["rule"] for t in table[:7]] == ["asr<=1%", "asr<=5%", "asr<=10%", "min-asr", "min-asr@acc>=90%",
                                              "last-epoch", "best-acc"]
    assert len(table) == 14
    assert [t["peeks_at_asr"] for t in table[:7]] == [True, True, True, True, True, False, False]
    assert {t["selected_on"] for t in table} == {"test"}  # no validation split in these results


@pytest.mark.parametrize("lr, text", [(3e-4, "3e-4"), (1e-5, "1e-5"), (2.5e-4, "2.5e-4"), (0.01, "0.01"),
                                      (0.1, "0.1"), (None, "?")])
def test_format_lr(lr, text):
    assert format_lr(lr) == text
