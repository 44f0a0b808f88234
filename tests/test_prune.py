"""Constrained successive halving: the rung decision on constructed metrics rows (known answers),
a group's states over its rungs, the replay on a full grid, settings errors, the report's
"not explored", and a pruned tiny study whose runs match the replay of its full grid."""

import json

import pytest

from clip_backdoor.errors import UserError
from clip_backdoor.fileio import read_jsonl
from clip_backdoor.study import runner
from clip_backdoor.study.prune import (
    PruneSettings,
    compute_share,
    decide,
    group_states,
    parse_prune,
    simulate,
)
from clip_backdoor.study.select import KEEP_RULE, select_per_seed
from clip_backdoor.study.spec import parse_spec


def rows(*points):
    """metrics.jsonl rows from (acc1, asr1) per epoch 1, 2, ...; epoch 0 is the poisoned model."""
    return [{"epoch": 0, "acc1": 0.9, "asr1": 0.99}] + [
        {"epoch": e, "acc1": acc, "asr1": asr} for e, (acc, asr) in enumerate(points, start=1)]


# --------------------------------------------------------------------------------------------
# One decision
# --------------------------------------------------------------------------------------------
def test_feasible_runs_rank_by_best_accuracy_ahead_of_infeasible_ones():
    group = {
        "a": rows((0.50, 0.04)),  # feasible, acc 50
        "b": rows((0.60, 0.03)),  # feasible, acc 60: the incumbent
        "c": rows((0.55, 0.20)),  # infeasible, lowest ASR of the infeasible, below the incumbent
        "d": rows((0.40, 0.90)),  # infeasible
        "e": rows((0.45, 0.50)),
        "f": rows((0.30, 0.02)),  # feasible, acc 30
    }
    d = decide(group, epoch=1, eta=3, taus=[0.05], keep_free=False)
    assert [s.run for s in d.scores[0.05]] == ["b", "a", "f", "c", "e", "d"]
    assert d.keep == ["a", "b"] and d.pruned == ["c", "d", "e", "f"]  # ceil(6 / 3) = 2
    assert d.incumbents[0.05] == {"run": "b", "acc1": 0.60, "epoch": 1}


def test_a_run_more_accurate_than_the_incumbent_is_never_pruned():
    group = {
        "feasible": rows((0.40, 0.01)),
        "close": rows((0.35, 0.06)),  # lowest ASR among the infeasible: ranked second
        "accurate": rows((0.70, 0.95)),  # ASR highest, but accuracy above the incumbent's 40: kept
        "worse": rows((0.30, 0.90)),
    }
    d = decide(group, epoch=1, eta=2, taus=[0.05], keep_free=False)
    assert d.keep == ["accurate", "close", "feasible"] and d.pruned == ["worse"]
    unprotected = decide(group, epoch=1, eta=2, taus=[0.05], protect=False, keep_free=False)
    assert unprotected.keep == ["close", "feasible"]
    # without a feasible run there is no incumbent and no protection: ASR alone decides
    del group["feasible"]
    d = decide(group, epoch=1, eta=2, taus=[0.05], keep_free=False)
    assert d.keep == ["close", "worse"] and d.pruned == ["accurate"]
    assert d.incumbents[0.05] is None


def test_best_feasible_epoch_and_only_epochs_up_to_the_rung_count():
    group = {
        # feasible at epoch 2 with acc 50; its epoch 3 (acc 90) lies beyond the rung
        "late": rows((0.80, 0.50), (0.50, 0.05), (0.90, 0.00)),
        "early": rows((0.60, 0.05), (0.20, 0.01)),  # best feasible: epoch 1, acc 60
        "never": rows((0.95, 0.99), (0.95, 0.99)),
    }
    d = decide(group, epoch=2, eta=3, taus=[0.05], keep_free=False)
    ranking = d.scores[0.05]
    assert [s.run for s in ranking] == ["early", "late", "never"]
    assert (ranking[0].best_acc, ranking[0].epoch) == (0.60, 1)
    assert (ranking[1].best_acc, ranking[1].min_asr) == (0.50, 0.05)  # "exactly τ" is inside
    # "never" is above the incumbent (95 > 60): protected; "late" is not
    assert d.keep == ["early", "never"]


