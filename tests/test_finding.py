"""The computed sentence on the paper's finding, on constructed results whose answers are known:
established, not established (noise, wrong direction, too few seeds), cannot be tested, the −100%
convention for a seed that never reached ASR ≤ 5%, the threshold-free variant, and validation."""

from __future__ import annotations

import statistics

import pytest

from clip_backdoor.study import finding, stats
from clip_backdoor.study.select import COLUMNS

scipy_stats = pytest.importorskip("scipy.stats")


def rows_of(points: dict, poisoned=(0.50, 0.99), val=None) -> list[dict]:
    """{(seed, objective): [(acc1, asr1), ...]} -> results rows: a pre-training row (the poisoned model)
    and one CleanCLIP run at lr 1e-4 whose epochs are those points. ``val``: the same shape, the
    validation split's numbers of each point."""
    rows = []
    for (seed, objective), epochs in points.items():
        base = dict.fromkeys(COLUMNS)
        rows.append({**base, "seed": seed, "stage": "pretrain", "pretrain": objective, "epoch": 1,
                     "acc1": poisoned[0], "asr1": poisoned[1], "val_acc1": poisoned[0],
                     "val_asr1": poisoned[1],
                     "run": f"pretrain/{objective},seed={seed}"})
        for e, (acc, asr) in enumerate(epochs, 1):
            r = {**base, "seed": seed, "stage": "clean", "pretrain": objective, "method": "cleanclip",
                 "lr": 1e-4, "k": 0, "start_epoch": 1, "epoch": e, "acc1": acc, "asr1": asr,
                 "run": f"clean/{objective},seed={seed}/cleanclip/lr=1e-4"}
            if val is not None:
                r["val_acc1"], r["val_asr1"] = val[(seed, objective)][e - 1]
            rows.append(r)
    return rows


def study(mmcl_acc, ssl_acc, asr_ssl=0.03):
    """Per seed, CleanCLIP reaches ASR ≤ 5% on both models, keeping mmcl_acc / ssl_acc."""
    points = {}
    for seed, (a, b) in enumerate(zip(mmcl_acc, ssl_acc)):
        points[(seed, "mmcl")] = [(a, 0.02)]
        points[(seed, "mmcl+ssl")] = [(b, asr_ssl)]
    return rows_of(points)


def expected_test(differences):
    result = scipy_stats.ttest_1samp(differences, 0.0)
    return float(result.statistic), float(result.pvalue)


def test_established_with_the_numbers_of_an_independent_t_test():
    mmcl, ssl = [0.47, 0.46, 0.48, 0.45], [0.25, 0.22, 0.27, 0.20]
    c = finding.compare(study(mmcl, ssl))
    differences = [(a - b) / 0.5 for a, b in zip(mmcl, ssl)]
    assert c.differences == pytest.approx(differences)
    t, p = expected_test(differences)
    assert c.test.t == pytest.approx(t) and c.test.p == pytest.approx(p) and p < 0.05
    assert (c.status, c.wins, c.n, c.selected_on) == ("established", 4, 4, "test")
    text = finding.sentence(c)
    assert ": established at the 5% level (oracle selection on the test split)" in text
    assert "seed 0: -6.0% vs -50.0%" in text and "MMCL lost less accuracy in 4 of 4 seeds" in text
    mean = statistics.fmean(differences)
    assert f"paired difference {mean * 100:+.1f} ± " in text and f"t(3) = {t:.2f}" in text
    # the planning estimate (stats.paired_t_power is tested against scipy's noncentral t)
    sd = statistics.stdev(differences)
    assert "power at the observed mean and spread 100% with 4 seeds, 2 seeds reach 80%" in text
    assert stats.paired_t_power(mean, sd, 2) >= 0.8


def test_noise_is_not_established_and_says_why():
    c = finding.compare(study([0.47, 0.30, 0.46, 0.28], [0.30, 0.46, 0.29, 0.45]))
    t, p = expected_test(c.differences)
    assert c.status == "not established" and p > 0.05 and c.test.p == pytest.approx(p)
    assert f"p = {p:.2g} is not below 0.05" in finding.sentence(c)


