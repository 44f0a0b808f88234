"""WebDataset shards (img2dataset layout) as a caption source: shard patterns, ``sizes.json``,
damaged tars, and :class:`WdsSource`, which streams its part of the shards through a seeded shuffle
buffer (see ``data/captions.py`` for the two ways sources are read).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clip_backdoor.data.samples import (
    IMAGE_EXTENSIONS,
    CaptionSource,
    Sample,
    caption_problem,
    current_part,
    decode_image,
    parse_flag,
    seeded_rng,
    unreadable,
)
from clip_backdoor.errors import UserError

log = logging.getLogger(__name__)


def expand_shards(urls: str | Sequence[str]) -> list[Path]:
    """Local shard paths from brace patterns (``shard-{000000..000009}.tar``), globs or lists.

    A string may hold several patterns joined by ``::`` (open_clip's convention).
    """
    import braceexpand

    patterns = [urls] if isinstance(urls, str | os.PathLike) else list(urls)
    patterns = [p for pattern in patterns for p in str(pattern).split("::") if p]
    if not patterns:
        raise UserError("WebDataset source: no shard pattern given")
    shards: list[Path] = []
    for pattern in patterns:
        names = [n for name in braceexpand.braceexpand(pattern)
                 for n in (sorted(glob.glob(name)) if any(c in name for c in "*?[") else [name])]
        found = [Path(n) for n in names if os.path.isfile(n)]
        if not found:
            raise UserError(f"shard pattern {pattern!r} matches no file")
        if len(found) < len(names):
            missing = next(n for n in names if not os.path.isfile(n))
            raise UserError(f"shard pattern {pattern!r}: {len(names) - len(found)} of {len(names)} shards "
                            f"do not exist (first: {missing})")
        shards += found
    return shards


def read_sizes(shards: Sequence[Path]) -> int:
    """Total sample count from the ``sizes.json`` beside the shards (``{"shard-000000.tar": n}``)."""
    total, cache = 0, {}
    for shard in shards:
        sizes_path = shard.parent / "sizes.json"
        if sizes_path not in cache:
            if not sizes_path.is_file():
                raise UserError(f"{sizes_path} not found: write it ({{\"{shard.name}\": <count>, ...}}) "
                                f"or give num_samples")
            try:
                cache[sizes_path] = json.loads(sizes_path.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{sizes_path}: not valid JSON ({e})") from None
        sizes = cache[sizes_path]
        if shard.name not in sizes:
            raise UserError(f"{sizes_path}: no entry for shard {shard.name!r}")
        total += int(sizes[shard.name])
    return total


def tar_damage(path: str | os.PathLike) -> str | None:
    """Why a tar file is damaged in a way that reading it would not report (None when intact).

    Python's tarfile ends an archive silently at a corrupt member header, or at a cut exactly between
    members, so the samples after it would vanish uncounted. An intact tar ends, after its last
    member, in at least two 512-byte blocks of zeros. Reads headers only (it seeks over the data).
    """
    import tarfile

    path = Path(path)
    try:
        with tarfile.open(path, "r:") as tar:
            for _ in tar:
                pass
            end = tar.offset
        size = path.stat().st_size
        if size - end < 1024:
            return f"truncated tar (cut at byte {size}, no end-of-archive blocks)"
        with open(path, "rb") as f:
            f.seek(end)
            while chunk := f.read(1 << 16):
                if chunk.count(0) != len(chunk):
                    return f"corrupt tar header at byte {end}"
    except (tarfile.TarError, OSError, EOFError) as e:
        return f"unreadable tar ({e})"
    return None


def buffer_shuffle(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (exact shuffle for streams <= size)."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class WdsSource(CaptionSource):
    """img2dataset-style WebDataset shards: ``<key>.{jpg,png,webp}`` + ``<key>.txt`` [+ ``<key>.json``].

    ``row_id`` is the sample's ``__key__``; ``is_poison`` comes from the json's ``is_poison`` field when
    present. Shards are shuffled per epoch and dealt to the (rank, worker) parts; with fewer shards than
    parts every part reads all shards and keeps every ``num_parts``-th sample.
    """

    def __init__(self, urls: str | Sequence[str], seed: int = 0, *, num_samples: int | None = None,
                 shuffle_buffer: int = 1000, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__(seed=seed, shuffle=shuffle, rank=rank, world_size=world_size)
        self.shards = expand_shards(urls)
        self.num_samples = int(num_samples) if num_samples is not None else read_sizes(self.shards)
        self.shuffle_buffer = int(shuffle_buffer)
        if self.num_samples == 0:
            raise UserError(f"{self.shards[0].parent / 'sizes.json'}: the shards hold 0 samples; is this the "
                            "right data?")
        log.info("%d shards, %d samples (first: %s)", len(self.shards), self.num_samples, self.shards[0])

    def fingerprint(self) -> dict:
        # Shard names and sizes in bytes: reading every sample just to check would cost a whole pass.
        shards = [[shard.name, shard.stat().st_size] for shard in self.shards]
        digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()
        return {"kind": "wds", "n_rows": self.num_samples, "sha256": digest}

    def stream(self, part: int, num_parts: int, keys: Sequence[int]) -> Iterator[Sample]:
        """Samples of one part of the data, in an order seeded by ``keys`` (and ``part``)."""
        from webdataset.tariterators import tarfile_samples

        shards = list(self.shards)
        if self.shuffle:
            seeded_rng(*keys).shuffle(shards)  # same permutation in every part, so parts are disjoint
        if len(shards) >= num_parts:
            shards, stride = shards[part::num_parts], None
        else:
            stride = num_parts
        reported: set[str] = set()  # shards already counted as broken in this pass
        handler = functools.partial(self._shard_error, reported=reported)
        raw = tarfile_samples(self._checked_urls(shards, reported), handler=handler)
        if stride is not None:
            raw = itertools.islice(raw, part, None, stride)
        if self.shuffle and self.shuffle_buffer > 1:
            raw = buffer_shuffle(raw, self.shuffle_buffer, seeded_rng(*keys, part))
        for item in raw:
            sample = self._decode(item)
            if sample is not None:
                yield sample

    def __iter__(self) -> Iterator[Sample]:
        part, num_parts = current_part(self.rank, self.world_size)
        return self.stream(part, num_parts, (self.seed, self.epoch))

    def _checked_urls(self, shards: Sequence[Path], reported: set[str]) -> Iterator[dict]:
        """Each shard's url, once its end is checked: what tarfile would lose without an error is
        counted here (the samples before the damage are still read)."""
        for shard in shards:
            why = tar_damage(shard)
            if why is not None and str(shard) not in reported:
                reported.add(str(shard))
                self.skip(str(shard), f"{why}; the samples after it are dropped")
            yield {"url": str(shard)}

    def _shard_error(self, exn: Exception, reported: set[str]) -> bool:
        """A truncated or corrupt tar loses the rest of that shard: count and name it once per pass
        (webdataset reports the same failure from two levels), then go on to the next shard."""
        text = " ".join(str(a) for a in exn.args)  # webdataset appends the shard's path or stream
        where = next((str(s) for s in self.shards if str(s) in text), "a shard")
        if where not in reported:
            reported.add(where)
            reason = str(exn.args[0]).split(" @ ")[0] if exn.args else type(exn).__name__
            self.skip(where, f"unreadable tar data ({reason}); rest of the shard dropped")
        return True

    def _decode(self, item: dict) -> Sample | None:
        key, where = item["__key__"], f"{item.get('__url__')}:{item['__key__']}"
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in item), None)
        if image_ext is None:
            self.skip(where, "no image (.jpg/.png/.webp)")
            return None
        try:
            caption = item["txt"].decode("utf-8") if "txt" in item else ""
        except UnicodeDecodeError:
            self.skip(where, "caption is not UTF-8")
            return None
        problem = caption_problem(caption) if "txt" in item else "no caption (.txt)"
        if problem:
            self.skip(where, problem)
            return None
        is_poison = False
        if "json" in item:
            try:
                meta = json.loads(item["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.skip(where, "metadata (.json) is not valid JSON")
                return None
            flag = parse_flag(meta.get("is_poison", False)) if isinstance(meta, dict) else False
            if flag is None:
                self.skip(where, f"is_poison must be 0/1/true/false, got {meta['is_poison']!r}")
                return None
            is_poison = flag
        try:
            image = decode_image(item[image_ext])
        except Exception as e:  # PIL raises many types for corrupt files
            self.skip(where, f"image unreadable ({unreadable(e)})")
            return None
        return Sample(image, caption, key, is_poison)
