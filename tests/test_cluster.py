"""Studies on clusters: SLURM through submitit (debug and local executors, a 2-process gloo
pre-training job preempted and requeued), claims, the sbatch scripts of --dry-run, and the one-line
errors for bad cluster settings."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clip_backdoor.cli import main as cli
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import read_jsonl
from clip_backdoor.study import claims, runner
from clip_backdoor.study.expand import expand
from clip_backdoor.study.slurm import SlurmExecutor, parse_slurm, time_minutes
from clip_backdoor.study.spec import parse_spec
from test_study import tiny, write_study

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Settings: what SLURM would reject is one line naming the key
# --------------------------------------------------------------------------------------------
def test_slurm_times_in_minutes():
    assert [time_minutes(t, "t") for t in ("90", "1:30", "2:00:00", "1-0", "1-2:30", "0-0:0:59")] == \
        [90, 2, 120, 1440, 1590, 1]


@pytest.mark.parametrize("settings, message", [
    ({"time": "25 hours"}, "run.slurm.time: '25 hours' is not a SLURM time"),
    ({"time": 86400}, "run.slurm.time: 86400 is a number; write a SLURM time as a quoted string"),
    ({"time": "0"}, "run.slurm.time: '0' is no time at all"),
    ({"mem": "64 GB"}, "run.slurm.mem: '64 GB' is not a SLURM memory size"),
    ({"mem": "1.5G"}, "run.slurm.mem: '1.5G' is not a SLURM memory size"),
    ({"partition": "gpu queue"}, "run.slurm.partition: 'gpu queue' is not a SLURM partition name"),
    ({"clean": {"gpus_per_node": "two"}}, "run.slurm.clean.gpus_per_node: expected int or NoneType"),
    ({"pretrain": {"cpus_per_task": 0}}, "run.slurm.pretrain.cpus_per_task: 0 is not an integer >= 1"),
    ({"account": "my project"}, "run.slurm.account: 'my project' is not a SLURM account name"),
    ({"clean": {"tasks_per_node": 2}}, "run.slurm.clean: a cleaning run is one process"),
    ({"gpus": 1}, "run.slurm.gpus: unknown key"),
    ({"pretrain": {"gpu": 1}}, "run.slurm.pretrain.gpu: unknown key"),
    ({"cluster": "pbs"}, "run.slurm.cluster: 'pbs' is not one of slurm, local, debug"),
    ({"additional": {"bad option": 1}}, "run.slurm.additional: 'bad option' is not an sbatch option"),
])
def test_bad_slurm_settings_name_the_key(settings, message):
    with pytest.raises(UserError) as info:
        parse_slurm(settings)
    assert message in str(info.value)


def test_stage_sections_override_the_shared_keys():
    s = parse_slurm({"partition": "gpu", "time": "1:00:00", "pretrain": {"nodes": 2, "time": "2-00:00:00"}})
    assert (s.pretrain.partition, s.pretrain.nodes, s.pretrain.time) == ("gpu", 2, "2-00:00:00")
    assert (s.clean.partition, s.clean.nodes, s.clean.time) == ("gpu", 1, "1:00:00")


def test_flags_win_over_the_stage_sections_of_the_file(tmp_path):
    spec = runner.load_for_command(str(write_study(tmp_path, tiny())), [
        "run.executor=slurm", "run.slurm={time: '1:00:00', pretrain: {time: '2-00:00:00', nodes: 2}}"],
        cluster={"time": "30:00", "gpus": "4"})
    s = parse_slurm(spec.run.slurm)
    assert (s.pretrain.time, s.clean.time, s.pretrain.nodes) == ("30:00", "30:00", 2)
    assert s.pretrain.gpus_per_node == s.clean.gpus_per_node == 4


def bad_cli(tmp_path, capsys, *args, spec=None):
    path = write_study(tmp_path, spec or tiny())
    code = cli(["study", "run", str(path), "--out", str(tmp_path / "s"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_bad_cluster_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    line = bad_cli(tmp_path, capsys, "--executor", "pbs")
    assert "run.executor: 'pbs' is not one of local, slurm, ray" in line
    assert "--time: not an option of the local executor" in bad_cli(tmp_path, capsys, "--time", "1:00:00")
    line = bad_cli(tmp_path, capsys, "--executor", "slurm", "--mem", "lots")
    assert "run.slurm.mem: 'lots' is not a SLURM memory size" in line and "--mem" in line
    # a study directory under /tmp cannot be shared with the nodes of a cluster
    line = bad_cli(tmp_path, capsys, "--executor", "slurm", "--dry-run")
    assert f"study directory {tmp_path / 's'}: /tmp is local to each machine" in line
    # a missing optional dependency says which extra installs it
    monkeypatch.setitem(sys.modules, "submitit", None)
    line = bad_cli(tmp_path, capsys, "--executor", "slurm", "run.slurm.cluster=local")
    assert "run.executor=slurm: needs the submitit package; install clip-backdoor[slurm]" in line
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_no_sbatch_on_path_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    plan = expand(parse_spec(tiny()), "/shared/study")
    with pytest.raises(UserError, match="sbatch is not on PATH"):
        SlurmExecutor(parse_slurm({}), plan)


# --------------------------------------------------------------------------------------------
# --dry-run: the sbatch scripts of the paper's study
# --------------------------------------------------------------------------------------------
PAPER_SLURM = ["--executor", "slurm", "--partition", "gpu", "--account", "proj",
               "run.slurm.pretrain={nodes: 2, tasks_per_node: 8, gpus_per_node: 8, cpus_per_task: 10, "
               "mem: 480G, time: '3-00:00:00'}",
               "run.slurm.clean={gpus_per_node: 1, cpus_per_task: 8, mem: 64G, time: '12:00:00'}"]


def test_dry_run_prints_the_sbatch_scripts_of_the_paper_study(capsys):
    root = "/shared/runs/paper-cc3m"  # never created: a dry run writes nothing
    assert cli(["study", "run", str(REPO / "configs/paper-cc3m.yaml"), "--out", root, "--dry-run",
                *PAPER_SLURM]) == 0
    out = capsys.readouterr().out
    pre, clean = out.split("## cleaning runs of pretrain/mmcl,seed=0")[0], out.split("## cleaning runs of")[1]
    assert out.count("#!/bin/bash") == 4  # 2 pre-training jobs + one cleaning array per pre-training run
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --mem=480G", "#SBATCH --time=4320",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --signal=USR2@120",
                 "#SBATCH --requeue", "2 node(s) x 8 task(s)"):
        assert line in pre, line
    n_clean = (6 + 1 + 1) * 12  # (cleanclip k in 0,1,2,5,10,25 + mmcl + ssl) x 12 learning rates
    assert f"#SBATCH --array=0-{n_clean - 1}%{min(n_clean, 256)}" in clean
    assert "#SBATCH --gpus-per-node=1" in clean and "#SBATCH --time=720" in clean
    assert "#   0: clean/mmcl,seed=0/cleanclip/lr=1e-9" in clean
    assert "# batch_size 2048 is the global batch: 128 per process" in pre
    assert not Path(root).exists()
    # a global batch that does not split over the job's processes is refused before any submission
    assert cli(["study", "run", str(REPO / "configs/paper-cc3m.yaml"), "--out", root, "--dry-run",
                *PAPER_SLURM, "pretrain.objectives=[{name: mmcl, batch_size: 1000}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_size 1000 (the global batch) does not split over the job's 16" in err[0]


# --------------------------------------------------------------------------------------------
# submitit's executors
# --------------------------------------------------------------------------------------------
def test_debug_executor_runs_a_study_with_a_cleaning_array(tmp_path, caplog):
    spec = parse_spec(tiny(cleaning={"methods": [{"name": "mmcl", "k": [0]}]},
                           run={"executor": "slurm", "slurm": {"cluster": "debug"}}))
    caplog.set_level("INFO")
    assert runner.run_study(spec, tmp_path / "s") == 0
    assert "submitted array" in caplog.text and "of 2 cleaning runs" in caplog.text
    for name in ("pretrain/mmcl,seed=0", "clean/mmcl,seed=0/mmcl/lr=1e-4", "clean/mmcl,seed=0/mmcl/lr=1e-3"):
        assert (tmp_path / "s" / name / "finished.json").is_file()
        assert not (tmp_path / "s" / name / "claim.json").exists()  # released when done


def epochs_done(run_dir: Path) -> int:
    """The epochs in a run's metrics.jsonl so far (latest.pt may wait checkpoint_interval_s)."""
    path = run_dir / "metrics.jsonl"
    return max((r["epoch"] for r in read_jsonl(path)), default=0) if path.is_file() else 0


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_two_process_job_preempted_requeued_and_resumed(tmp_path):
    """A pre-training run as one 2-task job (gloo, torchrun environment from submitit) through the
    local executor: SIGUSR2 (the time-limit warning) mid-run, a mid-epoch checkpoint, submitit's
    requeue, and the requeued job resumes from that step to the end."""
    spec = parse_spec(tiny(data={"num_samples": 512}, pretrain={"epochs": 3, "batch_size": 32},
                           run={"executor": "slurm", "slurm": {"cluster": "local", "time": "10",
                                                               "pretrain": {"tasks_per_node": 2}}}))
    plan = expand(spec, tmp_path / "s")
    runner.make_poison(plan)
    run = plan.runs[0]
    run_dir = Path(run.cfg.run_dir)
    executor = SlurmExecutor(spec_settings := parse_slurm(spec.run.slurm), plan)
    assert spec_settings.pretrain.tasks_per_node == 2
    [job] = executor.submit([(run, True)])
    try:
        _wait_for(lambda: epochs_done(run_dir) >= 1, 240, "the first epoch")
        # what SLURM (and submitit's local controller) does signal_delay_s before the time limit:
        # SIGUSR2 to every task of the job
        tasks = subprocess.run(["pgrep", "-P", str(job.ref._process.pid)], capture_output=True, text=True)
        assert len(tasks.stdout.split()) == 2, tasks
        for pid in tasks.stdout.split():
            os.kill(int(pid), signal.SIGUSR2)
        results = []
        _wait_for(lambda: results.extend(executor.wait([job], timeout=1)) or results, 240, "the job")
    finally:
        job.ref.cancel(check=False)
    [(_, result)] = results
    assert result["ok"], result
    log = (run_dir / "train.log").read_text()
    assert "received SIGUSR2" in log and "resuming" in log and ", batch " in log, log
    assert (run_dir / "train.rank1.log").is_file()  # the second process of the job
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["step"] for r in rows] == [16, 32, 48]  # 512 pairs / a global batch of 32 (16 a rank)
    submitit_log = "".join(p.read_text() for p in (tmp_path / "s/slurm").rglob("*_0_log.out"))
    assert "Requeued job" in submitit_log


