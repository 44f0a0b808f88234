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
        self._torch_child = None

    def __enter__(self) -> Guard:
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.signum is not None:  # stopping: the workers' deaths stay no error while we wind down
            self._previous.pop(signal.SIGCHLD, None)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first, self.signum = self.signum is None, self.signum or signum
        if first:
            log.warning("received %s: finishing this step, then writing a resumable checkpoint",
                        signal_name(signum))

    def _watch_children(self) -> None:
        """Put ``_on_child`` in front of torch's SIGCHLD handler, which a loader installs (once per
        process) when its workers first start."""
        if threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signal.SIGCHLD)
        if current == self._on_child or not callable(current):
            return
        self._torch_child = current
        self._previous.setdefault(signal.SIGCHLD, current)
        signal.signal(signal.SIGCHLD, self._on_child)

    def _on_child(self, signum: int, frame: FrameType | None) -> None:
        """A dataloader worker's death is torch's error, except when the job is being stopped: a
        SIGTERM to every process of a job ends the workers too, possibly a moment before this
        process sees its own (the step in progress needs no worker)."""
        if self.signum is not None:
            return
        try:
            self._torch_child(signum, frame)
        except RuntimeError as e:
            if "Terminated" not in str(e):
                raise
            self.signum = signal.SIGTERM
            log.warning("a dataloader worker was terminated: finishing this step, then writing a "
                        "resumable checkpoint")

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as a signal would (tests, recipes)."""
        self.signum = signum

    def batches(self, loader, env: D.DistEnv):
        """The loader's batches. A SIGTERM to the whole job also ends the dataloader workers, and the
        next batch then fails; once this process got its stop signal that only ends the epoch early
        (the loop then saves where it is). Under DDP it still raises: the other ranks may have their
        batch, and stopping alone would leave them waiting (``save_every_steps`` bounds the loss)."""
        it = iter(loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError:
                if self.signum is None or env.enabled:
                    raise
                log.warning("the dataloader workers were stopped too; saving at this step")
                return
            self._watch_children()
            yield batch

    def stop(self, env: D.DistEnv, device: torch.device) -> bool:
        """True when any rank got a signal: every rank stops at the same step (one all-reduce)."""
        stop = D.any_rank(self.signum is not None, env, device)
        if stop and self.signum is None:
            self.signum = signal.SIGTERM  # another rank's signal
        return stop


def ignore_further_stops() -> None:
    """For a command that stopped on a signal and is now exiting (its state is saved): the same
    signal, sent again or to the whole job a moment later, must not turn exit code 75 into a kill."""
    if threading.current_thread() is threading.main_thread():
        for name in SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)


def gather(obj: dict, env: D.DistEnv) -> list[dict]:
    """Every rank's ``obj``, in rank order (a collective: every rank calls it)."""
    if not env.enabled:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
