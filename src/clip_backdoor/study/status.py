"""``clip-backdoor study status DIR``: where a study stands, read from its directory alone.

Every run of the study is **finished** (``finished.json`` covers its epochs), **failed** (an
``error.log`` newer than its last activity), **running** (started, and active recently), **stopped**
(started, but silent for much longer than an epoch takes: an interrupted ``study run``) or
**pending** (not started). Each gets its last metrics; the remaining time comes from the measured speed
of the study's own runs: seconds per epoch of finished runs of the same kind (``finished.json``:
wall time over epochs), else the training seconds of the epochs already logged (``metrics.jsonl``).

It only reads, so it is safe while ``study run`` writes: torn ``metrics.jsonl`` lines and
half-written ``finished.json`` files count as not there yet.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clip_backdoor.errors import UserError
from clip_backdoor.fileio import read_jsonl
from clip_backdoor.study.durations import format_duration
from clip_backdoor.study.expand import MANIFEST, Run, StudyPlan, expand
from clip_backdoor.study.spec import load_spec

FINISHED, ERROR_LOG, TRAIN_LOG, METRICS = "finished.json", "error.log", "train.log", "metrics.jsonl"
STATES = ("finished", "running", "stopped", "failed", "pending")
STALE_EPOCHS = 3.0  # silent for this many epochs' worth of time: not running any more
STALE_FLOOR_S = 600.0  # ... and never sooner than this (evaluation, start-up, a slow first batch)


@dataclass
class RunStatus:
    run: Run
    state: str
    epoch: int | None = None  # last epoch in metrics.jsonl
    metrics: dict = field(default_factory=dict)  # its last evaluated line
    seconds_per_epoch: float | None = None  # measured (this run's kind)
    remaining_s: float | None = None  # None: unknown
    idle_s: float | None = None  # since the run last wrote anything
    note: str = ""


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _rows(path: Path) -> list[dict]:
    try:
        return [r for r in read_jsonl(path) if isinstance(r, dict)] if path.is_file() else []
    except (OSError, UnicodeDecodeError):
        return []


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def kind(run: Run) -> str:
    return f"{run.stage}:{run.pretrain}:{run.method}"


def _speeds(plan: StudyPlan) -> dict[str, list[float]]:
    """kind -> measured seconds per epoch: finished runs' wall time per epoch first, else logged
    training seconds per epoch of any run of that kind."""
    finished: dict[str, list[float]] = {}
    logged: dict[str, list[float]] = {}
    for run in plan.runs:
        folder = Path(run.cfg.run_dir)
        marker = _read_json(folder / FINISHED)
        if marker and marker.get("seconds") and marker.get("epochs"):
            finished.setdefault(kind(run), []).append(float(marker["seconds"]) / int(marker["epochs"]))
            continue
        for row in _rows(folder / METRICS):
            if isinstance(row.get("seconds"), int | float):
                logged.setdefault(kind(run), []).append(float(row["seconds"]))
    return {k: finished.get(k) or logged.get(k) for k in {*finished, *logged}}


def _estimate(run: Run, speeds: dict[str, list[float]]) -> float | None:
    same = speeds.get(kind(run))
    if not same:  # another method or objective of the same stage: the closest measurement there is
        same = [s for k, v in speeds.items() if k.startswith(run.stage + ":") for s in v]
    return sum(same) / len(same) if same else None


def run_status(run: Run, speeds: dict[str, list[float]], now: float) -> RunStatus:
    folder = Path(run.cfg.run_dir)
    rows = _rows(folder / METRICS)
    evaluated = [r for r in rows if "acc1" in r]
    status = RunStatus(run, "pending", epoch=rows[-1].get("epoch") if rows else None,
                       metrics=evaluated[-1] if evaluated else {}, seconds_per_epoch=_estimate(run, speeds))
    marker = _read_json(folder / FINISHED)
    if marker and int(marker.get("epochs", 0)) >= run.cfg.epochs:
        status.state, status.remaining_s = "finished", 0.0
        status.metrics = marker.get("last") if isinstance(marker.get("last"), dict) else status.metrics
        return status
    activity = [t for t in (_mtime(folder / name) for name in (TRAIN_LOG, METRICS, "checkpoints/latest.pt"))
                if t is not None]
    error_time = _mtime(folder / ERROR_LOG)
    if error_time is not None and (not activity or error_time >= max(activity)):
        status.state, status.note = "failed", _last_line(folder / ERROR_LOG)
        return status
    if not activity:
        return status  # pending
    status.idle_s = max(0.0, now - max(activity))
    done = status.epoch or 0
    spe = status.seconds_per_epoch
    if spe is not None:
        status.remaining_s = max(0.0, (run.cfg.epochs - done) * spe - status.idle_s)
        if status.idle_s > max(STALE_FLOOR_S, STALE_EPOCHS * spe):
            status.state, status.remaining_s = "stopped", (run.cfg.epochs - done) * spe
            status.note = f"no activity for {format_duration(status.idle_s)}; `study run` again resumes it"
            return status
    status.state = "running"
    return status


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line), "")


def study_status(study_dir: str | Path, now: float | None = None) -> tuple[StudyPlan, list[RunStatus]]:
    root = Path(study_dir)
    if not (root / "study.yaml").is_file():
        raise UserError(f"{root}: no study.yaml here, so no study to report on (a study directory is the "
                        "--out of `clip-backdoor study run`)")
    plan = expand(load_spec(root / "study.yaml"), root)
    now = time.time() if now is None else now
    speeds = _speeds(plan)
    statuses = [run_status(run, speeds, now) for run in plan.runs]
    by_name = {s.run.name: s for s in statuses}
    for s in statuses:  # a cleaning run whose pre-training run failed will not start
        parent = by_name.get(s.run.depends_on or "")
        if s.state == "pending" and parent is not None and parent.state == "failed":
            s.note = f"waits for {parent.run.name}, which failed"
        elif s.state == "pending" and s.seconds_per_epoch is not None:
            s.remaining_s = s.run.cfg.epochs * s.seconds_per_epoch
    return plan, statuses


def _to_do(s: RunStatus) -> bool:
    """Work left that will run (not a cleaning run behind a failed pre-training)."""
    return s.state in ("running", "pending", "stopped") and not s.note.startswith("waits")


def eta_seconds(plan: StudyPlan, statuses: Sequence[RunStatus]) -> float | None:
    """Remaining work over the study's parallel jobs; None when some run's speed is unknown."""
    todo = [s for s in statuses if _to_do(s)]
    if any(s.remaining_s is None for s in todo):
        return None
    jobs = len(plan.spec.run.devices) or plan.spec.run.jobs
    return sum(s.remaining_s for s in todo) / max(1, min(jobs, len(todo) or 1))


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, int | float) and not math.isnan(x) else "—"


def format_status(plan: StudyPlan, statuses: Sequence[RunStatus]) -> str:
    counts = {state: sum(s.state == state for s in statuses) for state in STATES}
    eta = eta_seconds(plan, statuses)
    left = counts["running"] + counts["pending"] + counts["stopped"]
    eta_text = ("done" if not left else
                f"ETA {format_duration(eta)} at {plan.spec.run.jobs} job(s), from measured seconds per epoch"
                if eta is not None else "ETA unknown until a run of each stage has logged an epoch")
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    lines = [f"{plan.root}: {len(statuses)} runs: {summary}; {eta_text}"]
    for stage in [plan.poison, *plan.cleaning_sets]:
        if not (plan.root / stage.name / MANIFEST).is_file():
            lines.append(f"  data      {stage.name}: not made yet")
    width = max(len(s.run.name) for s in statuses) if statuses else 0
    for s in statuses:
        epoch = f"epoch {s.epoch if s.epoch is not None else '-'}/{s.run.cfg.epochs}"
        metrics = (f"acc1 {_pct(s.metrics.get('acc1'))}  asr1 {_pct(s.metrics.get('asr1'))}"
                   if s.metrics else "")
        extra = []
        if _to_do(s) and s.remaining_s is not None:
            extra.append(f"{'takes ~' if s.state == 'pending' else ''}{format_duration(s.remaining_s)}"
                         f"{'' if s.state == 'pending' else ' left'}")
        if s.state == "running" and s.idle_s is not None:
            extra.append(f"last write {format_duration(s.idle_s)} ago")
        if s.note:
            extra.append(s.note)
        line = f"  {s.state:<9} {s.run.name:<{width}}  {epoch:<11} {metrics:<26} {'; '.join(extra)}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def main_status(study_dir: str) -> int:
    plan, statuses = study_status(study_dir)
    print(format_status(plan, statuses))
    return 0
