"""What every image–caption source yields and shares: :class:`Sample`, the base classes
(:class:`CaptionSource`, :class:`IndexedSource`, :class:`MappedSource`) and the checks every reader
applies to a row (flags, captions, image bytes).

The readers (``data/captions.py``: CSV, synthetic; ``data/shards.py``: WebDataset), the training
loader (``data/loader.py``), the writers (``data/writers.py``) and the poisoning code build on this
module; it imports none of them. See ``data/captions.py`` for how sources are read and what counts
as an unusable row.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import get_worker_info

from clip_backdoor.errors import UserError

log = logging.getLogger(__name__)

# How many unusable rows each process names in the log before it only counts them.
WARN_FIRST_SKIPS = 5
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_TRUE, _FALSE = {"1", "true", "yes"}, {"0", "false", "no", ""}
# pandas.read_csv's default missing-value markers: a caption that is exactly one of them is missing.
MISSING_CAPTIONS = frozenset({"#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                              "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


class Sample(NamedTuple):
    image: Image.Image | torch.Tensor  # PIL RGB image, or uint8 [3,H,W] already at model resolution
    caption: str
    row_id: str
    is_poison: bool


def seeded_rng(*keys: int) -> np.random.Generator:
    """A generator that is a pure function of ``keys`` (e.g. seed, epoch, rank, batch)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def parse_flag(value: Any) -> bool | None:
    """0/1/true/false/yes/no (any case, or a bool/int) -> bool; anything else -> None."""
    if isinstance(value, bool | int | np.integer):
        return bool(value) if value in (0, 1) else None
    if isinstance(value, str):
        value = value.strip().lower()
        return True if value in _TRUE else False if value in _FALSE else None
    return None


def decode_image(data: bytes) -> Image.Image:
    """Fully decode (so truncation shows up here, not later in a worker) and convert to RGB."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode == "P" and "transparency" in img.info:
            # Same RGB values as a direct convert, without PIL's warning on every such web image.
            return img.convert("RGBA").convert("RGB")
        return img.convert("RGB")


def unreadable(e: Exception) -> str:
    """Why an image could not be decoded, in words (PIL's own message names a BytesIO object)."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image format PIL can read"
    return f"{type(e).__name__}: {e}"


def caption_problem(caption: Any) -> str | None:
    """Why a caption cannot be trained on (None when it can): not text, empty, or a missing-value marker."""
    if not isinstance(caption, str):
        return "caption is not text"
    text = caption.strip()
    if not text:
        return "empty caption"
    if text in MISSING_CAPTIONS:
        return f"missing caption ({text!r} marks a missing value)"
    return None


def usable_caption(caption: Any) -> bool:
    return caption_problem(caption) is None


def current_part(rank: int, world_size: int) -> tuple[int, int]:
    """(part, num_parts) of this process: one part per (rank, dataloader worker)."""
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * num_workers + worker, world_size * num_workers


class CaptionSource:
    """What every source shares: size, seed, epoch, this process's rank and the skip counter."""

    num_samples: int
    random_access = False  # True: load(index) + order(keys); False: stream(part, num_parts, keys)

    def __init__(self, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if seed < 0:
            raise UserError(f"data seed {seed}: must be >= 0")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size")
        self.seed, self.shuffle, self.rank, self.world_size = int(seed), bool(shuffle), rank, world_size
        self.epoch = 0
        self.n_skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def fingerprint(self) -> dict:
        """What identifies this source's rows, independent of shuffling, rank and seed; a poison
        manifest records it and refuses another source (``attacks.manifest.check_source``)."""
        return {"kind": type(self).__name__, "n_rows": int(self.num_samples), "sha256": None}

    def skip(self, where: str, why: str) -> None:
        """Count an unusable row; name it in the log only the first few times in this process."""
        self.n_skipped += 1
        if self.n_skipped <= WARN_FIRST_SKIPS:
            log.warning("skipping %s: %s", where, why)
            if self.n_skipped == WARN_FIRST_SKIPS:
                log.warning("further unusable rows in this process are counted, not logged")

    def __len__(self) -> int:
        return self.num_samples


class IndexedSource(CaptionSource):
    """A source with random access: ``load(index) -> Sample | None`` (None: skipped and counted)."""

    random_access = True

    def load(self, index: int) -> Sample | None:
        raise NotImplementedError

    def order(self, keys: Sequence[int]) -> np.ndarray:
        """Row indices in the order of one pass: a permutation seeded by ``keys``, or file order."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return seeded_rng(*keys).permutation(self.num_samples)

    def __iter__(self) -> Iterator[Sample]:
        part, num_parts = current_part(self.rank, self.world_size)
        for index in self.order((self.seed, self.epoch))[part::num_parts]:
            sample = self.load(int(index))
            if sample is not None:
                yield sample


class MappedSource(CaptionSource):
    """A source whose samples pass through ``fn(Sample) -> Sample`` (e.g. triggering poisoned rows
    on the fly). It reads like the wrapped source (random access or stream) and shares its skip
    counter, seed and epoch. ``fn`` must be picklable for dataloader workers started by spawn."""

    def __init__(self, inner: CaptionSource, fn: Callable[[Sample], Sample]):
        self.inner, self.fn = inner, fn
        self.num_samples = inner.num_samples

    def __getattr__(self, name: str) -> Any:
        # seed, shuffle, rank, world_size, epoch, n_skipped, random_access: the inner source's, live.
        if name == "inner":  # not yet set (unpickling): don't recurse
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def random_access(self) -> bool:  # the class attribute would otherwise hide the inner one
        return self.inner.random_access

    def load(self, index: int) -> Sample | None:
        sample = self.inner.load(index)
        return None if sample is None else self.fn(sample)

    def order(self, keys: Sequence[int]) -> np.ndarray:
        return self.inner.order(keys)

    def stream(self, part: int, num_parts: int, keys: Sequence[int]) -> Iterator[Sample]:
        return map(self.fn, self.inner.stream(part, num_parts, keys))

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def fingerprint(self) -> dict:
        return self.inner.fingerprint()

    def skip(self, where: str, why: str) -> None:
        self.inner.skip(where, why)

    def __iter__(self) -> Iterator[Sample]:
        return map(self.fn, iter(self.inner))
