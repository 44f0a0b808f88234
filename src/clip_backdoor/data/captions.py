"""Image–caption sources: a CSV of image paths (CleanCLIP layout), WebDataset shards (img2dataset
layout) and the synthetic world, all yielding the same :class:`Sample`.

Two ways of reading, chosen by what the storage allows:

- random access (:class:`CsvSource`, :class:`SyntheticSource`): ``order(keys)`` is the epoch's
  permutation of row indices and ``load(index)`` reads one row. The training loader can then give
  every batch a fixed set of rows, whatever the number of dataloader workers.
- streams (:class:`WdsSource`): ``stream(part, num_parts, keys)`` reads the shards of one part of the
  data in a shuffled order, through a small shuffle buffer.

``keys`` is a tuple of non-negative ints (seed, epoch, ...) from which every shuffle is seeded, so the
same keys give the same order. Plain ``iter(source)`` yields this rank's and dataloader worker's share
of the current epoch (``set_epoch``) and is what writers and tools use.

A row that cannot be used (missing or corrupt image, empty or missing caption, a malformed CSV
row) is skipped, never raised: the source logs the first few at WARNING and counts all of them in
``n_skipped``. That count lives in the process that read the rows (a dataloader worker), so the
training loader reports it per batch. A caption is missing when it is empty or one of pandas'
missing-value markers (``NaN``, ``None``, ``null``, ``N/A``, ...; :data:`MISSING_CAPTIONS`): a CSV
written by ``DataFrame.to_csv`` from a frame with gaps must not train on the word "nan".

What would change which rows exist is an error, not a skip: a file without data rows, or a quote
that is never closed (it would merge the following rows into one caption); see :class:`CsvSource`.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import logging
import os
import re
import time
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

# The shared types and checks live in data/samples.py, the WebDataset reader in data/shards.py;
# both are part of this module's interface (re-exported below).
from clip_backdoor.data.samples import (
    IMAGE_EXTENSIONS,
    MISSING_CAPTIONS,
    CaptionSource,
    IndexedSource,
    MappedSource,
    Sample,
    caption_problem,
    decode_image,
    parse_flag,
    seeded_rng,
    unreadable,
    usable_caption,
)
from clip_backdoor.data.shards import WdsSource, expand_shards, read_sizes
from clip_backdoor.errors import UserError

log = logging.getLogger(__name__)


class _StringColumn:
    """Many strings in one UTF-8 buffer plus offsets.

    A 3M-row column costs about its text size, and forked dataloader workers share it instead of
    copying it page by page (a list of str objects gets copied as workers touch refcounts).
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] | None = []
        self._ends = array("q")
        self._size = 0

    def append(self, text: str | bytes) -> None:
        data = text.encode("utf-8") if isinstance(text, str) else text
        self._chunks.append(data)
        self._size += len(data)
        self._ends.append(self._size)

    def freeze(self) -> _StringColumn:
        self._data = np.frombuffer(b"".join(self._chunks), dtype=np.uint8)
        self._chunks = None
        self._ends_np = np.frombuffer(self._ends, dtype=np.int64).copy()
        return self

    def __len__(self) -> int:
        return len(self._ends)

    def update_hash(self, h: Any) -> None:
        h.update(self._ends_np.tobytes())
        h.update(memoryview(self._data))

    def __getitem__(self, i: int) -> str:
        start = int(self._ends_np[i - 1]) if i > 0 else 0
        return self._data[start:int(self._ends_np[i])].tobytes().decode("utf-8")


