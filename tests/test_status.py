"""`clip-backdoor study status`: states, last metrics and ETA of a study directory, from hand-made run
directories with known timings, from a study while it runs, and from the finished quick demo."""

import json
import os

import pytest
import yaml

from clip_backdoor.cli import main as cli
from clip_backdoor.study import runner
from clip_backdoor.study.expand import expand
from clip_backdoor.study.spec import parse_spec, resolved_yaml
from clip_backdoor.study.status import format_status, study_status
from test_study import tiny

NOW = 1_800_000_000.0
PRE = "pretrain/mmcl,seed=0"
DONE, RUNNING, FAILED, PENDING = (f"clean/mmcl,seed=0/mmcl/{t}" for t in ("lr=1e-4", "lr=1e-4,k=2",
                                                                              "lr=1e-3", "lr=1e-3,k=2"))


def make_study(root, jobs=1):
    spec = parse_spec(tiny(cleaning={"epochs": 3}, run={"jobs": jobs, "threads": 1}))
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.yaml").write_text(resolved_yaml(spec))
    return expand(spec, root)


def write(path, text, age=0.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (NOW - age, NOW - age))


def lines(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def study(tmp_path):
    """pre-training finished (40 s, 1 epoch); cleaning: one finished (3 epochs in 30 s), one running
    (epoch 1 of 3 logged, last write 4 s ago), one failed, one not started."""
    root = tmp_path / "s"
    make_study(root)
    write(root / PRE / "metrics.jsonl", lines({"epoch": 1, "seconds": 35.0, "acc1": 0.4, "asr1": 0.9}), 900)
    write(root / PRE / "finished.json", json.dumps({"epochs": 1, "seconds": 40.0,
                                                    "last": {"epoch": 1, "acc1": 0.4, "asr1": 0.9}}), 900)
    write(root / DONE / "metrics.jsonl", lines(*({"epoch": e, "seconds": 8.0, "acc1": 0.3, "asr1": 0.1}
                                                 for e in range(4))), 300)
    write(root / DONE / "finished.json", json.dumps({"epochs": 3, "seconds": 30.0,
                                                     "last": {"epoch": 3, "acc1": 0.3, "asr1": 0.1}}), 300)
    write(root / RUNNING / "train.log", "...", 60)
    write(root / RUNNING / "metrics.jsonl", lines({"epoch": 0, "acc1": 0.4, "asr1": 0.9},
                                                  {"epoch": 1, "seconds": 9.0, "acc1": 0.35, "asr1": 0.5})
          + '{"epoch": 2, "sec', 4)  # a torn line: its writer was killed mid-line
    write(root / FAILED / "train.log", "...", 200)
    write(root / FAILED / "error.log",
          "Traceback (most recent call last):\n  ...\nRuntimeError: out of memory\n", 100)
    return root


def by_name(statuses):
    return {s.run.name: s for s in statuses}


def test_states_metrics_and_eta(study):
    plan, statuses = study_status(study, now=NOW)
    s = by_name(statuses)
    assert [s[n].state for n in (PRE, DONE, RUNNING, FAILED, PENDING)] == [
        "finished", "finished", "running", "failed", "pending"]
    assert s[RUNNING].epoch == 1 and s[RUNNING].metrics["asr1"] == 0.5  # the torn line is not there yet
    assert s[FAILED].note == "RuntimeError: out of memory"
    assert s[PRE].metrics["acc1"] == 0.4
    # 10 s per cleaning epoch (the finished one: 30 s / 3): running has 2 epochs left, 4 s into the next
    assert s[RUNNING].seconds_per_epoch == pytest.approx(10.0)
    assert s[RUNNING].remaining_s == pytest.approx(2 * 10 - 4)
    assert s[PENDING].remaining_s == pytest.approx(3 * 10)
    text = format_status(plan, statuses)
    assert "5 runs: 2 finished, 1 running, 1 failed, 1 pending; ETA 46s at 1 job(s)" in text
    assert "asr1 50.0%" in text and "RuntimeError: out of memory" in text


def test_eta_divides_the_work_over_the_jobs(study):
    spec = yaml.safe_load((study / "study.yaml").read_text())
    spec["run"]["jobs"] = 2
    (study / "study.yaml").write_text(yaml.safe_dump(spec))
    assert "ETA 23s at 2 job(s)" in format_status(*study_status(study, now=NOW))


def test_a_rerun_after_a_failure_is_running_and_a_silent_run_has_stopped(study):
    os.utime(study / FAILED / "train.log", (NOW - 1, NOW - 1))  # `study run` again: newer than error.log
    assert by_name(study_status(study, now=NOW)[1])[FAILED].state == "running"
    later = NOW + 3600  # an hour without a write, where an epoch takes 10 s: `study run` was stopped
    s = by_name(study_status(study, now=later)[1])[RUNNING]
    assert s.state == "stopped" and s.remaining_s == pytest.approx(2 * 10) and "resumes it" in s.note


def test_half_written_finished_json_is_not_finished(study):
    write(study / RUNNING / "finished.json", '{"epochs": 3, "seco', 0)
    assert by_name(study_status(study, now=NOW)[1])[RUNNING].state == "running"


def test_finished_for_fewer_epochs_than_the_study_asks_is_not_finished(study):
    """The study file now asks for 3 cleaning epochs; a run that finished 2 has one to go."""
    write(study / RUNNING / "finished.json", json.dumps({"epochs": 2, "seconds": 20.0}), 4)
    assert by_name(study_status(study, now=NOW)[1])[RUNNING].state == "running"


def test_without_any_measured_epoch_the_eta_is_unknown(tmp_path):
    root = tmp_path / "s"
    make_study(root)
    plan, statuses = study_status(root, now=NOW)
    assert {s.state for s in statuses} == {"pending"}
    assert "5 pending; ETA unknown" in format_status(plan, statuses)
    assert "data/poisoned: not made yet" in format_status(plan, statuses)


def test_a_cleaning_run_behind_a_failed_pretraining_waits(tmp_path):
    root = tmp_path / "s"
    make_study(root)
    write(root / PRE / "train.log", "...", 50)
    write(root / PRE / "error.log", "UserError: data.path: file not found\n", 10)
    s = by_name(study_status(root, now=NOW)[1])
    assert s[PRE].state == "failed" and s[DONE].note == f"waits for {PRE}, which failed"


def test_status_of_a_directory_without_a_study_is_one_line(tmp_path, capsys):
    assert cli(["study", "status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no study.yaml here" in err and len(err.strip().splitlines()) == 1


def test_status_while_the_study_runs(tmp_path, monkeypatch):
    """Called from inside a cleaning run of a real `study run`: the pre-training is finished, the
    cleaning run is running, and nothing is written by status."""
    import clip_backdoor.train.loop as loop

    root = tmp_path / "live"
    spec = parse_spec(tiny(cleaning={"methods": ["mmcl"], "lrs": [1e-4], "k": [0]}))
    real, seen = loop.train, {}

    def train_and_look(cfg, recipe=None):
        if cfg.init_checkpoint:
            before = sorted(p for p in root.rglob("*"))
            seen["states"] = {s.run.name: s.state for s in study_status(root)[1]}
            seen["unchanged"] = before == sorted(p for p in root.rglob("*"))
        return real(cfg, recipe)

    monkeypatch.setattr(loop, "train", train_and_look)
    assert runner.run_study(spec, root) == 0
    assert seen["states"] == {PRE: "finished", "clean/mmcl,seed=0/mmcl/lr=1e-4": "running"}
    assert seen["unchanged"]
    assert {s.state for s in study_status(root)[1]} == {"finished"}


def test_status_of_the_finished_quick_demo(quick_demo, capsys):
    code, out = quick_demo
    assert code == 0
    assert cli(["study", "status", str(out)]) == 0
    text = capsys.readouterr().out
    n = len(expand(parse_spec(yaml.safe_load((out / "study.yaml").read_text())), out).runs)
    assert f"{n} runs: {n} finished; done" in text
    assert text.count("\n  finished ") == n
