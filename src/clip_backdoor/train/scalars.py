"""Where the training loop reports scalars besides ``metrics.jsonl``: ``report_to: tensorboard``.

TensorBoard (the optional extra ``clip-backdoor[tensorboard]``) gets every ``metrics.jsonl`` key:
each optimizer step's loss terms and learning rate as ``train/<key>``, and every numeric key of each
epoch line (evaluation metrics included) as ``epoch/<key>``. Every tag's x-axis is the global step
(steps completed, as in ``metrics.jsonl``), so losses and accuracy line up; ``epoch/epoch`` maps steps
to epochs. Only rank 0 writes, into ``<run_dir>/tensorboard/``. A resumed run purges the events
logged after its checkpoint (they are logged again); a fresh start removes an old run's events.
Without ``report_to`` the loop gets a :class:`NullWriter` and nothing changes.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from clip_backdoor.errors import UserError

BACKENDS = ("tensorboard",)
EXTRA = "pip install 'clip-backdoor[tensorboard]'"
FOLDER = "tensorboard"


def parse_report_to(value: str | None, where: str = "report_to") -> tuple[str, ...]:
    """``None`` / ``""`` / ``"none"`` -> (); ``"tensorboard"`` (comma-separated names) -> the backends."""
    if value is None:
        return ()
    names = [name.strip() for name in str(value).split(",") if name.strip() and name.strip() != "none"]
    for name in names:
        if name not in BACKENDS:
            raise UserError(f"{where}: unknown backend {name!r}; choose from {', '.join(BACKENDS)} "
                            "(or leave it unset)")
    return tuple(dict.fromkeys(names))


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(f"report_to=tensorboard needs the tensorboard package: {EXTRA}") from None
    return SummaryWriter


def check_report_to(value: str | None, where: str = "report_to") -> tuple[str, ...]:
    """Validate the names and that their packages import (before any training starts)."""
    backends = parse_report_to(value, where)
    if "tensorboard" in backends:
        _summary_writer_class()
    return backends


class NullWriter:
    """Reports nowhere (``report_to`` unset, or a rank other than 0)."""

    def add_step(self, step: int, values: dict[str, float]) -> None:
        pass

    def add_epoch(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardWriter(NullWriter):
    def __init__(self, log_dir: Path, purge_step: int | None):
        self._writer = _summary_writer_class()(log_dir=str(log_dir), purge_step=purge_step)

    def add_step(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._writer.add_scalar(f"train/{key}", value, step)

    def add_epoch(self, row: dict) -> None:
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
                continue  # method (a dict), init (a string): not scalars
            self._writer.add_scalar(f"epoch/{key}", value, row["step"])
        self._writer.flush()  # an epoch's events are on disk when its metrics line is

    def close(self) -> None:
        self._writer.close()


def open_writer(report_to: str | None, run_dir: str | Path, *, is_main: bool,
                resume_step: int | None) -> NullWriter:
    """The writer of one run; ``resume_step``: the checkpoint's step when resuming, None on a fresh start."""
    if not is_main or "tensorboard" not in parse_report_to(report_to):
        return NullWriter()
    log_dir = Path(run_dir) / FOLDER
    if resume_step is None:
        shutil.rmtree(log_dir, ignore_errors=True)  # a fresh start owns its events, as its metrics file
    # Steps after the checkpoint ran before the interruption and run again: hide their old events.
    return TensorBoardWriter(log_dir, purge_step=None if resume_step is None else resume_step + 1)
