"""The training data loader: a caption source -> batches of uint8 images and token ids.

Decoding, resizing and tokenising happen in the dataloader workers, a batch at a time (a caption is
tokenised only when its batch is built, so 3M captions never sit in memory as tokens).

Every rank gets the same number of batches per epoch, ``num_samples // (world_size * batch_size)``,
the remainder dropped: DDP hangs when one rank runs out of batches before the others. Batch ``b`` of
a rank is built by dataloader worker ``b % workers``, which is the order in which a torch DataLoader
collects batches from its workers, so batches come out in order ``0, 1, 2, ...``.

What is deterministic (same seeds, epoch, rank and world size):

- random-access sources (CSV, synthetic): batch ``b`` holds a fixed set of rows, so the batches are
  identical whatever the number of workers. A skipped row is replaced by a row drawn from a
  generator seeded by (seeds, epoch, rank, b).
- stream sources (WebDataset): identical for the same number of workers. Each (rank, worker) part
  reads its own shards; if it runs out before its batches are full it reads its shards again in a
  new order (so a sample can appear twice in an epoch while another does not appear).

Each batch carries ``n_skipped``: the rows skipped while it was assembled, counted in the worker
that built it, so summing over an epoch's batches gives the epoch's skips on this rank.

Resuming inside an epoch (``set_epoch(epoch, start_batch=b)``) yields batches ``b, b+1, ...`` of
that epoch, identical to an uninterrupted pass: random-access sources do not read the rows of the
batches before ``b``; a stream reads (and decodes) its samples up to ``b`` again, since a stream's
position is only known by reading it, but builds no batch from them. Each worker keeps its own
batches (``b' % workers``) and answers the ones before ``b`` with a marker the loader drops, so the
order in which the DataLoader collects from its workers is unchanged.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip_backdoor.data.samples import CaptionSource, Sample, seeded_rng
from clip_backdoor.data.transforms import preprocess
from clip_backdoor.errors import UserError
from clip_backdoor.tokenizer import tokenize

log = logging.getLogger(__name__)

# Replacement draws for skipped rows, per sample of the batch; when all of them fail the data is broken.
MAX_SKIPS_PER_SAMPLE = 20
# The key of a worker's stand-in for a batch before the resume point (see set_epoch).
_RESUMED_PAST = "resumed_past_batch"


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    return num_samples // (batch_size * world_size)


class _Batches(IterableDataset):
    """One rank's batches for the epoch held in ``epoch`` (a shared value, so persistent workers see
    ``set_epoch`` from the main process)."""

    def __init__(self, source: CaptionSource, *, image_size: int, context_length: int, batch_size: int,
                 seed: int, eda: Callable[[str, str, int], str] | None, rank: int, world_size: int,
                 epoch: Any, start: Any):  # multiprocessing.Value("q", lock=False) both
        super().__init__()
        self.source, self.eda, self.epoch, self.start = source, eda, epoch, start
        self.image_size, self.context_length, self.batch_size = image_size, context_length, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_batches = batches_per_epoch(source.num_samples, batch_size, world_size)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start = int(self.epoch.value), int(self.start.value)
        self.source.set_epoch(epoch)
        batch_ids = range(worker, self.num_batches, num_workers)
        if self.source.random_access:
            groups = self._indexed(batch_ids, epoch, start)
        else:
            groups = self._streamed(len(batch_ids), worker, num_workers, epoch)
        counted = self.source.n_skipped
        for b, samples in zip(batch_ids, groups):
            n_skipped, counted = self.source.n_skipped - counted, self.source.n_skipped
            # before the resume point: counted before the interruption, dropped by TrainLoader
            yield {_RESUMED_PAST: b} if b < start else self._collate(samples, epoch, n_skipped)

    def _keys(self, epoch: int) -> tuple[int, ...]:
        return (self.source.seed, self.seed, epoch)

    def _indexed(self, batch_ids: range, epoch: int, start: int = 0) -> Iterator[list[Sample] | None]:
        rows = self.source.order(self._keys(epoch))[self.rank::self.world_size]
        size = self.batch_size
        for b in batch_ids:
            if b < start:  # a pure function of b: nothing to read to get past it
                yield None
                continue
            loaded = (self.source.load(int(i)) for i in rows[b * size:(b + 1) * size])
            samples = [s for s in loaded if s is not None]
            if len(samples) < size:
                spare = seeded_rng(*self._keys(epoch), self.rank, b)
                for _ in range(MAX_SKIPS_PER_SAMPLE * size):
                    sample = self.source.load(int(rows[spare.integers(len(rows))]))
                    if sample is not None:
                        samples.append(sample)
                        if len(samples) == size:
                            break
                else:
                    raise UserError(f"batch {b} of rank {self.rank}: more than {MAX_SKIPS_PER_SAMPLE * size} "
                                    "replacement rows unusable; is the dataset broken? (see the warnings)")
            yield samples

    def _streamed(self, n_batches: int, worker: int, num_workers: int, epoch: int) -> Iterator[list[Sample]]:
        part, num_parts = self.rank * num_workers + worker, self.world_size * num_workers
        samples: list[Sample] = []
        made, passes = 0, 0
        while made < n_batches:
            read_any = False
            for sample in self.source.stream(part, num_parts, (*self._keys(epoch), passes)):
                read_any = True
                samples.append(sample)
                if len(samples) == self.batch_size:
                    yield samples
                    samples, made = [], made + 1
                    if made == n_batches:
                        return
            if not read_any:
                raise UserError(f"data part {part} of {num_parts} (rank {self.rank}, worker {worker}) "
                                "yielded no usable sample; see the warnings above")
            passes += 1
            if passes == 1:
                log.debug("part %d of %d: ran out after %d batches, reading its shards again",
                          part, num_parts, made)

    def _collate(self, samples: list[Sample], epoch: int, n_skipped: int) -> dict:
        captions = [s.caption for s in samples]
        batch = {
            "images": torch.stack([preprocess(s.image, self.image_size) for s in samples]),
            "texts": tokenize(captions, self.context_length),
            "row_ids": [s.row_id for s in samples],
            "is_poison": torch.tensor([bool(s.is_poison) for s in samples], dtype=torch.bool),
            "n_skipped": int(n_skipped),
        }
        if self.eda is not None:
            augmented = [self.eda(s.caption, s.row_id, epoch) for s in samples]
            batch["texts_aug"] = tokenize(augmented, self.context_length)
        return batch


class TrainLoader:
    """Batches of one rank for one epoch at a time; ``len()`` = batches per epoch on every rank."""

    def __init__(self, batches: _Batches, dataloader: DataLoader):
        self._batches, self.dataloader = batches, dataloader
        self.source = batches.source
        self.batch_size = batches.batch_size

    def __len__(self) -> int:
        return self._batches.num_batches

    @property
    def epoch(self) -> int:
        return int(self._batches.epoch.value)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch the next pass reads; ``start_batch`` > 0 resumes it at that batch."""
        if not 0 <= start_batch <= len(self):
            raise UserError(f"start_batch {start_batch}: the epoch has {len(self)} batches")
        self._batches.epoch.value = int(epoch)
        self._batches.start.value = int(start_batch)
        self.source.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        try:
            for batch in self.dataloader:
                if _RESUMED_PAST not in batch:  # a worker's stand-in for a batch before the resume point
                    yield batch
        except UserError as e:  # raised in a worker: torch wraps it in the worker's traceback
            raise UserError(worker_message(e)) from None


