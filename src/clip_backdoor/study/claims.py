"""Claims: who holds a run, so that a second ``study run`` does not submit a run that is queued or
running somewhere already.

``<run dir>/claim.json`` = ``{"job", "executor", "host", "pid", "state", "since"}``; its modification
time is the heartbeat. The ``study run`` that submitted the run touches it while the run is queued or
running (it waits for its jobs), and the run's own process touches it while it trains. A claim is
live while its heartbeat is younger than ``stale_after`` seconds; on this host, a claim whose process
is gone is stale at once, and the executor may know better (SLURM still lists the job). A stale claim
is taken over with a log line. A finished, failed or paused run drops its claim.

A claim is only a lock. What a run has done is read from its run directory (``finished.json``,
``latest.pt``, ``metrics.jsonl``), never from here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from clip_backdoor.fileio import atomic_write_text, pid_running

log = logging.getLogger(__name__)

CLAIM = "claim.json"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


def host() -> str:
    return socket.gethostname()


def read(run_dir: str | Path) -> dict | None:
    """The claim with its heartbeat age in seconds (``age``), or None."""
    path = Path(run_dir) / CLAIM
    try:
        claim = json.loads(path.read_text(encoding="utf-8"))
        age = time.time() - path.stat().st_mtime
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None
    return {**claim, "age": max(0.0, age)} if isinstance(claim, dict) else None


def is_live(claim: dict, stale_after: float = STALE_AFTER_S,
            job_alive: Callable[[dict], bool | None] | None = None) -> bool:
    """Live: its process exists (this host), or its executor says the job exists, or the heartbeat
    is fresh."""
    if claim.get("host") == host() and isinstance(claim.get("pid"), int):
        if claim["pid"] == os.getpid():
            return False  # this process's own leftover: it is not running that run now
        if claim.get("executor") == "local":
            return pid_running(claim["pid"])
    if job_alive is not None:
        known = job_alive(claim)
        if known is not None:
            return known
    return claim.get("age", 0.0) < stale_after


def describe(claim: dict) -> str:
    return (f"job {claim.get('job')} ({claim.get('state', '?')}) on {claim.get('host')}, "
            f"heartbeat {_ago(claim.get('age', 0.0))} ago")


def _ago(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def acquire(run_dir: str | Path, *, job: str, executor: str, stale_after: float = STALE_AFTER_S,
            job_alive: Callable[[dict], bool | None] | None = None) -> dict | None:
    """Claim the run; returns None when claimed, else the live claim that holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"job": job, "executor": executor, "host": host(), "pid": os.getpid(), "state": "queued",
              "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = run_dir / f".{CLAIM}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    try:
        try:
            os.link(tmp, run_dir / CLAIM)  # atomic: fails when a claim exists
            return None
        except FileExistsError:
            pass
        current = read(run_dir)
        if current is not None and is_live(current, stale_after, job_alive):
            return current
        if current is not None:
            log.warning("%s: taking over a stale claim (%s)", run_dir.name, describe(current))
        os.replace(tmp, run_dir / CLAIM)
        return None
    finally:
        tmp.unlink(missing_ok=True)


def update(run_dir: str | Path, **fields) -> None:
    """Rewrite the claim's fields (the run's process: ``state="running"``, its host and pid)."""
    current = read(run_dir) or {}
    current.pop("age", None)
    atomic_write_text(Path(run_dir) / CLAIM, json.dumps({**current, **fields}) + "\n")


def set_job(run_dir: str | Path, job: str, placeholder: str) -> None:
    """Name the submitted job in a claim still held under ``placeholder`` (the job itself may have
    started and rewritten it already; then it is left alone)."""
    current = read(run_dir)
    if current is not None and current.get("job") == placeholder:
        update(run_dir, job=job)


def release(run_dir: str | Path) -> None:
    (Path(run_dir) / CLAIM).unlink(missing_ok=True)


def touch(run_dirs: Iterable[str | Path]) -> None:
    for run_dir in run_dirs:
        with contextlib.suppress(FileNotFoundError):
            os.utime(Path(run_dir) / CLAIM)


class Heartbeat:
    """A daemon thread that touches the claims of ``run_dirs()`` every ``interval`` seconds."""

    def __init__(self, run_dirs: Callable[[], Iterable[str | Path]], interval: float = HEARTBEAT_S):
        self._run_dirs, self._interval = run_dirs, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            touch(list(self._run_dirs()))
