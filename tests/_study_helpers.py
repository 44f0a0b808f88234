"""Module-level pieces for the study runner's worker processes (a spawned worker imports what it runs
by name): ``execute`` with training replaced by a note of the device the run was handed."""

from __future__ import annotations

import time
from pathlib import Path

DEVICE_FILE = "device.txt"
WAIT_S = 120


def execute_noting_the_device(name, cfg, keep_checkpoints=True, job=None, steps=(None, None)):
    """The runner's real ``execute`` (study/worker.py), whose training writes ``cfg.device`` to the
    run directory and then waits for the other pre-training run to start, so the two runs are held
    by two workers at once (one worker cannot take both)."""
    from clip_backdoor.study import worker
    from clip_backdoor.train import loop

    def train(cfg, recipe=None):
        run_dir = Path(cfg.run_dir)
        (run_dir / DEVICE_FILE).write_text(cfg.device)
        deadline = time.monotonic() + WAIT_S
        while len(list(run_dir.parent.glob(f"*/{DEVICE_FILE}"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"epoch": cfg.epochs}

    loop.train = train
    return worker.execute(name, cfg, keep_checkpoints, job, steps)