# --------------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------------
def test_claims_live_stale_and_taken_over(tmp_path, caplog):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_dir = tmp_path / "run"
        assert claims.acquire(run_dir, job="local", executor="local") is None
        claims.update(run_dir, pid=other.pid)  # as if that process held it
        holder = claims.acquire(run_dir, job="local", executor="local")
        assert holder is not None and holder["pid"] == other.pid  # alive on this host: live
        # a remote claim is live while its heartbeat is fresh ...
        claims.update(run_dir, host="node-17", executor="slurm", job="slurm:123")
        assert claims.acquire(run_dir, job="x", executor="slurm")["job"] == "slurm:123"
        # ... unless the executor knows the job is gone; or once the heartbeat is old
        assert claims.acquire(run_dir, job="x", executor="slurm", job_alive=lambda c: False) is None
        claims.update(run_dir, host="node-17", job="slurm:124")
        old = time.time() - 3600
        os.utime(run_dir / "claim.json", (old, old))
        caplog.set_level("WARNING")
        assert claims.acquire(run_dir, job="y", executor="slurm", stale_after=600) is None
        assert "taking over a stale claim (job slurm:124" in caplog.text
        assert claims.read(run_dir)["job"] == "y"
        # a claim of this very process is a leftover (it is not running that run now): not live
        assert claims.acquire(run_dir, job="z", executor="local") is None
    finally:
        other.kill()
        other.wait()
    claims.update(run_dir, pid=other.pid, host=claims.host(), executor="local")
    assert claims.acquire(run_dir, job="w", executor="local") is None  # that process has exited


