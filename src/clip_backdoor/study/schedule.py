"""Which run starts when, on any executor (``study/executors.py``).

- A cleaning run starts once its pre-training run has finished; runs whose pre-training failed are
  reported, not started.
- A run is claimed before it is submitted (``study/claims.py``): one held by another live
  ``study run`` is left alone, with a log line, and so are the cleaning runs that need it.
- With ``cleaning.prune``, each (seed, objective, method, k) group trains rung by rung
  (``study/prune.py``): its runs are submitted with ``stop_epoch`` set to the next rung, and when the
  whole group has reached it the losers get ``pruned.json`` and the survivors go on.
- A signal to this process (SIGTERM, SIGUSR1, SIGUSR2) stops new submissions; local runs in flight
  write their mid-epoch checkpoints and the study exits with the requeue code. Jobs on a cluster keep
  running under their claims.
- One line per finished run, with an ETA from the durations of finished runs of the same kind.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from clip_backdoor.fileio import read_jsonl, write_json
from clip_backdoor.study import claims
from clip_backdoor.study.durations import format_duration
from clip_backdoor.study.executors import Executor, Job
from clip_backdoor.study.expand import Run, StudyPlan
from clip_backdoor.study.prune import PRUNED, PruneSettings, group_states
from clip_backdoor.train import preempt

log = logging.getLogger(__name__)

POLL_S = 5.0  # how often the loop wakes while jobs run (signals, heartbeats)
SUBMITTING = "(submitting)"


class Progress:
    """One line per finished run, with an ETA from the durations of finished runs of the same kind."""

    def __init__(self, total: int, jobs: int, known: dict[str, list[float]]):
        self.total, self.jobs, self.done = total, jobs, 0
        self.durations = known  # kind -> seconds of finished runs (earlier invocations included)
        self.started = time.perf_counter()

    @staticmethod
    def kind(run: Run) -> str:
        return f"{run.stage}:{run.pretrain}:{run.method}"

    def estimate(self, run: Run) -> float | None:
        same = self.durations.get(self.kind(run))
        if not same:
            same = [s for k, v in self.durations.items() if k.startswith(run.stage + ":") for s in v]
        return sum(same) / len(same) if same else None

    def record(self, run: Run, result: dict, remaining: list[Run], running: dict) -> None:
        seconds = result.get("seconds", 0.0)
        if result.get("paused") is not None:
            log.info("%s paused at epoch %d of %d (prune rung) after %s", run.name, result["paused"],
                     run.cfg.epochs, format_duration(seconds))
            return
        self.done += 1
        if result.get("pruned") is not None:
            what = f"pruned at epoch {result['pruned']}"
        elif result["ok"]:
            self.durations.setdefault(self.kind(run), []).append(seconds)
            row = result.get("row") or {}
            metrics = "  ".join(f"{k} {100 * row[k]:.1f}%" for k in ("acc1", "asr1")
                                if isinstance(row.get(k), float) and not math.isnan(row[k]))
            what = f"done in {format_duration(seconds)}" + (f"  {metrics}" if metrics else "")
        elif result.get("preempted") is not None:
            what = f"stopped after {format_duration(seconds)}: {result['error']}"
        else:
            what = f"FAILED after {format_duration(seconds)}: {result['error']}"
        log.info("[%*d/%d] %s %s  %s", len(str(self.total)), self.done, self.total, run.name, what,
                 self._eta(remaining, running))

    def _eta(self, remaining: list[Run], running: dict) -> str:
        now, work = time.perf_counter(), 0.0
        for run in remaining:
            guess = self.estimate(run)
            if guess is None:
                return "ETA ?"
            work += guess
        for run, started in running.values():
            guess = self.estimate(run)
            if guess is None:
                return "ETA ?"
            work += max(0.0, guess - (now - started))
        return f"ETA {format_duration(work / self.jobs)}" if remaining or running else ""


def group_of(run: Run) -> tuple:
    """The selection group of a cleaning run: (seed, objective, method, k)."""
    return (run.seed, run.pretrain, run.method, run.k)


def metrics_rows(run: Run) -> list[dict]:
    path = Path(run.cfg.run_dir) / "metrics.jsonl"
    return read_jsonl(path) if path.is_file() else []


@dataclass
class Outcome:
    failed: dict[str, str] = field(default_factory=dict)
    claimed: dict[str, str] = field(default_factory=dict)  # left alone: another study run holds them
    interrupted: dict[str, str] = field(default_factory=dict)  # preempted runs (resumable)
    preempted: bool = False
    pruned: int = 0


class Scheduler:
    def __init__(self, plan: StudyPlan, executor: Executor, progress: Progress,
                 prepare_clean: Callable[[], None], finished: set[str], prune: PruneSettings | None = None,
                 stale_after: float = claims.STALE_AFTER_S):
        self.plan, self.executor, self.progress = plan, executor, progress
        self.prepare_clean, self.prune, self.stale_after = prepare_clean, prune, stale_after
        self.ok = set(finished)
        self.finished = set(finished)
        self.out = Outcome()
        self.pending: list[Run] = []
        self.running: dict[Job, tuple[Run, float]] = {}
        self.clean_prepared = False
        self.todo_names: set[str] = set()
        self.todo_runs: dict[str, Run] = {}  # as run_study prepared them (threads set)

    # -- pruning ---------------------------------------------------------------------------------
    def _members(self, key: tuple) -> list[Run]:
        return [r for r in self.plan.runs if r.stage == "clean" and group_of(r) == key]

    def _advance(self, key: tuple, write: bool = True) -> list[Run]:
        """The group's runs to submit now (with their stop_epoch); prunes the losers of a rung
        (``write``: record them in pruned.json; a dry run does not)."""
        members = self._members(key)
        dropped = {r.name for r in members if r.name in self.out.failed}
        states = group_states({r.name: metrics_rows(r) for r in members}, self.prune,
                              finished=self.finished, dropped=dropped,
                              tiebreak={r.name: r.lr for r in members})
        busy = {r.name for r in self.pending} | {r.name for r, _ in self.running.values()}
        out = []
        for run in members:
            state = states.get(run.name)
            if state is None or run.name not in self.todo_names or run.name in busy:
                continue
            if state.action == "pruned":
                path = Path(run.cfg.run_dir) / PRUNED
                if write:
                    if not path.is_file():  # else pruned by an earlier invocation, the same way
                        write_json(path, state.record)
                        self.out.pruned += 1
                    self.progress.record(run, {"ok": True, "pruned": state.record["epoch"]}, self.pending,
                                         self.running)
                self.todo_names.discard(run.name)
            elif state.action == "train":
                run = self.todo_runs[run.name]
                out.append(dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, stop_epoch=state.stop)))
        return out

    # -- dependencies and claims -------------------------------------------------------------------
    def _dependency(self, run: Run) -> str | None:
        """None: can start; "wait"; "held" (its pre-training run is another study run's); or why it
        cannot run."""
        parent = run.depends_on
        if parent is None or parent in self.ok:
            return None
        if parent in self.out.failed:
            return f"not run: its pre-training run {parent} failed"
        if parent in self.out.claimed:
            return "held"
        if parent in self.todo_names:
            return "wait"
        return f"needs {parent}, which has not finished (run the study without --only clean first)"

    def _claim(self, run: Run) -> bool:
        job = "local" if self.executor.name == "local" else SUBMITTING
        holder = claims.acquire(run.cfg.run_dir, job=job, executor=self.executor.name,
                                stale_after=self.stale_after, job_alive=self.executor.job_alive)
        if holder is None:
            return True
        self.out.claimed[run.name] = claims.describe(holder)
        log.warning("%s: not submitted, it is claimed by %s (queued or running elsewhere)", run.name,
                    claims.describe(holder))
        return False

    # -- the loop ----------------------------------------------------------------------------------
    def first_runs(self, todo: list[Run], write: bool = True) -> list[Run]:
        """What to submit first: every run, cleaning runs up to their group's next rung."""
        self.todo_names = {r.name for r in todo}
        self.todo_runs = {r.name: r for r in todo}
        if self.prune is None:
            return list(todo)
        runs = [r for r in todo if r.stage != "clean"]  # pre-training runs (clean baselines too)
        for key in dict.fromkeys(group_of(r) for r in todo if r.stage == "clean"):
            runs += self._advance(key, write)
        return runs

    def run(self, todo: list[Run], keep_clean: bool) -> Outcome:
        self.pending = self.first_runs(todo)
        last_beat = time.monotonic()
        with preempt.Guard() as guard:
            while self.pending or self.running:
                stopping = self.out.preempted or guard.signum is not None
                if guard.signum is not None and not self.out.preempted:
                    self.out.preempted = True
                    self.executor.interrupt(guard.signum)  # local workers checkpoint too
                if not stopping:
                    self._submit_ready(keep_clean)
                if stopping and not self.running:
                    break
                if stopping and self.executor.name != "local":
                    break  # cluster jobs go on under their claims; a later study run collects them
                if not self.running:
                    continue
                for job, result in self.executor.wait(list(self.running), timeout=POLL_S):
                    self._finish(job, result)
                if time.monotonic() - last_beat > claims.HEARTBEAT_S:
                    claims.touch(job.run.cfg.run_dir for job in self.running)
                    last_beat = time.monotonic()
        return self.out

    def _submit_ready(self, keep_clean: bool) -> None:
        batch: list[tuple[Run, bool]] = []
        for run in list(self.pending):
            if len(self.running) + len(batch) >= self.executor.capacity:
                break
            state = self._dependency(run)
            if state == "wait":
                continue
            self.pending.remove(run)
            if state == "held":
                self.out.claimed[run.name] = f"waits for {run.depends_on}"
                self.todo_names.discard(run.name)
                log.info("%s: not submitted, its pre-training run %s is claimed elsewhere", run.name,
                         run.depends_on)
                continue
            if state is not None:
                self.out.failed[run.name] = state
                self.progress.record(run, {"ok": False, "seconds": 0.0, "error": state}, self.pending,
                                     self.running)
                continue
            if not self._claim(run):
                self.todo_names.discard(run.name)
                continue
            if run.stage == "clean" and not self.clean_prepared:
                self.prepare_clean()
                self.clean_prepared = True
            (Path(run.cfg.run_dir) / PRUNED).unlink(missing_ok=True)  # trained again: no longer pruned
            batch.append((run, keep_clean or run.stage != "clean"))
        if not self.clean_prepared and self.executor.capacity > 1 and any(
                r.stage == "clean" for r in self.pending):
            self.prepare_clean()  # while the pre-training runs
            self.clean_prepared = True
        if not batch:
            return
        started = time.perf_counter()
        jobs = self.executor.submit(batch)
        for job in jobs:
            if job.id != "local":
                claims.set_job(job.run.cfg.run_dir, job.id, SUBMITTING)
            self.running[job] = (job.run, started)

    def _finish(self, job: Job, result: dict) -> None:
        run, started = self.running.pop(job)
        result.setdefault("seconds", time.perf_counter() - started)
        preempted = result.get("preempted") is not None
        if preempted:
            self.out.preempted = True
            self.out.interrupted[run.name] = result["error"]
        else:
            claims.release(run.cfg.run_dir)
        paused = result["ok"] and result.get("paused") is not None
        if result["ok"] and not paused:
            self.ok.add(run.name)
            self.finished.add(run.name)
            self.todo_names.discard(run.name)
        elif not result["ok"] and not preempted:
            self.out.failed[run.name] = result["error"]
        self.progress.record(run, result, self.pending, self.running)
        if self.prune is not None and run.stage == "clean" and not self.out.preempted:
            self.pending += self._advance(group_of(run))
