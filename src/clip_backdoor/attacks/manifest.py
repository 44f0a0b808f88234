"""The poison manifest, and poisoning on the fly from it.

``manifest.csv`` lists every row of a poisoned dataset (or cleaning set), one line each:

==================  ===========================================================================
row_id              the row's id in the dataset written next to it (its position), or, for a
                    manifest-only dataset, the base source's row id
source_key          the row's id in the source it came from (CSV row index, WebDataset key,
                    synthetic pair index)
caption             the caption training sees
original_caption    the source's caption (equal to ``caption`` for clean and label-consistent rows)
is_poison           1 for a poisoned row, else 0 -- never inferred from a path
trigger             trigger name (empty for clean rows)
trigger_params      the trigger's parameters as JSON (empty for clean rows)
seed                the row's trigger seed: ``torch.Generator().manual_seed(seed)`` redraws it
==================  ===========================================================================

``poison.json`` beside it records how the rows were chosen and which base source they index, with
that source's fingerprint (``source_fingerprint``: kind, row count and a SHA-256 of what identifies
its rows; see ``CaptionSource.fingerprint``). :class:`PoisonedSource` wraps that base source and
triggers the manifest's poisons as they are read, so a manifest-only dataset copies no images; it
refuses a base source whose fingerprint differs (a manifest of 512 rows used with 64 would otherwise
find only the poisons whose row ids happen to exist). A manifest from before fingerprints is
accepted with one warning.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_backdoor.attacks.triggers import Trigger, get_trigger, trigger_image
from clip_backdoor.data.samples import MappedSource, Sample, current_part, seeded_rng
from clip_backdoor.errors import UserError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
INFO_NAME = "poison.json"
COLUMNS = ("row_id", "source_key", "caption", "original_caption", "is_poison", "trigger", "trigger_params",
           "seed")


@dataclass(frozen=True)
class ManifestRow:
    row_id: str
    source_key: str
    caption: str
    original_caption: str
    is_poison: bool
    trigger: str = ""
    trigger_params: str = ""  # JSON text, kept as written so it round-trips byte for byte
    seed: int | None = None

    def as_csv(self) -> list[str]:
        return [self.row_id, self.source_key, self.caption, self.original_caption, str(int(self.is_poison)),
                self.trigger, self.trigger_params, "" if self.seed is None else str(self.seed)]

    def make_trigger(self) -> Trigger:
        return get_trigger(self.trigger, **json.loads(self.trigger_params or "{}"))


class ManifestWriter:
    """Stream manifest rows to ``path`` (inside a directory that is renamed into place as a whole)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._csv = csv.writer(self._file, lineterminator="\n")
        self._csv.writerow(COLUMNS)
        self.n_rows = self.n_poison = self.n_triggered = 0

    def write(self, row: ManifestRow) -> None:
        self._csv.writerow(row.as_csv())
        self.n_rows += 1
        self.n_poison += row.is_poison
        self.n_triggered += row.is_poison and bool(row.trigger)  # poisoned here, not flagged by the source

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_manifest(path: str | os.PathLike) -> Iterator[ManifestRow]:
    """Rows of a manifest; a wrong header or malformed line is a ``UserError`` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: manifest not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise UserError(f"{path}: not a poison manifest (missing column(s) {', '.join(missing)})")
        col = {name: header.index(name) for name in COLUMNS}
        for fields in reader:
            if not fields:
                continue
            where = f"{path}:{reader.line_num}"
            if len(fields) < len(header):
                raise UserError(f"{where}: {len(fields)} fields, expected {len(header)}")
            flag = fields[col["is_poison"]]
            if flag not in ("0", "1"):
                raise UserError(f"{where}: is_poison must be 0 or 1, got {flag!r}")
            seed_text = fields[col["seed"]]
            try:
                seed = int(seed_text) if seed_text else None
            except ValueError:
                raise UserError(f"{where}: seed {seed_text!r} is not an integer") from None
            yield ManifestRow(fields[col["row_id"]], fields[col["source_key"]], fields[col["caption"]],
                              fields[col["original_caption"]], flag == "1", fields[col["trigger"]],
                              fields[col["trigger_params"]], seed)


_WARNED_UNCHECKED: set[str] = set()


def check_source(manifest_path: str | os.PathLike, source: Any, info: dict | None = None) -> None:
    """Refuse ``source`` unless it is the one the manifest was made from (its recorded fingerprint)."""
    path = Path(manifest_path)
    info = read_info(path) if info is None else info
    recorded = info.get("source_fingerprint")
    if not isinstance(recorded, dict):
        if str(path) not in _WARNED_UNCHECKED:
            _WARNED_UNCHECKED.add(str(path))
            log.warning("%s: made by an older version, without a source fingerprint; cannot check that "
                        "this source is the one it was made from", path)
        return
    actual = source.fingerprint()
    kind, rows = recorded.get("kind"), recorded.get("n_rows")
    if kind != actual["kind"]:
        raise UserError(f"{path}: made for a {kind} source, but the source is {actual['kind']}; is this the "
                        "source it was made from?")
    if rows != actual["n_rows"]:
        raise UserError(f"{path}: made for a source of {rows} rows, but this {kind} source has "
                        f"{actual['n_rows']}; is this the source it was made from?")
    if recorded.get("sha256") and actual["sha256"] and recorded["sha256"] != actual["sha256"]:
        what = {"csv": "image paths, captions or is_poison flags", "wds": "shard names or sizes",
                "synthetic": "world seed or knobs"}.get(kind, "rows")
        raise UserError(f"{path}: made for another {kind} source of {rows} rows (their {what} differ); is "
                        "this the source it was made from?")


def read_info(manifest_path: str | os.PathLike) -> dict:
    """The ``poison.json`` beside a manifest ({} when absent)."""
    info_path = Path(manifest_path).parent / INFO_NAME
    if not info_path.is_file():
        return {}
    try:
        return json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{info_path}: not valid JSON ({e})") from None


class TriggerManifestPoisons:
    """``Sample -> Sample``: a manifest poison is squashed, triggered with its own seed, quantised and
    re-captioned; any other row passes through. Picklable, so dataloader workers can run it."""

    def __init__(self, poisons: dict[str, ManifestRow], image_size: int, where: str):
        self.poisons, self.image_size, self.where = poisons, int(image_size), where
        self._triggers: dict[tuple[str, str], Trigger] = {}
        for row in poisons.values():  # fail now, not in a dataloader worker
            self._trigger(row).check_image_size(self.image_size, self.image_size)

    def _trigger(self, row: ManifestRow) -> Trigger:
        key = (row.trigger, row.trigger_params)
        if key not in self._triggers:
            self._triggers[key] = row.make_trigger()
        return self._triggers[key]

    def __call__(self, sample: Sample) -> Sample:
        row = self.poisons.get(sample.row_id)
        if row is None:
            return sample
        if sample.caption != row.original_caption:
            raise UserError(f"{self.where}: row {sample.row_id!r} has caption {sample.caption!r} but the "
                            f"manifest expects {row.original_caption!r}; is this the source it was made "
                            "from?")
        generator = torch.Generator().manual_seed(row.seed)
        image = trigger_image(sample.image, self._trigger(row), self.image_size, generator)
        return Sample(image, row.caption, sample.row_id, True)


class PoisonedSource(MappedSource):
    """A caption source with the poisons of a manifest-only dataset applied as rows are read.

    Rows the manifest marks as poisons (keyed by ``source_key``) are triggered with their recorded
    trigger and seed at ``image_size`` and get the manifest's caption; every other row passes
    through unchanged. A manifest whose ``poison.json`` says ``"subset": true`` (a cleaning set)
    also restricts the source to the rows it lists; that needs a random-access base (CSV, synthetic).
    """

    def __init__(self, base: Any, manifest: str | os.PathLike, image_size: int):
        self.manifest_path = Path(manifest)
        info = read_info(self.manifest_path)
        check_source(self.manifest_path, base, info)
        recorded = info.get("image_size")
        if recorded is not None and int(recorded) != int(image_size):
            log.warning("%s: poisons recorded at %s px are triggered at %d px", self.manifest_path, recorded,
                        image_size)
        subset = bool(info.get("subset"))
        poisons, listed = {}, []  # listed: every row's key, kept only for a subset (a cleaning set)
        for row in read_manifest(self.manifest_path):
            if subset:
                listed.append(row.source_key)
            if row.is_poison and row.trigger:  # rows flagged poisoned by the source itself carry no trigger
                if row.seed is None:
                    raise UserError(f"{self.manifest_path}: poison row {row.row_id!r} has no seed")
                poisons[row.source_key] = row
        super().__init__(base, TriggerManifestPoisons(poisons, image_size, str(self.manifest_path)))
        self._subset = None
        if subset:
            self._subset = self._subset_indices(base, listed)
            self.num_samples = len(self._subset)
            if self.num_samples == 0:
                raise UserError(f"{self.manifest_path}: a cleaning set that lists no rows")
        log.info("%s: %d poisons over %d rows", self.manifest_path, len(poisons), self.num_samples)

    def _subset_indices(self, base: Any, keys: list[str]) -> np.ndarray:
        if not getattr(base, "random_access", False):
            raise UserError(f"{self.manifest_path}: a subset manifest (cleaning set) needs a CSV or "
                            "synthetic source; write WebDataset cleaning sets with --format wds")
        try:
            indices = np.array(sorted(int(k) for k in keys), dtype=np.int64)
        except ValueError:
            raise UserError(f"{self.manifest_path}: source keys must be row indices for a subset") from None
        if len(indices) and (indices[0] < 0 or indices[-1] >= base.num_samples):
            raise UserError(f"{self.manifest_path}: lists row {int(indices[-1])} but the source has "
                            f"{base.num_samples} rows; is this the source it was made from?")
        return indices

    def order(self, keys: Any) -> np.ndarray:
        if self._subset is None:
            return self.inner.order(keys)
        if not self.inner.shuffle:
            return self._subset
        return self._subset[seeded_rng(*keys).permutation(len(self._subset))]

    def __iter__(self) -> Iterator[Sample]:
        if self._subset is None:
            return super().__iter__()
        return self._iter_subset()

    def _iter_subset(self) -> Iterator[Sample]:
        part, num_parts = current_part(self.inner.rank, self.inner.world_size)
        for index in self.order((self.inner.seed, self.inner.epoch))[part::num_parts]:
            sample = self.load(int(index))
            if sample is not None:
                yield sample