def test_the_opposite_direction_is_not_the_finding():
    c = finding.compare(study([0.25, 0.22, 0.27, 0.20], [0.47, 0.46, 0.48, 0.45]))
    assert c.status == "not established" and c.test.p < 0.05 and c.wins == 0
    assert "the difference points the other way" in finding.sentence(c)


def test_too_few_seeds():
    c = finding.compare(study([0.47, 0.46], [0.25, 0.22]))
    assert c.status == "not established" and c.test is None and c.n == 2
    text = finding.sentence(c)
    assert "not established" in text and "too few seeds: 2" in text and "needs at least 3" in text


def test_a_seed_that_never_reaches_asr_5_counts_as_minus_100_percent():
    points = {}
    for seed, a in enumerate((0.47, 0.46, 0.45)):
        points[(seed, "mmcl")] = [(a, 0.01)]
        points[(seed, "mmcl+ssl")] = [(0.48, 0.30), (0.40, 0.12)]  # never at ASR ≤ 5%
    c = finding.compare(rows_of(points))
    assert c.second == [-1.0, -1.0, -1.0] and set(c.imputed) == {(s, "mmcl+ssl") for s in range(3)}
    assert c.differences == pytest.approx([(a - 0.5) / 0.5 + 1.0 for a in (0.47, 0.46, 0.45)])
    assert c.status == "established"
    text = finding.sentence(c)
    assert "seed 1: -8.0% vs -100.0%*" in text
    assert "counted as −100%, cleaning needed the model destroyed" in text


def test_an_unfinished_seed_does_not_enter():
    rows = study([0.47, 0.46, 0.48], [0.25, 0.22, 0.27])
    rows += rows_of({(3, "mmcl"): [(0.47, 0.02)], (3, "mmcl+ssl"): []})  # seed 3: MMCL+SSL has no epoch yet
    c = finding.compare(rows)
    assert c.seeds == [0, 1, 2]


def pruned(rows, seed, objective):
    """Mark one group's run as stopped by cleaning.prune (results.csv's ``pruned`` column)."""
    for r in rows:
        if r["stage"] == "clean" and r["seed"] == seed and r["pretrain"] == objective:
            r["pruned"] = 1
    return rows


def test_a_pruned_group_with_nothing_found_is_left_out_and_named_not_counted_as_destroyed():
    points = {}
    for seed, a in enumerate((0.47, 0.46, 0.45, 0.44)):
        points[(seed, "mmcl")] = [(a, 0.01)]
        points[(seed, "mmcl+ssl")] = [(0.48, 0.30)]  # never at ASR ≤ 5%
    rows = pruned(rows_of(points), 3, "mmcl+ssl")  # seed 3: pruning might have hidden a checkpoint
    c = finding.compare(rows)
    assert c.seeds == [0, 1, 2] and c.unexplored == [(3, "mmcl+ssl")]
    assert set(c.imputed) == {(s, "mmcl+ssl") for s in range(3)}  # unpruned "none" is still −100%
    text = finding.sentence(c)
    assert "left out as not explored: seed 3 (MMCL+SSL)" in text and "--no-prune" in text
    # every seed pruned: cannot be tested, and the sentence says why (not "not evaluated yet")
    for seed in range(3):
        pruned(rows, seed, "mmcl+ssl")
    c = finding.compare(rows)
    assert c.status == "cannot be tested" and c.n == 0 and len(c.unexplored) == 4
    text = finding.sentence(c)
    assert "cannot be tested — left out as not explored: seed 0 (MMCL+SSL)" in text
    assert "no seed has evaluated" not in text


def test_cannot_be_tested_without_both_objectives():
    c = finding.compare(rows_of({(0, "mmcl"): [(0.47, 0.02)]}))
    assert c.status == "cannot be tested" and "MMCL+SSL model" in finding.sentence(c)


