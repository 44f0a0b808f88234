"""Ray Core tasks: a study on a local Ray started in a subprocess (its own session, a timeout, every
Ray process killed at the end and checked gone), task specs of --dry-run, one-line errors."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from clip_backdoor.cli import main as cli
from clip_backdoor.fileio import read_jsonl
from test_study import tiny, write_study

REPO = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    import ray
    from clip_backdoor.study import runner
    from clip_backdoor.study.spec import load_spec

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, _temp_dir=sys.argv[3])
    spec = load_spec(sys.argv[1], ["run.executor=ray", "run.ray={num_cpus: 1, max_retries: 1}"])
    code = runner.run_study(spec, Path(sys.argv[2]), only="pretrain")
    ray.shutdown()
    print("study exit code", code)
""")


def session_processes(sid: int) -> list[str]:
    """Live (not zombie) processes of a session: Ray's agents change their process group, not it."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()
            if line.split()[1] == str(sid) and not line.split()[2].startswith("Z")]


def kill_session(sid: int) -> None:
    for line in session_processes(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split()[0]), signal.SIGKILL)


def test_a_study_runs_as_ray_tasks_on_a_local_cluster(tmp_path):
    path = write_study(tmp_path, tiny())
    root = tmp_path / "s"
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(root), temp], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own session and process group
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        kill_session(proc.pid)
        deadline = time.monotonic() + 10
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = session_processes(proc.pid)
        subprocess.run(["rm", "-rf", temp])
    assert not left, f"Ray processes left behind: {left}"
    assert proc.returncode == 0 and "study exit code 0" in out, out
    run_dir = root / "pretrain/mmcl,seed=0"
    assert (run_dir / "finished.json").is_file() and not (run_dir / "claim.json").exists()
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1]
    assert "threads: 1" in (run_dir / "config.yaml").read_text()  # the task's num_cpus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error_line(tmp_path, capsys, *args) -> str:
    path = write_study(tmp_path, tiny())
    code = cli(["study", "run", str(path), "--out", str(tmp_path / "s"), "--executor", "ray", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_unreachable_ray_address_is_one_line(tmp_path, capsys):
    # a remote cluster needs a shared study directory; this one is only checked for reachability
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    line = one_error_line(tmp_path, capsys, "--ray-address", address, "run.ray.connect_timeout_s=2")
    assert "study directory" in line and "/tmp is local to each machine" in line
    shared = Path.cwd() / ".ray-address-check"  # not created: refused before anything is written
    code = cli(["study", "run", str(write_study(tmp_path, tiny())), "--out", str(shared), "--executor", "ray",
                "--ray-address", address, "run.ray.connect_timeout_s=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"run.ray.address {address}: no Ray cluster answers there" in err[0]
    assert not shared.exists()


def test_missing_ray_and_bad_ray_settings(tmp_path, capsys, monkeypatch):
    line = one_error_line(tmp_path, capsys, "run.ray.clean={num_gpus: 2}")
    assert "run.ray.clean.num_gpus: a cleaning run is one process" in line
    line = one_error_line(tmp_path, capsys, "run.ray.num_cpu=2")
    assert "run.ray.num_cpu: unknown key" in line
    monkeypatch.setitem(sys.modules, "ray", None)
    assert "run.executor=ray: needs the ray package; install clip-backdoor[ray]" in \
        one_error_line(tmp_path, capsys)


def test_dry_run_prints_ray_task_specs_with_torchrun_for_several_gpus(tmp_path, capsys):
    path = write_study(tmp_path, tiny())
    assert cli(["study", "run", str(path), "--out", str(tmp_path / "s"), "--executor", "ray", "--dry-run",
                "run.ray={pretrain: {num_gpus: 4, num_cpus: 32}, clean: {num_gpus: 1, num_cpus: 8}}"]) == 0
    out = capsys.readouterr().out
    assert "ray task pretrain/mmcl,seed=0: num_cpus=32 num_gpus=4 device=cuda" in out
    assert "-m torch.distributed.run --standalone --nproc_per_node=4 -m clip_backdoor.study.worker" in out
    assert out.count("num_cpus=8 num_gpus=1 device=cuda threads=1") == 4
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("field", ["num_gpus"])
def test_fractional_gpus_above_one_are_refused(field):
    from clip_backdoor.errors import UserError
    from clip_backdoor.study.ray_tasks import parse_ray

    with pytest.raises(UserError, match=r"run.ray.pretrain.num_gpus: 1.5 GPUs"):
        parse_ray({"pretrain": {field: 1.5}})
    assert parse_ray({"clean": {field: 0.5}}).clean.num_gpus == 0.5  # a share of one GPU is fine


def test_a_several_gpu_task_runs_the_run_under_torchrun(tmp_path, monkeypatch):
    """What a Ray task with num_gpus > 1 does, here with 2 gloo processes on CPU and without Ray:
    torchrun runs the worker module in each rank; rank 0 writes the run; the outcome is read back."""
    from clip_backdoor.study import runner, worker
    from clip_backdoor.study.expand import expand
    from clip_backdoor.study.ray_tasks import run_task
    from clip_backdoor.study.spec import parse_spec

    monkeypatch.setattr(worker, "init_worker", lambda: None)  # a Ray worker's set-up, not this process's
    plan = expand(parse_spec(tiny()), tmp_path / "s")
    runner.make_poison(plan)
    run = plan.runs[0]
    result = run_task(run.name, run.cfg, True, nproc=2)
    assert result["ok"], result
    run_dir = tmp_path / "s" / run.name
    assert (run_dir / "finished.json").is_file() and (run_dir / "train.rank1.log").is_file()
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [4]  # 256 / a global 64


def test_this_process_never_imported_ray():
    """The tests above run the executor's code in this process short of starting Ray; importing ray
    here would leave grpc threads that make later forked dataloader workers hang."""
    assert "ray" not in sys.modules
