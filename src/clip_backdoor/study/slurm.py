"""SLURM through submitit: one job per pre-training run (one process per GPU, possibly several nodes),
job arrays for the cleaning runs.

Settings (``run.slurm`` in the study file; ``study run --partition/--time/--gpus/--cpus/--mem/--account``
override the shared ones)::

    run:
      executor: slurm
      slurm:
        partition: gpu          # shared by both stages ...
        account: my-project
        time: "1-00:00:00"      # SLURM's formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
        pretrain: {nodes: 2, tasks_per_node: 8, gpus_per_node: 8, cpus_per_task: 10, mem: 480G,
                   time: "2-00:00:00"}
        clean: {gpus_per_node: 1, cpus_per_task: 8, mem: 64G, time: "6:00:00"}

A multi-process pre-training job exports the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) in every task before training, so ``init_distributed`` joins one process
group across nodes. Every node must see its GPUs as cuda:0.. (SLURM's default with --gpus-per-node).

Preemption: submitit asks SLURM for SIGUSR2 ``signal_delay_s`` before the time limit; the training
loop then finishes its step, writes a mid-epoch checkpoint, and the job requeues itself. A SIGTERM
(preemption by the scheduler) also writes the checkpoint; SLURM requeues the job when the partition
preempts with requeue, and a later ``study run`` resumes it otherwise.

``cluster: local`` / ``cluster: debug`` use submitit's local and debug executors instead (the same
path on one machine, for tests and trials); ``cluster: slurm`` needs a study directory on a
filesystem every node shares.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from clip_backdoor.config import TrainConfig
from clip_backdoor.errors import UserError
from clip_backdoor.study.executor_settings import Resources, SlurmSettings, time_minutes
from clip_backdoor.study.executor_settings import parse_slurm as parse_slurm  # still importable from here
from clip_backdoor.study.executors import Executor, Job, require
from clip_backdoor.study.expand import Run, StudyPlan
from clip_backdoor.study.worker import steps_of

log = logging.getLogger(__name__)

# Node-local paths: a job on another node would not see what the driver wrote there.
NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/scratch/local")
LIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
               "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}


def check_shared(path: Path, key: str, what: str) -> None:
    """Refuse a directory the executor's machines cannot share (one line naming it)."""
    resolved = Path(path).absolute()
    for local in NODE_LOCAL:
        if resolved == Path(local) or Path(local) in resolved.parents:
            raise UserError(f"{key} {resolved}: {local} is local to each machine, so {what} would not see "
                            "it; put the study directory on a shared filesystem")


# ----------------------------------------------------------------------------------------------
# The job: what runs in each SLURM task
# ----------------------------------------------------------------------------------------------
class SubmititRun:
    """A run as a submitit job: a checkpointable callable (requeued with itself after a preemption).

    Each task of a multi-process job exports the torchrun environment first; rank 0 alone writes
    the run's files (the training loop and ``execute`` see to that)."""

    def __init__(self, name: str, cfg: TrainConfig, keep: bool,
                 steps: tuple[dict | None, dict | None] = (None, None)):
        self.name, self.cfg, self.keep, self.steps = name, cfg, keep, steps

    def __call__(self) -> dict:
        import submitit

        from clip_backdoor.study.worker import execute

        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        result = execute(self.name, self.cfg, self.keep, job=f"slurm:{env.job_id}", steps=self.steps)
        signum = result.get("preempted")
        if signum is not None and signum == submitit.JobEnvironment._usr_sig():
            handler = signal.getsignal(signum)  # submitit's: checkpoint() + requeue + exit
            if callable(handler):
                handler(signum, None)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(self)  # the run directory holds the state