def test_several_thresholds_keep_the_union_of_survivors():
    group = {
        "strict": rows((0.30, 0.005), (0.30, 0.005)),  # best at ASR <= 1%
        "loose": rows((0.60, 0.04), (0.25, 0.03)),  # best at ASR <= 5%; now below 30: not protected
        "other": rows((0.20, 0.30), (0.20, 0.30)),
    }
    assert decide(group, 2, eta=3, taus=[0.01], keep_free=False).keep == ["strict"]
    assert decide(group, 2, eta=3, taus=[0.05], keep_free=False).keep == ["loose"]
    assert decide(group, 2, eta=3, taus=[0.01, 0.05], keep_free=False).keep == ["loose", "strict"]


def test_ties_go_to_the_smaller_learning_rate():
    group = {"lr=1e-3": rows((0.5, 0.0)), "lr=1e-4": rows((0.5, 0.0)), "lr=3e-3": rows((0.5, 0.0))}
    # by name without a tiebreak
    assert decide(group, 1, eta=3, taus=[0.05], keep_free=False).keep == ["lr=1e-3"]
    lrs = {"lr=1e-3": 1e-3, "lr=1e-4": 1e-4, "lr=3e-3": 3e-3}
    assert decide(group, 1, eta=3, taus=[0.05], tiebreak=lrs, keep_free=False).keep == ["lr=1e-4"]


# --------------------------------------------------------------------------------------------
# A group over its rungs
# --------------------------------------------------------------------------------------------
SETTINGS = PruneSettings(eta=2, rungs=(1, 2), thresholds=(0.05,), keep=False)


def test_the_threshold_free_cell_keeps_its_best_run_too():
    # poisoned accuracy 0.9 (epoch 0): keeping 90% means acc >= 0.81
    group = {
        "cleans": rows((0.50, 0.01)),  # feasible at 5%: the τ rule's survivor
        "keeps": rows((0.85, 0.40)),  # lowest ASR among epochs keeping 90%: the threshold-free survivor
        "high": rows((0.88, 0.95)),  # keeps accuracy, ASR higher
        "lost": rows((0.20, 0.30)),  # ASR lower than "keeps", but accuracy lost: not a threshold-free point
    }
    d = decide(group, epoch=1, eta=4, taus=[0.05], protect=False)
    assert d.keep == ["cleans", "keeps"] and d.free == ["keeps", "high", "cleans", "lost"]
    assert decide(group, epoch=1, eta=4, taus=[0.05], protect=False, keep_free=False).keep == ["cleans"]
    # the settings' default keeps it; pruned.json says where each pruned run stood
    states = group_states(group, PruneSettings(eta=4, rungs=(1,), thresholds=(0.05,), protect=False))
    assert {m: s.action for m, s in states.items()} == {
        "cleans": "train", "keeps": "train", "high": "pruned", "lost": "pruned"}
    assert states["lost"].record["standing"]["threshold-free"] == {"rank": 4, "of": 4}


def with_val(test_rows, *val_points, poisoned=0.9):
    """Rows carrying a validation split too: (val_acc1, val_asr1) per epoch 1, 2, ...; epoch 0's
    val_acc1 is ``poisoned``."""
    out = [dict(test_rows[0], val_acc1=poisoned, val_asr1=0.99)]
    return out + [dict(r, val_acc1=a, val_asr1=b)
                  for r, (a, b) in zip(test_rows[1:], val_points, strict=True)]


def test_with_a_validation_split_pruning_ranks_on_it_not_on_the_test_split():
    # the test split would keep "t" (feasible, 60) and prune "v"; the validation split says the opposite
    group = {"t": with_val(rows((0.60, 0.01)), (0.40, 0.30)),
             "v": with_val(rows((0.50, 0.40)), (0.55, 0.02))}
    d = decide(group, epoch=1, eta=2, taus=[0.05], protect=False, keep_free=False)
    assert d.keep == ["v"] and d.pruned == ["t"] and d.split == "val_"
    assert d.incumbents[0.05] == {"run": "v", "acc1": 0.55, "epoch": 1}
    test_only = {name: [{k: v for k, v in r.items() if not k.startswith("val_")} for r in run]
                 for name, run in group.items()}
    assert decide(test_only, epoch=1, eta=2, taus=[0.05], protect=False, keep_free=False).keep == ["t"]


