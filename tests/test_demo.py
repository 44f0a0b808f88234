"""The end-to-end test: `clip-backdoor demo --quick` runs the demo study (poison, both pre-training
objectives, every cleaning method, the k-poison variant) in parallel workers and writes the report."""

import csv

from clip_backdoor.study.expand import expand
from clip_backdoor.study.results import RESULT_COLUMNS
from clip_backdoor.study.spec import load_spec

# quick_demo (tests/conftest.py): the demo runs once per session; the browser and status tests read it too.


def test_quick_demo_writes_results_and_report(quick_demo, capsys):
    code, out = quick_demo
    assert code == 0
    for name in ("index.html", "headline.md", "selection.md", "selection.csv", "acc_vs_asr.png",
                 "acc_vs_asr.svg", "trajectories.png", "pretraining.png", "k_poisons.png"):
        assert (out / "report" / name).is_file(), name

    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == RESULT_COLUMNS
        rows = list(reader)
    plan = expand(load_spec(out / "study.yaml"), out)
    expected = []  # (run, epoch) in plan order: pre-training (and baseline) epochs 1..E, cleaning 0..E
    for run in plan.runs:
        first = 0 if run.stage == "clean" else 1
        expected += [(run.name, str(e)) for e in range(first, run.cfg.epochs + 1)]
    assert [(r["run"], r["epoch"]) for r in rows] == expected
    assert {r["pretrain"] for r in rows} == {"mmcl", "mmcl+ssl"}
    assert {r["method"] for r in rows if r["stage"] == "clean"} == {"cleanclip", "mmcl", "ssl"}
    assert {r["k"] for r in rows if r["method"] == "cleanclip"} == {"0", "2"}


def test_quick_demo_mmcl_model_beats_chance(quick_demo):
    _, out = quick_demo
    with open(out / "results.csv", newline="") as f:
        final = [r for r in csv.DictReader(f) if r["run"] == "pretrain/mmcl,seed=0"][-1]
    n, acc = int(final["n"]), float(final["acc1"])
    # 10 balanced classes: chance is 10%; 3 standard deviations above it at this n
    chance = 0.1
    assert acc > chance + 3 * (chance * (1 - chance) / n) ** 0.5, (acc, n)