def test_threshold_free_comparison_and_its_imputation():
    # Keeping ≥ 90% of 0.50 means acc1 ≥ 0.45: MMCL gets ASR 0.10-0.20 there; MMCL+SSL's best kept point
    # has ASR 0.70-0.80, except seed 2 where nothing keeps 0.45 (imputed: the poisoned ASR, 0.99).
    points = {}
    for seed, (a, b) in enumerate(((0.10, 0.80), (0.20, 0.70), (0.15, None))):
        points[(seed, "mmcl")] = [(0.46, a), (0.30, 0.0)]
        points[(seed, "mmcl+ssl")] = [(0.46, b)] if b is not None else [(0.40, 0.0)]
    c = finding.compare(rows_of(points), kind="threshold-free")
    assert c.first == [0.10, 0.20, 0.15] and c.second == [0.80, 0.70, 0.99]
    assert c.imputed == [(2, "mmcl+ssl")] and c.differences == pytest.approx([0.70, 0.50, 0.84])
    t, p = expected_test(c.differences)
    assert c.test.p == pytest.approx(p) and c.status == ("established" if p < 0.05 else "not established")
    text = finding.sentence(c)
    assert "Threshold-free" in text and "seed 2: 15.0% vs 99.0%*" in text and "poisoned model's ASR" in text


def test_the_confidence_level_sets_the_test_level():
    mmcl, ssl = [0.47, 0.45, 0.48, 0.42], [0.37, 0.375, 0.33, 0.37]
    c95, c99 = (finding.compare(study(mmcl, ssl), confidence=level) for level in (0.95, 0.99))
    assert 0.01 < c95.test.p < 0.05  # constructed to lie between the two levels
    assert (c95.status, c99.status) == ("established", "not established")
    assert "at the 1% level" in finding.sentence(c99, confidence=0.99)


def test_with_a_validation_split_the_selection_is_held_out():
    """The validation numbers choose epoch 2 on MMCL (where the test numbers would choose epoch 1);
    the reported change is epoch 2's test accuracy."""
    points, val = {}, {}
    for seed in range(3):
        points[(seed, "mmcl")] = [(0.48, 0.01), (0.40, 0.02)]
        val[(seed, "mmcl")] = [(0.30, 0.20), (0.45, 0.01)]
        points[(seed, "mmcl+ssl")] = [(0.20 + 0.01 * seed, 0.03)]
        val[(seed, "mmcl+ssl")] = [(0.21, 0.03)]
    c = finding.compare(rows_of(points, val=val))
    assert c.selected_on == "validation" and c.first == pytest.approx([-0.2, -0.2, -0.2])
    assert "validation-selected, test-reported" in finding.sentence(c)
    text = finding.finding_text(rows_of(points, val=val))
    assert text.count("\n\n") == 1 and text.startswith("The paper's finding")


def test_a_study_that_cleans_with_par_gets_the_same_sentences_for_par():
    """The open question "does the objective decide PAR's success too?": PAR's own paired test, on its
    own runs; CleanCLIP's sentences stay first and unchanged."""
    cleanclip = study([0.47, 0.46, 0.48, 0.45], [0.25, 0.22, 0.27, 0.20])
    par = [{**r, "method": "par", "run": r["run"].replace("cleanclip", "par"),
            "acc1": {"mmcl": 0.40, "mmcl+ssl": 0.41}[r["pretrain"]] - 0.01 * r["seed"]}
           for r in cleanclip if r["stage"] == "clean"]
    rows = cleanclip + par
    c = finding.compare(rows, method="par")
    assert c.method == "par" and c.n == 4 and c.differences == pytest.approx([-0.02] * 4)
    assert c.status == "not established" and "points the other way" in c.reason  # PAR: no objective effect
    text = finding.finding_text(rows)
    first, threshold_free, par_tau, par_free = text.split("\n\n")
    assert first == finding.sentence(finding.compare(cleanclip))  # CleanCLIP's, as without PAR
    assert first.startswith("The paper's finding (CleanCLIP cleans")
    assert par_tau.startswith("The paper's finding, asked of PAR (PAR cleans an MMCL-pretrained model")
    assert "not established" in par_tau and par_free.startswith("Threshold-free, PAR (minimum ASR")
    assert len(finding.finding_text(cleanclip).split("\n\n")) == 2  # no PAR runs: no PAR sentences
