"""Preemption: a signal asks the training loop to stop at the next step boundary, resumably.

Clusters end jobs with signals: SLURM sends SIGTERM when it preempts a job or at its time limit,
and a user signal some seconds before the limit when the job asked for one (``--signal``; submitit
uses SIGUSR2 by default). :class:`Guard` only records the signal. The loop finishes the step it is
in, writes an exact mid-epoch checkpoint (``latest.pt``: model, optimizer, scaler, recipe state, the
position within the epoch and the epoch's running loss sums) and raises :class:`Preempted`. The
``pretrain`` / ``clean`` commands then exit with :data:`REQUEUE_EXIT_CODE`, which the generated
sbatch scripts turn into ``scontrol requeue``; a restarted run continues from that step.

SIGINT (Ctrl-C) is not handled here: it stays a KeyboardInterrupt, whose resumable state is the
last epoch checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import torch

from clip_backdoor.train import distributed as D

log = logging.getLogger(__name__)

SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry".
REQUEUE_EXIT_CODE = 75


class Preempted(BaseException):
    """The run stopped on a signal after writing a resumable checkpoint.

    A BaseException, like KeyboardInterrupt: a handler of ordinary errors ("this run failed") must
    not swallow it, and a job wrapper must see it to requeue the job."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal_name(signum)} after step {step}; resumable from {checkpoint}")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Guard:
    """While active (a ``with`` block in the main thread), SIGTERM/SIGUSR1/SIGUSR2 set a flag instead
    of ending the process; the previous handlers come back on exit. In other threads it does
    nothing (Python delivers signals to the main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Guard:
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            log.warning("received %s: finishing this step, then writing a resumable checkpoint",
                        signal_name(signum))
            if signum == signal.SIGTERM and threading.current_thread() is threading.main_thread():
                # A SIGTERM to the whole job kills the dataloader workers too, and torch's SIGCHLD
                # handler would raise here; the rest of this step needs no worker, so their deaths
                # are not errors now (the previous handler comes back on exit).
                self._previous.setdefault(signal.SIGCHLD, signal.signal(signal.SIGCHLD, signal.SIG_DFL))
        self.signum = signum

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as a signal would (tests, recipes)."""
        self.signum = signum

    def stop(self, env: D.DistEnv, device: torch.device) -> bool:
        """True when any rank got a signal: every rank stops at the same step (one all-reduce)."""
        stop = D.any_rank(self.signum is not None, env, device)
        if stop and self.signum is None:
            self.signum = signal.SIGTERM  # another rank's signal
        return stop


def gather(obj: dict, env: D.DistEnv) -> list[dict]:
    """Every rank's ``obj``, in rank order (a collective: every rank calls it)."""
    if not env.enabled:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