def test_a_run_claimed_by_another_study_run_is_left_alone(tmp_path, caplog):
    spec = parse_spec(tiny())
    root = tmp_path / "s"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pre = root / "pretrain/mmcl,seed=0"
        claims.acquire(pre, job="local", executor="local")
        claims.update(pre, pid=other.pid)
        caplog.set_level("INFO")
        assert runner.run_study(spec, root) == 0
    finally:
        other.kill()
        other.wait()
    assert "pretrain/mmcl,seed=0: not submitted, it is claimed by job local" in caplog.text
    assert caplog.text.count("its pre-training run pretrain/mmcl,seed=0 is claimed elsewhere") == 4
    assert not (root / "pretrain/mmcl,seed=0/metrics.jsonl").exists()
    caplog.clear()
    assert runner.run_study(spec, root) == 0  # the holder has gone: taken over and trained
    assert "taking over a stale claim" in caplog.text
    assert (root / "pretrain/mmcl,seed=0/finished.json").is_file()


def test_sigterm_stops_a_local_study_and_a_rerun_resumes(tmp_path):
    """The study process gets SIGTERM while a run trains: the run writes its mid-epoch checkpoint,
    the study exits 75, and the same command goes on from there."""
    path = write_study(tmp_path, tiny(data={"num_samples": 2048}, pretrain={"epochs": 2, "batch_size": 32}))
    root = tmp_path / "s"
    cmd = [sys.executable, "-m", "clip_backdoor.cli", "study", "run", str(path), "--out", str(root),
           "--only", "pretrain"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: epochs_done(root / "pretrain/mmcl,seed=0") >= 1, 240, "epoch 1")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, err
    assert "stopped by a signal: rerun the same command to go on" in err
    run_dir = root / "pretrain/mmcl,seed=0"
    from clip_backdoor.weights import load_checkpoint

    assert load_checkpoint(run_dir / "checkpoints/latest.pt")["mid_epoch"]["epoch"] == 2
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=240).returncode == 0
    assert "batch" in (run_dir / "train.log").read_text().split("resuming")[1].splitlines()[0]
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