def test_the_replay_selects_on_the_validation_split_and_reports_the_test_one():
    from clip_backdoor.study.prune import replay_groups

    # full grid: "a" is best on validation (val 0.55 at ASR 0.02) from epoch 2; pruning at rung 1 keeps
    # "b" (feasible on validation at epoch 1), so it loses a's epoch 2: a differing selection
    # "b" (val 0.35) misses 90% of the poisoned validation accuracy 0.4, so the threshold-free cell is
    # a's: its epoch 2 (test ASR 0.01) on the full grid, its epoch 1 (0.50) after pruning
    group = {"a": with_val(rows((0.50, 0.50), (0.45, 0.01)), (0.40, 0.50), (0.55, 0.02), poisoned=0.4),
             "b": with_val(rows((0.30, 0.01), (0.30, 0.01)), (0.35, 0.03), (0.35, 0.03), poisoned=0.4)}
    settings = PruneSettings(eta=2, rungs=(1,), thresholds=(0.05,), protect=False, keep=False)
    out = replay_groups({("g",): group}, {"a": 1e-3, "b": 1e-4}, settings, epochs=2)
    tau = out["groups"][0]["taus"][0.05]
    assert out["split"] == "validation"
    assert (tau["full"].lr, tau["full"].epoch, tau["full"].acc1) == (1e-3, 2, 0.45)  # test-reported
    assert (tau["pruned"].lr, tau["pruned"].acc1) == (1e-4, 0.30) and not tau["same"]
    keep = out["groups"][0]["keep"]
    assert (keep["full"].epoch, keep["full"].asr1) == (2, 0.01)
    assert (keep["pruned"].epoch, keep["pruned"].asr1) == (1, 0.50)
    assert not keep["same"] and out["agree"][KEEP_RULE] == 0


def test_group_states_train_wait_prune_and_finish():
    fresh = {"a": rows(), "b": rows(), "c": rows(), "d": rows()}
    assert {m: (s.action, s.stop) for m, s in group_states(fresh, SETTINGS).items()} == \
        {m: ("train", 1) for m in fresh}
    # two of four reached rung 1: those wait, the others train on to it
    half = {**fresh, "a": rows((0.5, 0.0)), "b": rows((0.4, 0.0))}
    assert {m: s.action for m, s in group_states(half, SETTINGS).items()} == \
        {"a": "wait", "b": "wait", "c": "train", "d": "train"}
    # all at rung 1: keep ceil(4 / 2) = 2, the others are pruned with their record
    at1 = {**half, "c": rows((0.45, 0.5)), "d": rows((0.3, 0.9))}  # neither above the incumbent (50)
    states = group_states(at1, SETTINGS)
    assert {m: (s.action, s.stop) for m, s in states.items()} == \
        {"a": ("train", 2), "b": ("train", 2), "c": ("pruned", None), "d": ("pruned", None)}
    record = states["c"].record
    assert (record["rung"], record["epoch"], record["survivors"]) == (1, 1, ["a", "b"])
    assert record["incumbent"]["0.05"]["run"] == "a" and record["standing"]["0.05"]["rank"] == 3
    # both survivors at rung 2: one is kept and trains to the end (stop None)
    at2 = {**at1, "a": rows((0.5, 0.0), (0.45, 0.0)), "b": rows((0.4, 0.0), (0.55, 0.0))}
    states = group_states(at2, SETTINGS)
    assert (states["b"].action, states["b"].stop) == ("train", None)
    assert states["a"].action == "pruned" and states["a"].record["rung"] == 2
    # a finished run is done whatever the decision; a dropped (failed) run is left out
    assert group_states(at2, SETTINGS, finished={"a"})["a"].action == "done"
    assert "c" not in group_states(half, SETTINGS, dropped={"c"})


def test_a_lone_survivor_trains_to_the_end_without_pausing():
    group = {"a": rows((0.5, 0.0)), "b": rows((0.1, 0.9)), "c": rows((0.2, 0.8))}
    states = group_states(group, PruneSettings(eta=3, rungs=(1, 2, 3), thresholds=(0.05,), keep=False))
    assert (states["a"].action, states["a"].stop) == ("train", None)
    assert group_states({"x": rows()}, SETTINGS)["x"].stop is None  # a one-lr group never pauses