# ----------------------------------------------------------------------------------------------
# The executor
# ----------------------------------------------------------------------------------------------
class SlurmExecutor(Executor):
    name = "slurm"
    capacity = 100_000  # SLURM queues them; its limits apply

    def __init__(self, settings: SlurmSettings, plan: StudyPlan, *, dry_run: bool = False):
        self.settings, self.plan = settings, plan
        self.folder = Path(settings.folder or plan.root / "slurm").absolute()
        if settings.cluster == "slurm":
            check_shared(plan.root, "study directory", "SLURM jobs on other nodes")
            check_shared(self.folder, "run.slurm.folder", "SLURM jobs on other nodes")
        self.submitit = None if dry_run else require("submitit", "slurm", "run.executor=slurm")
        if self.submitit is not None and settings.cluster == "slurm" and shutil.which("sbatch") is None:
            raise UserError("run.executor=slurm: sbatch is not on PATH (not a SLURM login node?); use "
                            "--dry-run to see the jobs, or run.slurm.cluster=local to try them here")

    # -- parameters --------------------------------------------------------------------------
    def resources(self, run: Run) -> Resources:
        return self.settings.clean if run.stage == "clean" else self.settings.pretrain  # baselines too

    def sbatch_params(self, run: Run, name: str) -> dict:
        r = self.resources(run)
        params = {"job_name": name, "time": time_minutes(r.time, "time"), "nodes": r.nodes,
                  "ntasks_per_node": r.tasks_per_node, "signal_delay_s": r.signal_delay_s,
                  "array_parallelism": r.array_parallelism, "stderr_to_stdout": True,
                  "additional_parameters": {"requeue": True, **{k.replace("_", "-"): v
                                                                  for k, v in r.additional.items()}}}
        for key in ("partition", "account", "qos", "gpus_per_node", "cpus_per_task", "mem", "constraint"):
            if getattr(r, key) is not None:
                params[key] = getattr(r, key)
        if r.setup:
            params["setup"] = list(r.setup)
        return params

    def _job_name(self, runs: list[Run]) -> str:
        first = runs[0]
        tail = f":{first.name.split('/', 1)[1]}" if len(runs) == 1 else ""
        return f"{self.plan.spec.name}:{first.stage}{tail}"

    def _groups(self, batch: list[tuple[Run, bool]]) -> list[list[tuple[Run, bool]]]:
        """Pre-training runs (clean baselines too) alone; cleaning runs of one batch together (one job
        array)."""
        clean = [item for item in batch if item[0].stage == "clean"]
        return [[item] for item in batch if item[0].stage != "clean"] + ([clean] if clean else [])

    def _executor(self, runs: list[Run]):
        s, submitit = self.settings, self.submitit
        params = self.sbatch_params(runs[0], self._job_name(runs))
        if s.cluster == "debug":
            return submitit.DebugExecutor(folder=self.folder / "%j")
        if s.cluster == "local":
            ex = submitit.LocalExecutor(folder=self.folder / "%j")
            ex.update_parameters(timeout_min=params["time"], tasks_per_node=params["ntasks_per_node"],
                                 nodes=params["nodes"], gpus_per_node=params.get("gpus_per_node", 0),
                                 signal_delay_s=params["signal_delay_s"], setup=params.get("setup", []))
            return ex
        ex = submitit.SlurmExecutor(folder=self.folder / "%j")
        ex.update_parameters(**params)
        return ex

    # -- the interface ----------------------------------------------------------------------
    def submit(self, batch: list[tuple[Run, bool]]) -> list[Job]:
        jobs: list[Job] = []
        for group in self._groups(batch):
            runs = [run for run, _ in group]
            r = self.resources(runs[0])
            check_split(runs[0], r.nodes * r.tasks_per_node)
            check_single_process_steps(runs[0], r.nodes * r.tasks_per_node)
            ex = self._executor(runs)
            with ex.batch():
                handles = [ex.submit(SubmititRun(run.name, run.cfg, keep, steps_of(run)))
                           for run, keep in group]
            for (run, _), handle in zip(group, handles):
                jobs.append(Job(run, f"slurm:{handle.job_id}", handle))
            log.info("submitted %s", f"job {handles[0].job_id} ({runs[0].name})" if len(handles) == 1 else
                     f"array {handles[0].job_id.split('_')[0]} of {len(handles)} cleaning runs")
        return jobs

    def wait(self, jobs: list[Job], timeout: float | None = None) -> list[tuple[Job, dict]]:
        poll = 0.2 if self.settings.cluster != "slurm" else self.settings.poll_s
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done = [job for job in jobs if job.ref.done()]
            if done:
                return [(job, self._result(job)) for job in done]
            if deadline is not None and time.monotonic() >= deadline:
                return []
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    @staticmethod
    def _result(job: Job) -> dict:
        try:
            result = job.ref.results()[0]  # task 0 of a multi-task job: rank 0, which writes the run
        except Exception as e:  # cancelled, timed out without requeue, killed: no result pickle
            lines = [line for line in str(e).splitlines() if line.strip()]
            why = lines[0] if lines else type(e).__name__
            return {"ok": False, "error": f"{job.id} ended without a result ({why}); rerun to resume it"}
        return result if isinstance(result, dict) else {"ok": False, "error": f"{job.id}: unexpected result"}

    def job_alive(self, claim: dict) -> bool | None:
        job = str(claim.get("job") or "")
        if not job.startswith("slurm:") or self.settings.cluster != "slurm" or shutil.which("squeue") is None:
            return None
        try:
            out = subprocess.run(["squeue", "-h", "-j", job[6:], "-o", "%T"], capture_output=True, text=True,
                                 timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode != 0:
            return False if "Invalid job id" in out.stderr else None
        return any(state.strip() in LIVE_STATES for state in out.stdout.splitlines())

    def describe(self, batch: list[tuple[Run, bool]]) -> str:
        from submitit.slurm.slurm import _make_sbatch_string

        python = shlex.quote(sys.executable)
        folder = self.folder / "%j"
        command = f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
        parts = []
        for group in self._groups(batch):
            runs = [run for run, _ in group]
            params = self.sbatch_params(runs[0], self._job_name(runs))
            if len(runs) > 1:
                params["map_count"] = len(runs)
            what = (f"# {runs[0].name}" if len(runs) == 1 else "\n".join(
                [f"# job array of {len(runs)} cleaning runs; task i runs:"] +
                [f"#   {i}: {run.name}{_stop(run)}" for i, run in enumerate(runs)]))
            tasks = params["nodes"] * params["ntasks_per_node"]
            if len(runs) == 1 and runs[0].stage != "clean" and tasks > 1:
                batch = check_split(runs[0], tasks)
                check_single_process_steps(runs[0], tasks)
                what += (f"\n# {params['nodes']} node(s) x {params['ntasks_per_node']} task(s): one process "
                         "per GPU; each task exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"
                         f"\n# batch_size {batch} is the global batch: {batch // tasks} per process")
            script = _make_sbatch_string(command=command, folder=folder, **params)
            parts.append(f"{what}\n{script}")
        return "\n".join(parts)


def check_split(run: Run, processes: int) -> int:
    """``batch_size`` is the global batch; each of a job's processes takes an equal share. Checked
    before submitting, not after a job waited in the queue for its nodes."""
    batch = run.cfg.batch_size
    if batch % processes:
        raise UserError(f"{run.name}: batch_size {batch} (the global batch) does not split over the job's "
                        f"{processes} processes (nodes x tasks_per_node); choose a multiple of {processes}")
    return batch


def check_single_process_steps(run: Run, processes: int) -> None:
    """A run with a data step (detection after it, a filter before it) runs that step in one
    process, which a multi-process job does not arrange (its other ranks would not wait)."""
    if processes > 1 and any(steps_of(run)):
        raise UserError(f"{run.name}: has a data step (detection or filter-then-retrain), which a "
                        f"{processes}-process job does not run; give its stage one process")


def _stop(run: Run) -> str:
    return f" (to epoch {run.cfg.stop_epoch} of {run.cfg.epochs})" if run.cfg.stop_epoch else ""

