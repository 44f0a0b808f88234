"""Ray Core tasks (not Tune): one task per run, with ``num_gpus`` / ``num_cpus`` per run, on an
existing cluster (``address``) or on a Ray started here.

Settings (``run.ray`` in the study file; ``study run --ray-address`` overrides ``address``)::

    run:
      executor: ray
      ray:
        address: head-node:6379   # an existing cluster (host:port, ray://host:port or auto); none: start one
        num_cpus: 8               # shared by both stages ...
        pretrain: {num_gpus: 8}   # > 1 GPU: the task launches torchrun, one process per GPU
        clean: {num_gpus: 1}
        max_retries: 3            # a task whose worker died (node lost, OOM-killed) runs again and resumes

Each task runs in a fresh worker process (``max_calls=1``: no CUDA or torch state carried over),
with the GPUs Ray assigned it in ``CUDA_VISIBLE_DEVICES``. A retried task resumes from the run's
``latest.pt``. On a cluster of several machines the study directory must be on a filesystem every
node shares, and clip-backdoor must be installed on every node.

Ray Tune is not used: its schedulers stop trials but never pause and promote them, and their
decisions depend on arrival order (see cleaning.prune for the successive halving used here).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from clip_backdoor.config import TrainConfig, dump_yaml
from clip_backdoor.errors import UserError
from clip_backdoor.study.executor_settings import RaySettings, TaskResources
from clip_backdoor.study.executor_settings import parse_ray as parse_ray  # still importable from here
from clip_backdoor.study.executors import Executor, Job, require
from clip_backdoor.study.expand import Run, StudyPlan
from clip_backdoor.study.worker import steps_of

log = logging.getLogger(__name__)

def check_reachable(address: str, timeout: float) -> None:
    """A short TCP probe, so an unreachable cluster is one line, not minutes of retries."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"run.ray.address: {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"run.ray.address {address}: no Ray cluster answers there ({e.strerror or e}; "
                        f"waited {timeout:g}s)") from None


# ----------------------------------------------------------------------------------------------
# What a task runs
# ----------------------------------------------------------------------------------------------
def run_task(name: str, cfg: TrainConfig, keep: bool, nproc: int,
             steps: tuple[dict | None, dict | None] = (None, None)) -> dict:
    """One run in a Ray worker: in this process, or under torchrun with ``nproc`` processes."""
    from clip_backdoor.study.worker import execute, init_worker

    init_worker()
    job = _job_id()
    if nproc <= 1:
        return execute(name, cfg, keep, job=job, steps=steps)
    return launch_torchrun(name, cfg, keep, nproc, job)


def _job_id() -> str:
    ray = sys.modules.get("ray")  # never imported here just to ask: its grpc does not survive a fork
    if ray is not None and ray.is_initialized():
        return f"ray:{ray.get_runtime_context().get_task_id()}"
    return f"ray:{os.getpid()}"  # not in a Ray task (run_task called directly)


def torchrun_command(cfg_path: Path, name: str, keep: bool, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "clip_backdoor.study.worker", name, str(cfg_path), *([] if keep else ["--no-keep"])]


def launch_torchrun(name: str, cfg: TrainConfig, keep: bool, nproc: int, job: str) -> dict:
    """``torchrun --standalone --nproc_per_node N``; every rank runs ``execute`` and rank 0 writes the
    run's files, so the outcome is read back from the run directory."""
    from clip_backdoor.fileio import atomic_write_text
    from clip_backdoor.study.worker import FINISHED, outcome_of
    from clip_backdoor.train.preempt import REQUEUE_EXIT_CODE

    run_dir = Path(cfg.run_dir)
    cfg_path = run_dir / "launch.yaml"
    atomic_write_text(cfg_path, dump_yaml(cfg))
    proc = subprocess.run(torchrun_command(cfg_path, name, keep, nproc), env={**os.environ, "CLAIM_JOB": job})
    if proc.returncode == REQUEUE_EXIT_CODE:
        return {"ok": False, "seconds": 0.0, "preempted": 15, "error": "preempted; rerun to resume"}
    if proc.returncode == 0 and (run_dir / FINISHED).is_file():
        return outcome_of(run_dir)
    return {"ok": False, "seconds": 0.0,
            "error": f"torchrun exited with {proc.returncode}; see {run_dir / 'error.log'} and train.log"}


