"""One study run in this process, whatever started it (the local pool, a SLURM job, a Ray task,
one rank of a torchrun): train, log to its ``train.log``, mark it finished, keep its claim alive.

:func:`execute` never raises for a failed run (one run's failure must not stop a study): it returns
``{"ok": True, "seconds", "row"}``, ``{"ok": True, "paused": epoch}`` (``stop_epoch`` reached),
``{"ok": False, "error"}`` (traceback in ``error.log``) or ``{"ok": False, "preempted": signum}``
(a resumable checkpoint was written). Only rank 0 writes the run's files.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from clip_backdoor.config import TrainConfig, to_dict
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import write_json
from clip_backdoor.study import claims

FINISHED = "finished.json"

_WORKER: dict[str, Any] = {"device": None}


class _NotATerminal:
    """stderr as seen by a worker: progress bars of parallel runs would interleave on one terminal,
    so the runner prints one line per finished run instead."""

    def __init__(self, stream: Any):
        self._stream = stream

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _RunNameFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.run_name = _WORKER.get("run", "study")
        return True


def init_worker(devices: Any = None) -> None:
    """Set up a fresh worker process (spawned pool worker, SLURM job, Ray task): warnings to stderr
    prefixed with the run's name, epoch lines to each run's train.log, one device from ``devices``."""
    # A spawned process inherits "spawn" as its start method, which would make every run's dataloader
    # workers fresh interpreters (seconds each); they get the platform default, as from the shell.
    multiprocessing.set_start_method(None, force=True)
    real_stderr = sys.stderr
    sys.stderr = _NotATerminal(real_stderr)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler = logging.StreamHandler(real_stderr)
    handler.setLevel(logging.WARNING)  # epoch lines go to each run's train.log
    handler.setFormatter(logging.Formatter("%(run_name)s: %(message)s"))
    handler.addFilter(_RunNameFilter())
    root.addHandler(handler)
    _WORKER["device"] = devices.get() if devices is not None else None


def rank() -> int:
    """This process's rank when it is one of several of a distributed run (torchrun or srun)."""
    return int(os.environ.get("RANK", "0"))


def steps_of(run: Any) -> tuple[dict | None, dict | None]:
    """A study run's data steps before / after training (``study.steps``)."""
    return (getattr(run, "before", None), getattr(run, "after", None))


def execute(name: str, cfg: TrainConfig, keep_checkpoints: bool = True, job: str | None = None,
            steps: tuple[dict | None, dict | None] = (None, None)) -> dict:
    """Train one run (see the module docstring), with its data steps before / after (``study.steps``:
    detection, filter-then-retrain). ``job``: the claim's job id, kept alive meanwhile."""
    from clip_backdoor.cleaning import build_recipe
    from clip_backdoor.defenses import build_defense
    from clip_backdoor.study.steps import run_step
    from clip_backdoor.train.loop import train
    from clip_backdoor.train.preempt import Preempted, signal_name

    if _WORKER.get("device"):
        cfg = dataclasses.replace(cfg, device=_WORKER["device"])
    _WORKER["run"] = name
    main = rank() == 0
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        (run_dir / FINISHED).unlink(missing_ok=True)
        claims.update(run_dir, state="running", host=claims.host(), pid=os.getpid(),
                      **({"job": job} if job else {}))
    log_name = "train.log" if main else f"train.rank{rank()}.log"
    handler = logging.FileHandler(run_dir / log_name, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)  # the epoch lines reach train.log whatever the console shows
    started = time.perf_counter()
    release = True
    try:
        with claims.Heartbeat(lambda: [run_dir] if main else []):
            recipe = build_recipe(cfg.method, cfg.method_params) if cfg.method else None
            if cfg.defense:
                recipe = build_defense(cfg.defense, cfg.defense_params)
            if main:
                run_step(steps[0], cfg)
            row = train(cfg, recipe)
            if main and row.get("epoch", 0) >= cfg.epochs:
                run_step(steps[1], cfg)
        seconds = time.perf_counter() - started
        if row.get("epoch", 0) < cfg.epochs:  # stop_epoch: paused, not finished
            return {"ok": True, "seconds": seconds, "row": row, "paused": row.get("epoch", 0)}
        if main:
            write_json(run_dir / FINISHED, {"epochs": cfg.epochs, "seconds": seconds, "last": row,
                                            "config": to_dict(cfg)})
            if not keep_checkpoints:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return {"ok": True, "seconds": seconds, "row": row}
    except Preempted as e:
        release = False  # a requeued job (or the next `study run`) takes it up again
        return {"ok": False, "seconds": time.perf_counter() - started, "preempted": e.signum,
                "error": f"preempted by {signal_name(e.signum)} after step {e.step}; rerun to resume "
                         "from its mid-epoch checkpoint"}
    except Exception as e:  # one run's failure must not stop the study
        if main:
            (run_dir / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
        message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        return {"ok": False, "seconds": time.perf_counter() - started,
                "error": (message.splitlines() or [type(e).__name__])[0]}
    finally:
        if main and release:
            claims.release(run_dir)
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
        _WORKER["run"] = "study"


def outcome_of(run_dir: str | Path) -> dict:
    """What execute returned, read back from a finished run's directory (another process ran it)."""
    import json

    marker = json.loads((Path(run_dir) / FINISHED).read_text(encoding="utf-8"))
    return {"ok": True, "seconds": marker.get("seconds", 0.0), "row": marker.get("last") or {}}


def main(argv: list[str] | None = None) -> int:
    """``python -m clip_backdoor.study.worker NAME CONFIG.yaml [--no-keep]``: one run in this process
    (each rank of ``torchrun ... -m clip_backdoor.study.worker``). Exit 0 done, 75 preempted, 1 failed."""
    import argparse

    from clip_backdoor.config import load_config
    from clip_backdoor.train.preempt import REQUEUE_EXIT_CODE

    p = argparse.ArgumentParser(prog="python -m clip_backdoor.study.worker")
    p.add_argument("name")
    p.add_argument("config")
    p.add_argument("--no-keep", action="store_true", help="delete the checkpoints once finished")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        cfg = load_config(TrainConfig, args.config)
    except UserError as e:
        print(f"worker: error: {e}", file=sys.stderr)
        return 2
    result = execute(args.name, cfg, not args.no_keep, job=os.environ.get("CLAIM_JOB"))
    if not result["ok"]:
        print(f"{args.name}: {result['error']}", file=sys.stderr)
    return 0 if result["ok"] else REQUEUE_EXIT_CODE if result.get("preempted") else 1


if __name__ == "__main__":
    sys.exit(main())
