"""Where a study's runs execute, behind one small interface: the local pool (the default, no extra
dependency), SLURM through submitit (``study/slurm.py``), or Ray tasks (``study/ray_tasks.py``).

An executor takes runs and hands back, for each, the dict :func:`~clip_backdoor.study.worker.execute`
returns; the scheduler in ``runner.py`` decides what runs when. Every executor runs the same
``execute`` on the same run directory, so a retried, requeued or resubmitted run resumes from its
``latest.pt``, and the run directory stays the only record of what was done.

    submit(batch)   -> [Job]      start these runs (a batch of cleaning runs may become one job array)
    wait(jobs, timeout) -> [(Job, result)]   the ones done (at least one, unless timeout passes)
    describe(batch) -> str        what submit would do (``study run --dry-run``)
    job_alive(claim)-> bool|None  whether a claim's job still exists (None: cannot tell)
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
from dataclasses import dataclass, field
from typing import Any

from clip_backdoor.errors import UserError
from clip_backdoor.study.executor_settings import EXECUTORS as EXECUTORS  # still importable from here
from clip_backdoor.study.expand import Run
from clip_backdoor.study.worker import execute, init_worker, steps_of


@dataclass(eq=False)
class Job:
    """One submitted run: its claim's job id and the executor's handle on it."""

    run: Run
    id: str
    ref: Any = field(default=None, repr=False)


class Executor:
    name = "local"
    capacity = 1  # runs in flight at most

    def submit(self, batch: list[tuple[Run, bool]]) -> list[Job]:
        """Start ``(run, keep_checkpoints)`` pairs; one Job each, in order."""
        raise NotImplementedError

    def wait(self, jobs: list[Job], timeout: float | None = None) -> list[tuple[Job, dict]]:
        raise NotImplementedError

    def describe(self, batch: list[tuple[Run, bool]]) -> str:
        return "\n".join(f"{self.name}: {run.name}" for run, _ in batch)

    def job_alive(self, claim: dict) -> bool | None:
        return None

    def interrupt(self, signum: int) -> None:
        """This process got a preemption signal: pass it to runs it holds in its own processes."""

    def shutdown(self) -> None:
        pass


class InProcess(Executor):
    """One run at a time in this process (``--jobs 1``): simplest, and the epoch lines stay visible."""

    def submit(self, batch: list[tuple[Run, bool]]) -> list[Job]:
        jobs = []
        for run, keep in batch:
            future: cf.Future = cf.Future()
            future.set_result(execute(run.name, run.cfg, keep, job="local", steps=steps_of(run)))
            jobs.append(Job(run, "local", future))
        return jobs

    def wait(self, jobs: list[Job], timeout: float | None = None) -> list[tuple[Job, dict]]:
        return [(job, job.ref.result()) for job in jobs]

    def describe(self, batch: list[tuple[Run, bool]]) -> str:
        return "\n".join(f"local (this process): {run.name}  device={run.cfg.device} "
                         f"threads={run.cfg.threads}{stop_note(run)}" for run, _ in batch)


class WorkerPool(Executor):
    """``jobs`` spawned worker processes (fresh interpreters: no forked torch or CUDA state), each
    optionally pinned to one CUDA device. A worker that dies takes the pool down; the runs in it are
    reported and the pool is started again."""

    def __init__(self, jobs: int, devices: list[str]):
        self.capacity, self.devices = jobs, devices
        self._manager = None
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        queue = None
        if self.devices:  # each worker takes one device as it starts
            self._manager = self._manager or ctx.Manager()
            queue = self._manager.Queue()
            for device in self.devices:
                queue.put(device)
        self._pool = cf.ProcessPoolExecutor(self.capacity, mp_context=ctx, initializer=init_worker,
                                            initargs=(queue,))

    def submit(self, batch: list[tuple[Run, bool]]) -> list[Job]:
        return [Job(run, "local", self._pool.submit(execute, run.name, run.cfg, keep, "local", steps_of(run)))
                for run, keep in batch]

    def wait(self, jobs: list[Job], timeout: float | None = None) -> list[tuple[Job, dict]]:
        by_future = {job.ref: job for job in jobs}
        done, _ = cf.wait(by_future, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        out, broken = [], False
        for future in done:
            try:
                out.append((by_future[future], future.result()))
            except cf.process.BrokenProcessPool:
                broken = True
                out.append((by_future[future], {"ok": False, "error": "its worker process died (killed, or "
                                                "out of memory); rerun to resume it"}))
        if broken:  # the pool took the other running runs down with it
            out += [(job, {"ok": False, "error": "its worker pool broke while it ran; rerun to resume it"})
                    for future, job in by_future.items() if future not in done]
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._start()
        return out

    def interrupt(self, signum: int) -> None:
        import os

        for process in list(getattr(self._pool, "_processes", {}).values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)

    def describe(self, batch: list[tuple[Run, bool]]) -> str:
        where = f"one of {', '.join(self.devices)}" if self.devices else f"{self.capacity} CPU workers"
        return "\n".join(f"local pool ({where}): {run.name}  threads={run.cfg.threads}{stop_note(run)}"
                         for run, _ in batch)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._manager is not None:
            self._manager.shutdown()


def stop_note(run: Run) -> str:
    return f"  stop_epoch={run.cfg.stop_epoch} of {run.cfg.epochs}" if run.cfg.stop_epoch else ""


def local_executor(jobs: int, devices: list[str]) -> Executor:
    return WorkerPool(jobs, devices) if jobs > 1 or devices else InProcess()


def require(module: str, extra: str, key: str) -> Any:
    """Import an optional dependency, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{key}: needs the {module} package; install clip-backdoor[{extra}]") from None
