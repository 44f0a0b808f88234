"""Write image–caption samples as a dataset the sources read back: a CSV of PNGs or WebDataset shards.

Images are stored as lossless PNG whatever they came from, so a trigger's pixels survive exactly
(the reference code re-encoded poisoned images as JPEG, blurring its noise patch). A dataset is
built in a temporary folder and renamed into place when complete; an existing non-empty folder is
only replaced with ``overwrite=True``.

Files are named after the sample's ``row_id`` (characters other than letters, digits, ``_`` and
``-`` become ``_``; a name already used gets ``~<position>`` appended), so a row can be traced from
a manifest to its file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from clip_backdoor.data.samples import Sample
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import atomic_dir, temp_dir_sibling, write_json

log = logging.getLogger(__name__)

CSV_NAME = "train.csv"
SHARD_PATTERN = "shard-{:06d}.tar"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class WrittenDataset(NamedTuple):
    path: Path          # the dataset folder
    entry: str          # what a source reads: the CSV file, or the shards' brace pattern
    num_samples: int
    num_poison: int


def as_sample(item: Any, position: int) -> Sample:
    """A Sample, or a tuple ``(image, caption[, row_id: str[, is_poison]])``; without a row id the
    position in the stream is used. A non-string row id is refused: ``World.train_pair`` returns
    (image, caption, label), and a label must not silently become a row id."""
    if isinstance(item, Sample):
        return item
    if isinstance(item, tuple) and 2 <= len(item) <= 4:
        image, caption, *rest = item
        if rest and not isinstance(rest[0], str):
            raise TypeError(f"sample {position}: row id must be a str, got {type(rest[0]).__name__} "
                            "(a class label from World.train_pair?)")
        row_id = rest[0] if rest else str(position)
        return Sample(image, caption, row_id, bool(rest[1]) if len(rest) > 1 else False)
    raise TypeError(f"sample {position}: expected a Sample or an (image, caption[, row_id[, is_poison]]) "
                    f"tuple, got {type(item).__name__}")


def png_bytes(image: Image.Image | torch.Tensor) -> bytes:
    """A PIL image or uint8 ``[3,H,W]`` tensor as RGB PNG bytes (lossless)."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 [3,H,W] tensor, got {image.dtype} {tuple(image.shape)}")
        image = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()), "RGB")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class _Names:
    """File-name stems from row ids: safe characters only, never the same twice."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, row_id: str, position: int) -> str:
        stem = _UNSAFE.sub("_", row_id)
        if not stem or stem in self.used:
            stem = f"{stem}~{position}"  # '~' never survives sanitising, so this cannot collide
        self.used.add(stem)
        return stem


def _prepare(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir}: already exists and is not empty; choose a new directory or overwrite")


def _write_atomically(out_dir: str | os.PathLike, overwrite: bool, fill: Callable[[Path], Any]) -> Any:
    """Run ``fill(tmp_dir)`` and move the result to ``out_dir``; an old ``out_dir`` goes only after."""
    out_dir = Path(out_dir)
    _prepare(out_dir, overwrite)
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        with atomic_dir(out_dir) as tmp:
            return fill(tmp)
    staged = temp_dir_sibling(out_dir, "new")
    try:
        result = fill(staged)
        old = temp_dir_sibling(out_dir, "old")
        os.replace(out_dir, old / out_dir.name)
        os.replace(staged, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return result
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _progress(samples: Iterable[Any], total: int | None, what: str) -> Iterator[Any]:
    # disable=None: a bar on a terminal, silence in logs and tests.
    return iter(tqdm(samples, total=total, desc=what, unit="img", disable=None, mininterval=2.0))


def write_csv_dataset(samples: Iterable[Sample | tuple], out_dir: str | os.PathLike, *,
                      total: int | None = None, overwrite: bool = False) -> WrittenDataset:
    """``out_dir/train.csv`` (columns image, caption, is_poison) + ``out_dir/images/<row>.png``."""

    def fill(tmp: Path) -> WrittenDataset:
        (tmp / "images").mkdir()
        names, n, n_poison = _Names(), 0, 0
        with open(tmp / CSV_NAME, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image", "caption", "is_poison"])
            for position, item in enumerate(_progress(samples, total, f"writing {Path(out_dir).name}")):
                sample = as_sample(item, position)
                relative = f"images/{names(sample.row_id, position)}.png"
                (tmp / relative).write_bytes(png_bytes(sample.image))
                writer.writerow([relative, sample.caption, int(sample.is_poison)])
                n, n_poison = n + 1, n_poison + bool(sample.is_poison)
        if n == 0:
            raise UserError(f"{out_dir}: no samples to write")
        log.info("wrote %d samples (%d poisoned) as CSV + PNG to %s", n, n_poison, out_dir)
        return WrittenDataset(Path(out_dir), str(Path(out_dir) / CSV_NAME), n, n_poison)

    return _write_atomically(out_dir, overwrite, fill)


def write_wds_dataset(samples: Iterable[Sample | tuple], out_dir: str | os.PathLike, *,
                      shard_size: int = 10_000, total: int | None = None,
                      overwrite: bool = False) -> WrittenDataset:
    """``out_dir/shard-000000.tar, ...`` (``<key>.png`` + ``<key>.txt`` + ``<key>.json`` with
    ``is_poison``) and ``out_dir/sizes.json`` (samples per shard, plus ``"total"``)."""
    from webdataset import TarWriter

    if shard_size < 1:
        raise UserError(f"shard_size={shard_size}: must be >= 1")

    def fill(tmp: Path) -> WrittenDataset:
        names, sizes, n_poison = _Names(), {}, 0
        writer, shard_name = None, None
        try:
            for position, item in enumerate(_progress(samples, total, f"writing {Path(out_dir).name}")):
                if position % shard_size == 0:
                    if writer is not None:
                        writer.close()
                    shard_name = SHARD_PATTERN.format(len(sizes))
                    # An int mtime keeps tarfile from adding a PAX header to every member (it does for a
                    # float one), which would double the reader's parsing work.
                    writer = TarWriter(str(tmp / shard_name), encoder=False, mtime=int(time.time()))
                    sizes[shard_name] = 0
                sample = as_sample(item, position)
                meta = json.dumps({"row_id": sample.row_id, "is_poison": bool(sample.is_poison)})
                writer.write({"__key__": names(sample.row_id, position), "png": png_bytes(sample.image),
                              "txt": sample.caption.encode("utf-8"), "json": meta.encode("utf-8")})
                sizes[shard_name] += 1
                n_poison += bool(sample.is_poison)
        finally:
            if writer is not None:
                writer.close()
        n = sum(sizes.values())
        if n == 0:
            raise UserError(f"{out_dir}: no samples to write")
        write_json(tmp / "sizes.json", {**sizes, "total": n})
        last = len(sizes) - 1
        log.info("wrote %d samples (%d poisoned) in %d shards to %s", n, n_poison, len(sizes), out_dir)
        name = f"shard-{{000000..{last:06d}}}.tar" if last else SHARD_PATTERN.format(0)
        pattern = str(Path(out_dir) / name)
        return WrittenDataset(Path(out_dir), pattern, n, n_poison)

    return _write_atomically(out_dir, overwrite, fill)


__all__ = ["write_csv_dataset", "write_wds_dataset", "WrittenDataset", "png_bytes", "as_sample"]