class CsvSource(IndexedSource):
    """Rows of a CSV with an image path (relative to the CSV's folder) and a caption per row.

    ``row_id`` is the row's 0-based index among the data rows. An ``is_poison`` column (0/1/true/
    false) is read when present; without it every row is clean.

    Malformed rows keep their place (row ids never shift) and are skipped and counted like a bad
    image: a row with more fields than the header (an unquoted separator), bytes that are not
    UTF-8, or quoting broken within its own line (``"a" b``). A quote that is never closed is an
    error naming the line, because it would swallow the rows after it into one caption: the reader
    reports a quoted field that runs to the end of the file or into an error on a later line, or
    that holds a line which would be a row of its own (as many fields as the header, an image file
    name where the image column is). A caption spanning lines inside proper quotes is accepted.
    A file with a header but no data rows is an error too.
    """

    def __init__(self, path: str | os.PathLike, image_key: str = "image", caption_key: str = "caption",
                 separator: str = ",", poison_key: str | None = "is_poison", *, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__(seed=seed, shuffle=shuffle, rank=rank, world_size=world_size)
        self.path = Path(path)
        self.root = self.path.parent
        self.malformed: dict[int, str] = {}  # row index -> why it is skipped (found while reading)
        self.images, self.captions, self.poison = self._read(image_key, caption_key, separator, poison_key)
        self.num_samples = len(self.images)
        if self.num_samples == 0:
            raise UserError(f"{self.path}: no data rows (only a header); is this the right file?")
        log.info("%s: %d rows, %d marked poisoned%s", self.path, self.num_samples, int(self.poison.sum()),
                 f", {len(self.malformed)} malformed (skipped)" if self.malformed else "")

    def _read(self, image_key: str, caption_key: str, separator: str,
              poison_key: str | None) -> tuple[_StringColumn, _StringColumn, np.ndarray]:
        if not self.path.is_file():
            raise UserError(f"{self.path}: CSV file not found")
        images, captions, poison = _StringColumn(), _StringColumn(), array("b")
        # -sig: tolerate a BOM (Excel); surrogateescape: a non-UTF-8 byte spoils its row, not the file.
        with open(self.path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.reader(f, delimiter=separator, strict=True)
            try:
                header = [name.strip() for name in next(reader, [])]
            except csv.Error as e:
                raise UserError(f"{self.path}:1: the header is not valid CSV ({e})") from None
            for key in (image_key, caption_key):
                if key not in header:
                    hint = f"; is the separator {separator!r} right?" if len(header) == 1 else ""
                    raise UserError(f"{self.path}: no column {key!r}; the header has "
                                    f"{', '.join(repr(h) for h in header) or 'no columns'}{hint}")
            col_image, col_caption = header.index(image_key), header.index(caption_key)
            col_poison = header.index(poison_key) if poison_key in header else None
            for line, row, why in self._records(reader, len(header), col_image, separator):
                # A short row keeps empty fields, which load() then skips and counts.
                image = row[col_image].strip() if col_image < len(row) else ""
                caption = row[col_caption] if col_caption < len(row) else ""
                try:
                    image_bytes, caption_bytes = image.encode("utf-8"), caption.encode("utf-8")
                except UnicodeEncodeError:  # the surrogates of undecodable bytes
                    why = why or "not valid UTF-8"
                if why:  # kept empty, so column readers (the poison scan) see an unusable row too
                    self.malformed[len(images)] = f"line {line}: {why}"
                    image_bytes = caption_bytes = b""
                images.append(image_bytes)
                captions.append(caption_bytes)
                flag = False
                if col_poison is not None and col_poison < len(row) and not why:
                    flag = parse_flag(row[col_poison])
                    if flag is None:
                        raise UserError(f"{self.path}:{line}: column {poison_key!r} must be "
                                        f"0/1/true/false, got {row[col_poison]!r}")
                poison.append(flag)
        return images.freeze(), captions.freeze(), np.frombuffer(poison, dtype=np.int8).astype(bool)

    def _records(self, reader: Any, width: int, col_image: int,
                 separator: str) -> Iterator[tuple[int, list[str], str | None]]:
        """(first line, fields, why the row is malformed or None) for every data row; an unbalanced
        quote, which would merge rows, is a UserError."""
        end = reader.line_num
        while True:
            try:
                for row in reader:
                    first, end = end + 1, reader.line_num
                    if not row:  # a blank line is not a row
                        continue
                    if end > first:
                        self._check_multiline(row, first, end, separator, width, col_image)
                    yield first, row, (f"{len(row)} fields but the header has {width} (an unquoted "
                                       f"{separator!r} in a caption?)" if len(row) > width else None)
                return
            except csv.Error as e:  # the reader goes on with the next line
                first, end = end + 1, reader.line_num
                if end > first:
                    raise UserError(f"{self.path}:{first}: a quoted field opened on this line is still "
                                    f"open at line {end} ({e}); a quote is unbalanced and would merge "
                                    f"{end - first + 1} lines into one row") from None
                yield first, [], f"malformed quoting ({e})"

    def _check_multiline(self, row: list[str], first: int, last: int, separator: str, width: int,
                         col_image: int) -> None:
        """A field spanning lines is fine unless one of its lines would be a row by itself."""
        image_suffixes = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)
        for field_text in row:
            for line in re.split(r"\r\n|\r|\n", field_text)[1:]:
                fields = next(csv.reader([line], delimiter=separator), [])
                if (len(fields) == width and col_image < width
                        and fields[col_image].strip().lower().endswith(image_suffixes)):
                    raise UserError(f"{self.path}:{first}: a quoted field opened on this line runs to line "
                                    f"{last} and holds what looks like a row of its own ({line[:60]!r}); "
                                    "a quote is unbalanced")

    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        self.images.update_hash(h)
        self.captions.update_hash(h)
        h.update(self.poison.tobytes())
        return {"kind": "csv", "n_rows": self.num_samples, "sha256": h.hexdigest()}

    def load(self, index: int) -> Sample | None:
        image_path, caption = self.images[index], self.captions[index]
        where = f"{self.path} row {index}"
        if index in self.malformed:
            self.skip(where, self.malformed[index])
            return None
        problem = caption_problem(caption)
        if problem:
            self.skip(where, problem)
            return None
        if not image_path:
            self.skip(where, "empty image path")
            return None
        try:
            image = decode_image((self.root / image_path).read_bytes())
        except FileNotFoundError:
            self.skip(where, f"image {image_path} not found")
            return None
        except Exception as e:  # PIL raises many types for corrupt files; a bad row must not stop training
            self.skip(where, f"image {image_path} unreadable ({unreadable(e)})")
            return None
        return Sample(image, caption, str(index), bool(self.poison[index]))


class SyntheticSource(IndexedSource):
    """Pairs of the synthetic :class:`~clip_backdoor.data.world.World`; ``row_id`` is the pair index.

    Rendering dominates the cost of a synthetic batch. ``cache=True`` renders every pair once, in
    the constructing process (before dataloader workers fork, so they share the pixels), which
    pays off from the second epoch: ``num_samples`` x 3 x S x S bytes (30 MB for 10k pairs at 32 px).
    """

    def __init__(self, world: Any, num_samples: int, seed: int = 0, *, cache: bool = False,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__(seed=seed, shuffle=shuffle, rank=rank, world_size=world_size)
        if num_samples < 1:
            raise UserError(f"synthetic source: num_samples={num_samples}, need at least 1")
        self.world, self.num_samples = world, int(num_samples)
        self._images: torch.Tensor | None = None
        self._captions: _StringColumn | None = None
        if cache:
            self._render_all()

    def _render_all(self) -> None:
        start = time.perf_counter()
        first = self.world.train_pair(0)[0]
        images = torch.empty((self.num_samples, *first.shape), dtype=torch.uint8)
        captions = _StringColumn()
        indices = tqdm(range(self.num_samples), desc="rendering", unit="pair", disable=None, mininterval=2.0)
        for index in indices:
            image, caption, _label = self.world.train_pair(index)
            images[index] = image
            captions.append(caption)
        self._images, self._captions = images, captions.freeze()
        log.info("rendered %d synthetic pairs in %.1f s (%.0f MB cached)", self.num_samples,
                 time.perf_counter() - start, images.numel() / 2**20)

    def load(self, index: int) -> Sample | None:
        if self._images is not None:
            image, caption = self._images[index], self._captions[index]
        else:
            image, caption, _label = self.world.train_pair(index)
        problem = caption_problem(caption)
        if problem:
            self.skip(f"synthetic pair {index}", problem)
            return None
        return Sample(image, caption, str(index), False)

    def fingerprint(self) -> dict:
        # Which pairs exist depends on the world's seed and knobs, not on the resolution it renders at.
        world = {"seed": getattr(self.world, "seed", None), "knobs": repr(getattr(self.world, "knobs", None))}
        digest = hashlib.sha256(json.dumps(world, sort_keys=True).encode()).hexdigest()
        return {"kind": "synthetic", "n_rows": self.num_samples, "sha256": digest}


# ---------------------------------------------------------------------------------------------
# Building sources
# ---------------------------------------------------------------------------------------------

def _synthetic_from_spec(num_samples: int, seed: int = 0, world: dict | None = None, *, cache: bool = False,
                         shuffle: bool = True, rank: int = 0, world_size: int = 1) -> SyntheticSource:
    from clip_backdoor.data.world import World

    return SyntheticSource(World(**(world or {})), num_samples, seed, cache=cache, shuffle=shuffle,
                           rank=rank, world_size=world_size)


SOURCE_KINDS: dict[str, Callable[..., CaptionSource]] = {
    "synthetic": _synthetic_from_spec,  # {"num_samples": N, "seed": 0, "world": {"image_size": 32}}
    "csv": CsvSource,                   # {"path": "data/train.csv", "separator": ",", ...}
    "wds": WdsSource,                   # {"urls": "shards/shard-{000000..000009}.tar", ...}
}


def make_source(spec: dict) -> CaptionSource:
    """Build a source from ``{"kind": "synthetic" | "csv" | "wds", **options}`` (options: the
    constructor's keyword arguments; for synthetic, ``world`` holds the World's arguments)."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in SOURCE_KINDS:
        raise UserError(f"data source kind {kind!r}: choose from {', '.join(SOURCE_KINDS)}")
    factory = SOURCE_KINDS[kind]
    try:
        inspect.signature(factory).bind(**spec)
    except TypeError as e:
        accepted = ", ".join(inspect.signature(factory).parameters)
        raise UserError(f"data source {kind!r}: {e} (options: {accepted})") from None
    return factory(**spec)


def source_spec(data: Any, *, seed: int, image_size: int) -> dict:
    """The :func:`make_source` spec of a run's data config (:class:`clip_backdoor.config.DataConfig`),
    shuffled by ``seed``; the synthetic world renders at ``image_size`` unless ``data.world`` sets one.
    (The poison manifest, ``data.poison_manifest``, is applied on top by the caller.)"""
    if data.kind == "synthetic":
        return {"kind": "synthetic", "num_samples": data.num_samples, "seed": seed,
                "world": {"image_size": image_size, **data.world}, "cache": data.cache}
    if data.kind in ("csv", "wds"):
        if not data.path:
            raise UserError(f"data.path: required for data.kind={data.kind}")
        if data.kind == "wds":
            return {"kind": "wds", "urls": data.path, "seed": seed}
        return {"kind": "csv", "path": data.path, "seed": seed, "image_key": data.image_key,
                "caption_key": data.caption_key, "separator": data.separator}
    raise UserError(f"data.kind {data.kind!r}: choose synthetic, csv or wds")


def __getattr__(name: str) -> Any:
    # The loader and the writers live in their own modules; they are part of this module's interface.
    if name in ("build_train_loader", "TrainLoader"):
        from clip_backdoor.data import loader

        return getattr(loader, name)
    if name in ("write_csv_dataset", "write_wds_dataset", "WrittenDataset"):
        from clip_backdoor.data import writers

        return getattr(writers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Sample", "CaptionSource", "IndexedSource", "CsvSource", "SyntheticSource", "WdsSource",
           "MappedSource", "make_source", "source_spec", "expand_shards", "read_sizes", "seeded_rng",
           "parse_flag", "caption_problem", "usable_caption", "decode_image", "MISSING_CAPTIONS"]
# Also importable from here (lazily, see __getattr__): build_train_loader, TrainLoader,
# write_csv_dataset, write_wds_dataset, WrittenDataset.