def test_simulate_replays_the_rungs_on_full_trajectories():
    full = {
        "a": rows((0.50, 0.00), (0.45, 0.00), (0.40, 0.00), (0.38, 0.00)),
        "b": rows((0.40, 0.00), (0.48, 0.00), (0.44, 0.00), (0.42, 0.00)),
        "c": rows((0.60, 0.50), (0.58, 0.40), (0.55, 0.03), (0.50, 0.02)),
        "d": rows((0.30, 0.90), (0.30, 0.90), (0.30, 0.90), (0.30, 0.90)),
    }
    # rung 1: a, b feasible (50, 40); c protected (60 > 50); d pruned
    # rung 2: among a, b, c: keep ceil(3/2) = 2 -> b (48), a (45); c still protected (58 > 48)
    trained = simulate(full, SETTINGS, epochs=4)
    assert trained == {"a": 4, "b": 4, "c": 4, "d": 1}
    assert compute_share(trained, 4) == pytest.approx(13 / 16)
    strict = PruneSettings(eta=4, rungs=(1,), thresholds=(0.05,), keep=False)
    assert simulate(full, strict, epochs=4) == {"a": 4, "b": 1, "c": 4, "d": 1}


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prune, message", [
    ({"eta": 3, "rungs": [5]}, "cleaning.prune.rungs: [5] leaves no rung before the last cleaning epoch"),
    ({"eta": 3, "rungs": [2, 5]}, "cleaning.prune.rungs: 5 is not before the last cleaning epoch"),
    ({"eta": 3, "rungs": []}, "cleaning.prune.rungs: give the epochs"),
    ({"eta": 3, "rungs": [3, 2]}, "cleaning.prune.rungs[1]: 2 must come after 3"),
    ({"eta": 1, "rungs": [1]}, "cleaning.prune.eta: 1 must be an integer >= 2"),
    ({"eta": 3, "rungs": [0]}, "cleaning.prune.rungs[0]: 0 is not an epoch"),
    ({"rungs": [1], "every": 2}, "cleaning.prune.every: unknown key"),
    ({"rungs": [1], "thresholds": [5]}, "cleaning.prune.thresholds[0]: 5 must be an ASR fraction"),
    ({"rungs": [1], "keep": "yes"}, "cleaning.prune.keep: expected true or false"),
])
def test_bad_prune_settings_name_the_key(prune, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_prune(prune, epochs=5, thresholds=[0.05])


def test_prune_defaults_and_validation_in_the_study_file():
    assert parse_prune({"rungs": [1, 3]}, 5, [0.01, 0.05]) == PruneSettings(3, (1, 3), (0.01, 0.05), True,
                                                                             True)
    assert not parse_prune({"rungs": [1], "protect": False}, 5, [0.05]).protect
    with pytest.raises(UserError, match="cleaning.prune.protect: expected true or false"):
        parse_prune({"rungs": [1], "protect": "no"}, 5, [0.05])
    assert parse_prune(None, 5, [0.05]) is None
    from test_study import tiny

    with pytest.raises(UserError, match="cleaning.prune.rungs"):
        parse_spec(tiny(cleaning={"prune": {"rungs": [1]}}))  # tiny() cleans for 1 epoch


# --------------------------------------------------------------------------------------------
# The report: "not explored" is not "none"
# --------------------------------------------------------------------------------------------
def results(pruned_b):
    def row(run, lr, epoch, acc, asr, pruned=None):
        return {"seed": 0, "stage": "clean", "pretrain": "mmcl", "method": "cleanclip", "lr": lr, "k": 0,
                "epoch": epoch, "acc1": acc, "asr1": asr, "run": run, "pruned": pruned}

    return [row("a", 1e-5, 0, 0.5, 0.99), row("a", 1e-5, 1, 0.5, 0.50), row("a", 1e-5, 2, 0.5, 0.40),
            row("b", 1e-4, 0, 0.5, 0.99), row("b", 1e-4, 1, 0.4, 0.60, 1 if pruned_b else None)]


def test_a_group_with_pruned_runs_is_not_explored_rather_than_none():
    pick = next(r for r in select_per_seed(results(False), (0.05,)) if r["rule"] == "asr<=5%")
    assert pick["status"] == "none" and pick["n_pruned"] == 0
    pick = next(r for r in select_per_seed(results(True), (0.05,)) if r["rule"] == "asr<=5%")
    assert pick["status"] == "not-explored" and pick["n_pruned"] == 1
    from clip_backdoor.study.headline import headline_table

    table = headline_table(results(True), 0.05)
    assert "| not explored |" in table and "Pruned (cleaning.prune): 1 of 2 cleaning runs" in table


# --------------------------------------------------------------------------------------------
# A pruned study: paused runs keep the full schedule, so the replay of the full grid is exact
# --------------------------------------------------------------------------------------------
def test_pruned_study_matches_the_replay_of_its_full_grid(tmp_path, caplog):
    from test_study import tiny

    prune = {"eta": 3, "rungs": [1, 2]}
    spec = tiny(cleaning={"methods": [{"name": "mmcl", "k": [0]}], "lrs": [1e-4, 1e-3, 1e-2], "epochs": 3,
                          "prune": prune})
    root = tmp_path / "s"
    caplog.set_level("INFO")
    assert runner.run_study(parse_spec(spec), root) == 0
    runs = {r.name: r for r in runner.expand(parse_spec(spec), root).runs if r.stage == "clean"}
    stopped = {name: max(r["epoch"] for r in read_jsonl(root / name / "metrics.jsonl")) for name in runs}
    pruned = {name: json.loads((root / name / "pruned.json").read_text())
              for name in runs if (root / name / "pruned.json").is_file()}
    assert pruned and all(stopped[n] == p["epoch"] for n, p in pruned.items())
    assert sum(stopped.values()) < 3 * len(runs) and "pruned at epoch" in caplog.text
    partial = {n: read_jsonl(root / n / "metrics.jsonl") for n in runs}
    header = (root / "results.csv").read_text().splitlines()[0]
    assert header.endswith(",run,pruned")
    assert (root / "report/runs.md").read_text().count("(pruned)") == len(pruned)
    with pytest.raises(UserError, match="no group whose cleaning runs all finished"):
        runner.prune_check(runner.plan_for_dir(root), None, None)  # a pruned grid cannot be replayed

    # --no-prune finishes the pruned runs from their checkpoints; the full grid replayed gives the
    # same stopping epochs, and the pruned runs' epochs are the full runs' first epochs
    assert runner.run_study(parse_spec(spec), root, prune=False) == 0
    full = {n: read_jsonl(root / n / "metrics.jsonl") for n in runs}
    assert all(not (root / n / "pruned.json").exists() for n in runs)
    assert all(max(r["epoch"] for r in rows_) == 3 for rows_ in full.values())
    settings = parse_prune(prune, 3, [0.01, 0.05, 0.10])
    replay = simulate(full, settings, 3, tiebreak={n: r.lr for n, r in runs.items()})
    assert replay == stopped

    def timeless(rows_):
        return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in rows_]

    for name in runs:
        assert timeless(full[name][:len(partial[name])]) == timeless(partial[name])
    # study prune-check on the full grid says what the pruned study used
    out = runner.prune_check(runner.plan_for_dir(root), None, None)
    assert f"compute: {100 * sum(stopped.values()) / (3 * len(runs)):.1f}% of the full grid" in out
    assert "at ASR ≤ 5%: 1 of 1 groups (100%)" in out
    only5 = runner.prune_check(runner.plan_for_dir(root), 3, "1", protect=False, thresholds="0.05")
    assert "eta=3 rungs=[1] protect=False keep=True thresholds=['0.05']" in only5 and "ASR ≤ 1%" not in only5


def test_dry_run_submits_cleaning_runs_to_the_first_rung(tmp_path, capsys):
    from test_study import tiny, write_study

    spec = tiny(cleaning={"lrs": [1e-4, 1e-3, 1e-2], "epochs": 3, "prune": {"rungs": [1]}},
                run={"threads": None})  # the runner picks the threads: cores // jobs
    path = write_study(tmp_path, spec)
    from clip_backdoor.cli import main as cli

    assert cli(["study", "run", str(path), "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("local (this process): clean/") == 6 and out.count("stop_epoch=1 of 3") == 6
    assert out.count(f"threads={runner.cpu_cores()}") == 7  # pruned runs keep the runner's settings
    assert not (tmp_path / "s").exists()  # a dry run writes nothing