def worker_message(error: BaseException) -> str:
    """The one-line message of an error re-raised from a dataloader worker (torch prepends the
    worker's whole traceback, which must not reach the user for a mistake of theirs)."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    marker = f"{type(error).__name__}: "
    lines = [line for line in text.splitlines() if marker in line]
    return lines[-1].split(marker, 1)[1].strip() if lines else text.splitlines()[0]


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A dataloader worker's ``worker_init_fn``: leave SIGUSR1/SIGUSR2 (a cluster's "time is nearly
    up", sent to every process of a job) to the training process, which checkpoints and then shuts
    the workers down. SIGTERM keeps torch's handling: it is also how a loader (or the interpreter at
    exit) ends workers that did not stop; the training process tolerates their deaths once it got a
    stop signal itself (``train/preempt.py``)."""
    for name in ("SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def build_train_loader(source: CaptionSource, *, image_size: int, context_length: int, batch_size: int,
                       workers: int, seed: int, eda: Callable[[str, str, int], str] | None = None,
                       rank: int = 0, world_size: int = 1) -> TrainLoader:
    """A loader of ``{"images", "texts", ["texts_aug"], "row_ids", "is_poison", "n_skipped"}`` batches.

    The epoch's order is seeded by (the source's seed, ``seed``, epoch). ``eda(caption, row_id, epoch)``
    makes the augmented caption for SSL. ``workers=0`` runs everything in this process.
    """
    if batch_size < 1 or workers < 0:
        raise UserError(f"batch_size={batch_size}, workers={workers}: need batch_size >= 1 and workers >= 0")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size")
    if seed < 0:
        raise UserError(f"seed {seed}: must be >= 0")
    n_batches = batches_per_epoch(source.num_samples, batch_size, world_size)
    if n_batches == 0:
        raise UserError(f"{source.num_samples} samples make no full batch of {batch_size} on each of "
                        f"{world_size} rank(s); lower batch_size")
    epoch = multiprocessing.Value("q", int(getattr(source, "epoch", 0)), lock=False)
    start = multiprocessing.Value("q", 0, lock=False)
    batches = _Batches(source, image_size=image_size, context_length=context_length, batch_size=batch_size,
                       seed=seed, eda=eda, rank=rank, world_size=world_size, epoch=epoch, start=start)
    workers = min(workers, n_batches)  # a worker with no batch would only cost start-up time
    dataloader = DataLoader(batches, batch_size=None, num_workers=workers,
                            pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                            prefetch_factor=4 if workers > 0 else None,
                            worker_init_fn=ignore_stop_signals if workers > 0 else None)
    return TrainLoader(batches, dataloader)


__all__ = ["build_train_loader", "TrainLoader", "batches_per_epoch", "ignore_stop_signals"]