# ----------------------------------------------------------------------------------------------
# The executor
# ----------------------------------------------------------------------------------------------
class RayExecutor(Executor):
    name = "ray"

    def __init__(self, settings: RaySettings, plan: StudyPlan, *, dry_run: bool = False):
        self.settings, self.plan = settings, plan
        self.capacity = 100_000  # Ray queues tasks until resources are free
        self._started_here = False
        if settings.address is not None:  # other machines may run the tasks
            from clip_backdoor.study.slurm import check_shared

            check_shared(plan.root, "study directory", "Ray workers on other nodes")
        if dry_run:
            return
        if settings.address is not None:  # before importing ray (its grpc does not survive a fork)
            check_reachable(settings.address, settings.connect_timeout_s)
        self.ray = require("ray", "ray", "run.executor=ray")
        self._init()

    def _init(self) -> None:
        ray, s = self.ray, self.settings
        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if s.address is not None:
            try:
                ray.init(address=s.address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UserError(f"run.ray.address {s.address}: could not join the Ray cluster "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
            return
        if s.local_cpus is not None:
            kwargs["num_cpus"] = s.local_cpus
        if s.local_gpus is not None:
            kwargs["num_gpus"] = s.local_gpus
        if s.object_store_mb is not None:
            kwargs["object_store_memory"] = s.object_store_mb * 2**20
        ray.init(**kwargs)
        self._started_here = True

    def resources(self, run: Run) -> TaskResources:
        return self.settings.clean if run.stage == "clean" else self.settings.pretrain  # baselines too

    def _task_cfg(self, run: Run) -> TrainConfig:
        """A GPU task trains on the GPU Ray gave it; a CPU task uses its CPUs as torch threads."""
        from dataclasses import replace

        r, cfg = self.resources(run), run.cfg
        if r.num_gpus >= 1 and cfg.device in ("cpu", "auto"):
            cfg = replace(cfg, device="cuda")
        if not cfg.threads and r.num_cpus >= 1:
            cfg = replace(cfg, threads=int(r.num_cpus))
        return cfg

    def submit(self, batch: list[tuple[Run, bool]]) -> list[Job]:
        jobs = []
        remote = self.ray.remote(max_calls=1, max_retries=self.settings.max_retries,
                                 retry_exceptions=False)(run_task)
        for run, keep in batch:
            r = self.resources(run)
            if r.num_gpus > 1:
                from clip_backdoor.study.slurm import check_single_process_steps, check_split

                check_split(run, int(r.num_gpus))
                check_single_process_steps(run, int(r.num_gpus))
            ref = remote.options(num_cpus=r.num_cpus, num_gpus=r.num_gpus, name=run.name).remote(
                run.name, self._task_cfg(run), keep, max(1, int(r.num_gpus)), steps_of(run))
            jobs.append(Job(run, f"ray:{ref.task_id().hex()}", ref))
        return jobs

    def wait(self, jobs: list[Job], timeout: float | None = None) -> list[tuple[Job, dict]]:
        by_ref = {job.ref: job for job in jobs}
        ready, _ = self.ray.wait(list(by_ref), num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            job = by_ref[ref]
            try:
                out.append((job, self.ray.get(ref)))
            except Exception as e:  # the task's worker died more often than max_retries allows
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                out.append((job, {"ok": False, "error": f"{job.id} failed ({type(e).__name__}: {first}); "
                                                        "rerun to resume it"}))
        return out

    def describe(self, batch: list[tuple[Run, bool]]) -> str:
        where = self.settings.address or "a Ray started here"
        lines = [f"# Ray tasks on {where} (max_calls=1, max_retries={self.settings.max_retries})"]
        for run, keep in batch:
            r = self.resources(run)
            cfg = self._task_cfg(run)
            what = "clip_backdoor.study.ray_tasks.run_task"
            if r.num_gpus > 1:
                cmd = torchrun_command(Path(cfg.run_dir) / "launch.yaml", run.name, keep, int(r.num_gpus))
                what += f" -> {' '.join(cmd)}"
            stop = f" stop_epoch={cfg.stop_epoch}" if cfg.stop_epoch else ""
            lines.append(f"ray task {run.name}: num_cpus={r.num_cpus:g} num_gpus={r.num_gpus:g} "
                         f"device={cfg.device} threads={cfg.threads}{stop}  {what}")
        return "\n".join(lines)

    def shutdown(self) -> None:
        if self._started_here:
            self.ray.shutdown()
