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
import functools
import glob
import hashlib
import inspect
import io
import itertools
import json
import logging
import os
import re
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import get_worker_info
from tqdm import tqdm

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
# WebDataset shards
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Wrapping and building sources
# ---------------------------------------------------------------------------------------------

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
           "parse_flag", "caption_problem", "usable_caption", "MISSING_CAPTIONS"]
# Also importable from here (lazily, see __getattr__): build_train_loader, TrainLoader,
# write_csv_dataset, write_wds_dataset, WrittenDataset.
