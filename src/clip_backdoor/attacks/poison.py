"""Poison a caption dataset, draw cleaning sets, and preview the triggers (``clip-backdoor poison``).

1. **Select** rows in one pass over the source (O(N) reads, O(log n) per heap update, O(n) memory):
   every row gets a priority ``hash(poison seed, row id)`` and the n smallest win (a bottom-n heap),
   so the choice depends on the seed and the row ids only, not on the order the source is read in.
   Dirty-label mode draws from all usable rows; label-consistent mode only from rows whose caption
   names the target (word match, any case, optional plural ``s``/``es``, plus given synonyms).
2. **Poison** a chosen row: squash its image to the model resolution, apply the trigger with the
   row's own seed ``hash(poison seed, row id)``, quantise to 8 bits; dirty-label rows get a caption
   from one of the 80 ImageNet templates filled with the target, label-consistent rows keep theirs.
3. **Write** a new dataset -- CSV + PNG (clean images of a CSV source are copied byte for byte),
   WebDataset shards, or only ``manifest.csv`` (poisons triggered on the fly by
   :class:`~clip_backdoor.attacks.manifest.PoisonedSource`) -- built in a temporary folder and
   renamed into place when complete, with ``manifest.csv`` and ``poison.json`` beside it.

A cleaning set (``--cleaning-set``) is a clean subset of the pre-training data (the last rows, or
a seeded random choice), excluding the rows a poisoning manifest marks as poisons, optionally with
k poisons injected in the same way.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import hashlib
import heapq
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from clip_backdoor.attacks.manifest import (
    INFO_NAME,
    MANIFEST_NAME,
    ManifestRow,
    ManifestWriter,
    check_source,
    read_manifest,
)
from clip_backdoor.attacks.triggers import (
    TRIGGERS,
    Trigger,
    apply_trigger_uint8,
    get_trigger,
    list_triggers,
    parse_trigger_params,
    trigger_image,
)
from clip_backdoor.data.captions import CaptionSource, CsvSource, Sample, make_source, usable_caption
from clip_backdoor.data.transforms import squash
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import atomic_dir, atomic_path, write_json

log = logging.getLogger(__name__)

MODES = ("dirty", "label-consistent")
FORMATS = ("csv", "wds", "manifest")
PICKS = ("tail", "random")
CSV_NAME = "train.csv"  # the same layout as clip_backdoor.data.writers.write_csv_dataset


# --------------------------------------------------------------------------------------------
# Seeds, targets, captions
# --------------------------------------------------------------------------------------------

def derive_seed(poison_seed: int, purpose: str, row_key: str) -> int:
    """A 63-bit seed that is a pure function of (poison seed, purpose, row id), in any process."""
    digest = hashlib.blake2b(f"{int(poison_seed)}\x1f{purpose}\x1f{row_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def imagenet_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates (package data), each with one ``{}``."""
    text = resources.files("clip_backdoor.data").joinpath("assets/imagenet_templates.json").read_text("utf-8")
    return list(json.loads(text))


def check_target(target: Any) -> str:
    """The target name, stripped; one that cannot go into a caption template is a ``UserError``."""
    name = target.strip() if isinstance(target, str) else ""
    if not name:
        raise UserError("target name is empty: name the class the poisons point to, e.g. --target banana")
    if "{" in name or "}" in name:
        raise UserError(f"target {target!r}: braces cannot be filled into a caption template")
    if not all(c.isprintable() for c in name):
        raise UserError(f"target {target!r}: contains control characters (newline, tab, ...)")
    return name


def dirty_caption(target: str, row_seed: int, templates: Sequence[str]) -> str:
    """One of the templates, chosen by the row's seed, filled with the target: 'a photo of a banana.'"""
    return random.Random(row_seed).choice(templates).format(target)


def mention_pattern(names: Iterable[str]) -> re.Pattern:
    """Matches any of ``names`` as whole words, any case, optionally plural (banana, Bananas)."""
    names = sorted({n.strip() for n in names if n and n.strip()}, key=len, reverse=True)
    alternatives = "|".join(r"\s+".join(map(re.escape, n.split())) for n in names)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?:e?s)?(?!\w)", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# One pass over a source
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    key: str          # the source's row id
    caption: str
    flagged: bool     # marked as poisoned by the source itself
    position: int     # place in the source's file order


def _progress(items: Iterable[Any], total: int | None, what: str) -> Iterator[Any]:
    return iter(tqdm(items, total=total, desc=what, unit="row", disable=None, mininterval=2.0))


def _check_unshuffled(source: CaptionSource) -> None:
    if getattr(source, "shuffle", False):
        raise ValueError("poisoning reads a source in file order: build it with shuffle=False")


def scan_rows(source: CaptionSource) -> Iterator[Row]:
    """Every usable row in file order. A CSV is read from its columns alone (no image decoding);
    its images are checked later, only for the rows that get chosen."""
    _check_unshuffled(source)
    if isinstance(source, CsvSource):
        for index in _progress(range(source.num_samples), source.num_samples, "scanning"):
            caption = source.captions[index]
            if usable_caption(caption) and source.images[index]:
                yield Row(str(index), caption, bool(source.poison[index]), index)
        return
    for position, sample in enumerate(_progress(source, source.num_samples, "scanning")):
        yield Row(sample.row_id, sample.caption, bool(sample.is_poison), position)


class RowSpool:
    """Scanned rows kept in a temporary file, so a manifest is written without a second read of the
    source (which, for shards or the synthetic world, means decoding or rendering every image again)."""

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="clip-backdoor-scan-", suffix=".csv")
        self.path = Path(name)
        self._file = os.fdopen(fd, "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file, lineterminator="\n")

    def append(self, row: Row) -> None:
        self._csv.writerow([row.key, row.caption, int(row.flagged), row.position])

    def replay(self) -> Iterator[Row]:
        self._file.close()
        with open(self.path, newline="", encoding="utf-8") as f:
            for key, caption, flagged, position in csv.reader(f):
                yield Row(key, caption, flagged == "1", int(position))

    def __enter__(self) -> RowSpool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _loads(source: CaptionSource) -> Callable[[Row], bool] | None:
    """How to check that a scanned row's image is readable (None: the scan already read it)."""
    if isinstance(source, CsvSource):
        return lambda row: source.load(int(row.key)) is not None
    return None


class BottomK:
    """The k items of smallest priority offered so far: a max-heap of size k, O(log k) per offer."""

    def __init__(self, k: int):
        self.k, self._heap = k, []

    def offer(self, priority: int, item: Row) -> None:
        if self.k <= 0:
            return
        entry = (-priority, -item.position, item)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        elif entry > self._heap[0]:
            heapq.heapreplace(self._heap, entry)

    def smallest_first(self) -> list[Row]:
        return [item for _, _, item in sorted(self._heap, reverse=True)]


def _spare(count: int) -> int:
    """Extra candidates kept when images are only checked after the scan (missing files happen)."""
    return max(8, count // 4)


def _first_usable(candidates: list[Row], count: int, usable: Callable[[Row], bool] | None) -> list[Row]:
    if usable is None:
        return candidates[:count]
    chosen = []
    for row in candidates:
        if len(chosen) == count:
            break
        if usable(row):
            chosen.append(row)
    return chosen


# --------------------------------------------------------------------------------------------
# What to write: the rows and their poisons
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Attack:
    """The trigger, the target and how a poisoned row is made."""

    trigger: Trigger
    target: str
    mode: str = "dirty"
    poison_seed: int = 0
    synonyms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", check_target(self.target))
        if self.mode not in MODES:
            raise UserError(f"mode {self.mode!r}: choose from {', '.join(MODES)}")

    def poison_row(self, row: Row, templates: Sequence[str]) -> ManifestRow:
        """The manifest entry of a poisoned row (``row_id`` is filled in when it is written)."""
        key = row.key
        caption = row.caption
        if self.mode == "dirty":
            caption = dirty_caption(self.target, derive_seed(self.poison_seed, "caption", key), templates)
        return ManifestRow(row_id=key, source_key=key, caption=caption, original_caption=row.caption,
                           is_poison=True, trigger=self.trigger.name,
                           trigger_params=json.dumps(self.trigger.params, sort_keys=True),
                           seed=derive_seed(self.poison_seed, "trigger", key))

    def describe(self) -> dict:
        return {"target": self.target, "mode": self.mode, "trigger": self.trigger.name,
                "trigger_params": self.trigger.params, "poison_seed": self.poison_seed,
                "synonyms": list(self.synonyms)}


@dataclass
class Plan:
    """Which source rows go into the output (None: all) and which of them are poisoned."""

    poisons: dict[str, ManifestRow]
    included: set[str] | None = None
    n_candidates: int = 0  # rows the poisons were drawn from


def _select_poisons(rows: Iterable[Row], count: int | None, fraction: float | None, attack: Attack,
                    num_samples: int, allow_fewer: bool, usable: Callable[[Row], bool] | None,
                    on_row: Callable[[Row], None] | None = None) -> tuple[list[Row], int]:
    if count is None:
        count = round(fraction * num_samples)
    label_consistent = attack.mode == "label-consistent"
    pattern = mention_pattern((attack.target, *attack.synonyms)) if label_consistent else None
    heap = BottomK(count + (_spare(count) if usable and count else 0))
    n_candidates = 0
    for row in rows:
        if on_row is not None:
            on_row(row)
        if row.flagged or (pattern is not None and not pattern.search(row.caption)):
            continue
        n_candidates += 1
        heap.offer(derive_seed(attack.poison_seed, "select", row.key), row)
    chosen = _first_usable(heap.smallest_first(), count, usable)
    if len(chosen) < count:
        unreadable = n_candidates >= count
        readable = f" ({n_candidates} listed, but some images are unreadable)" if unreadable else ""
        if label_consistent:
            if not allow_fewer:
                raise UserError(f"label-consistent: only {len(chosen)} rows name {attack.target!r}"
                                f"{readable}, {count} requested; pass --allow-fewer to poison those, "
                                "or add --synonym")
            log.warning("label-consistent: only %d rows name %r; poisoning those", len(chosen), attack.target)
        else:
            raise UserError(f"{count} poisons requested but the source has only {len(chosen)} usable clean "
                            f"rows{readable}")
    return chosen, n_candidates


def plan_poisons(source: CaptionSource, attack: Attack, *, n: int | None = None,
                 fraction: float | None = None, allow_fewer: bool = False,
                 on_row: Callable[[Row], None] | None = None) -> Plan:
    """Choose the rows to poison (n of them, or ``round(fraction * num_samples)``)."""
    _check_count(n, fraction, source.num_samples)
    chosen, n_candidates = _select_poisons(scan_rows(source), n, fraction, attack, source.num_samples,
                                           allow_fewer, _loads(source), on_row)
    templates = imagenet_templates()
    return Plan({row.key: attack.poison_row(row, templates) for row in chosen}, None, n_candidates)


def _check_count(n: int | None, fraction: float | None, num_samples: int) -> None:
    if (n is None) == (fraction is None):
        raise UserError("give the number of poisons as exactly one of --n or --fraction")
    if n is not None and n < 0:
        raise UserError(f"--n {n}: must be >= 0")
    if n is not None and n > num_samples:
        raise UserError(f"--n {n} is larger than the dataset ({num_samples} rows)")
    if fraction is not None and not 0 <= fraction <= 1:
        raise UserError(f"--fraction {fraction}: must lie in [0, 1]")


def excluded_keys(manifest_path: str | os.PathLike) -> set[str]:
    """Source keys of the rows a poisoning manifest marks as poisons."""
    return {row.source_key for row in read_manifest(manifest_path) if row.is_poison}


def plan_cleaning_set(source: CaptionSource, size: int, *, pick: str = "tail",
                      exclude: set[str] = frozenset(), seed: int = 0, attack: Attack | None = None,
                      k: int = 0, allow_fewer: bool = False) -> Plan:
    """``size`` clean rows (the last ones, or a seeded random choice), never a source-flagged row or
    one in ``exclude``; then ``k`` of them poisoned by ``attack``."""
    if pick not in PICKS:
        raise UserError(f"--pick {pick!r}: choose from {', '.join(PICKS)}")
    if size < 1 or size > source.num_samples:
        raise UserError(f"cleaning set --size {size}: must lie in [1, {source.num_samples}] "
                        "(rows in the source)")
    if not 0 <= k <= size:
        raise UserError(f"--k {k}: must lie in [0, --size {size}]")
    if k and attack is None:
        raise UserError("--k > 0 injects poisons: give --target and --trigger")
    usable = _loads(source)
    keep = size + (_spare(size) if usable else 0)
    tail: collections.deque[Row] = collections.deque(maxlen=keep)
    heap = BottomK(keep)
    n_eligible = 0
    for row in scan_rows(source):
        if row.flagged or row.key in exclude:
            continue
        n_eligible += 1
        if pick == "tail":
            tail.append(row)
        else:
            heap.offer(derive_seed(seed, "cleaning", row.key), row)
    candidates = list(reversed(tail)) if pick == "tail" else heap.smallest_first()
    chosen = _first_usable(candidates, size, usable)
    if len(chosen) < size:
        raise UserError(f"cleaning set of {size} requested but the source has only {len(chosen)} "
                        "usable clean rows outside the poisons")
    chosen.sort(key=lambda row: row.position)
    poisons: dict[str, ManifestRow] = {}
    if k:
        injected, _ = _select_poisons(chosen, k, None, attack, size, allow_fewer, None)
        templates = imagenet_templates()
        poisons = {row.key: attack.poison_row(row, templates) for row in injected}
    return Plan(poisons, {row.key for row in chosen}, n_eligible)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def _poisoned_image(image: Any, row: ManifestRow, image_size: int, triggers: dict) -> torch.Tensor:
    key = (row.trigger, row.trigger_params)
    if key not in triggers:
        triggers[key] = row.make_trigger()
    return trigger_image(image, triggers[key], image_size, torch.Generator().manual_seed(row.seed))


def _included_samples(source: CaptionSource, included: set[str] | None) -> Iterator[Sample]:
    """The source's samples in file order, only the ``included`` row ids (random access: only those read)."""
    if included is not None and source.random_access:
        for index in sorted(int(key) for key in included):
            sample = source.load(index)
            if sample is not None:
                yield sample
        return
    for sample in source:
        if included is None or sample.row_id in included:
            yield sample


def _manifest_entry(row_id: str, sample_key: str, caption: str, flagged: bool) -> ManifestRow:
    return ManifestRow(row_id, sample_key, caption, caption, flagged)


def _samples_to_write(source: CaptionSource, plan: Plan, image_size: int,
                      manifest: ManifestWriter) -> Iterator[Sample]:
    """Output samples (row id = position in the new dataset), writing their manifest rows."""
    triggers: dict = {}
    total = len(plan.included) if plan.included is not None else source.num_samples
    samples = _included_samples(source, plan.included)
    for position, sample in enumerate(_progress(samples, total, "writing")):
        row_id = str(position)
        poison = plan.poisons.get(sample.row_id)
        if poison is None:
            manifest.write(_manifest_entry(row_id, sample.row_id, sample.caption, sample.is_poison))
            yield Sample(sample.image, sample.caption, row_id, sample.is_poison)
        else:
            manifest.write(dataclasses.replace(poison, row_id=row_id))
            image = _poisoned_image(sample.image, poison, image_size, triggers)
            yield Sample(image, poison.caption, row_id, True)


def _write_csv_copy(source: CsvSource, tmp: Path, plan: Plan, image_size: int,
                    manifest: ManifestWriter) -> None:
    """CSV + images from a CSV source: clean images copied byte for byte, poisons as PNG."""
    from clip_backdoor.data.writers import png_bytes

    (tmp / "images").mkdir()
    indices = range(source.num_samples) if plan.included is None else sorted(int(k) for k in plan.included)
    triggers: dict = {}
    n_missing = 0
    with open(tmp / CSV_NAME, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["image", "caption", "is_poison"])
        position = 0
        for index in _progress(indices, len(indices), "writing"):
            key, caption, image_path = str(index), source.captions[index], source.images[index]
            if not (usable_caption(caption) and image_path):
                continue
            poison = plan.poisons.get(key)
            row_id = str(position)
            if poison is not None:
                sample = source.load(index)
                if sample is None:
                    raise UserError(f"{source.path} row {index}: chosen as a poison but its image is "
                                    "unreadable")
                relative = f"images/{row_id}.png"
                image = _poisoned_image(sample.image, poison, image_size, triggers)
                (tmp / relative).write_bytes(png_bytes(image))
                out.writerow([relative, poison.caption, 1])
                manifest.write(dataclasses.replace(poison, row_id=row_id))
            else:
                original = source.root / image_path
                if not original.is_file():
                    n_missing += 1  # the loader would skip this row too
                    continue
                relative = f"images/{row_id}{original.suffix.lower()}"
                shutil.copyfile(original, tmp / relative)
                flagged = bool(source.poison[index])
                out.writerow([relative, caption, int(flagged)])
                manifest.write(_manifest_entry(row_id, key, caption, flagged))
            position += 1
    if n_missing:
        log.warning("%s: %d rows left out (image file missing)", source.path, n_missing)


def _write_with_writer(fmt: str, source: CaptionSource, tmp: Path, plan: Plan, image_size: int,
                       manifest: ManifestWriter, shard_size: int) -> None:
    from clip_backdoor.data.writers import write_csv_dataset, write_wds_dataset

    staging = tmp / ".dataset"  # the writers build their own folder; its contents move up afterwards
    samples = _samples_to_write(source, plan, image_size, manifest)
    if fmt == "csv":
        write_csv_dataset(samples, staging)
    else:
        write_wds_dataset(samples, staging, shard_size=shard_size)
    for entry in staging.iterdir():
        os.replace(entry, tmp / entry.name)
    staging.rmdir()


def _included_rows(source: CaptionSource, included: set[str] | None) -> Iterator[Row]:
    """Rows for a manifest; with random access and a subset, only the subset's rows are read."""
    if included is None or not source.random_access:
        yield from scan_rows(source)
        return
    for index in sorted(int(key) for key in included):
        if isinstance(source, CsvSource):
            yield Row(str(index), source.captions[index], bool(source.poison[index]), index)
            continue
        sample = source.load(index)
        if sample is not None:
            yield Row(sample.row_id, sample.caption, bool(sample.is_poison), index)


def _write_manifest_only(rows: Iterable[Row], plan: Plan, manifest: ManifestWriter) -> None:
    for row in rows:
        if plan.included is not None and row.key not in plan.included:
            continue
        poison = plan.poisons.get(row.key)
        if poison is None:
            poison = _manifest_entry(row.key, row.key, row.caption, row.flagged)
        manifest.write(poison)


def _dataset_spec(fmt: str, out: Path, built: Path) -> dict | None:
    """The source spec that reads the dataset back from ``out`` once ``built`` is renamed to it
    (None for a manifest-only dataset)."""
    if fmt == "csv":
        return {"kind": "csv", "path": str(out / CSV_NAME)}
    if fmt == "wds":
        shards = sorted(p.name for p in built.glob("shard-*.tar"))
        last = len(shards) - 1
        name = shards[0] if last == 0 else f"shard-{{000000..{last:06d}}}.tar"
        return {"kind": "wds", "urls": str(out / name)}
    return None


def write_plan(source: CaptionSource, plan: Plan, out: str | os.PathLike, *, fmt: str = "csv",
               image_size: int = 224, info: dict | None = None, shard_size: int = 10_000,
               rows: Iterable[Row] | None = None) -> dict:
    """Write the planned dataset (or manifest) to ``out`` atomically; returns what ``poison.json`` holds.

    ``rows`` (manifest format only) replays the scan instead of reading the source again.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    out = Path(out).absolute()
    _check_out_dir(out)
    if out.is_dir():
        out.rmdir()
    with atomic_dir(out) as tmp:
        with ManifestWriter(tmp / MANIFEST_NAME) as manifest:
            if fmt == "manifest":
                rows = rows if rows is not None else _included_rows(source, plan.included)
                _write_manifest_only(rows, plan, manifest)
            elif fmt == "csv" and isinstance(source, CsvSource):
                _write_csv_copy(source, tmp, plan, image_size, manifest)
            else:
                _write_with_writer(fmt, source, tmp, plan, image_size, manifest, shard_size)
        if manifest.n_triggered != len(plan.poisons):
            raise UserError(f"{len(plan.poisons)} poisons planned but {manifest.n_triggered} written; "
                            "did the source change while it was read?")
        if manifest.n_rows == 0:
            raise UserError(f"{out}: no rows to write")
        summary = {**(info or {}), "format": fmt, "image_size": image_size,
                   "subset": plan.included is not None, "n_rows": manifest.n_rows,
                   "n_poison": len(plan.poisons), "n_candidates": plan.n_candidates,
                   "dataset": _dataset_spec(fmt, out, tmp), "source_fingerprint": source.fingerprint()}
        write_json(tmp / INFO_NAME, summary)
    return summary


def _check_out_dir(out: Path) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"{out}: already exists; choose a new output directory")


# --------------------------------------------------------------------------------------------
# Preview
# --------------------------------------------------------------------------------------------

def preview_triggers(images: Sequence[torch.Tensor], triggers: Sequence[Trigger], path: str | os.PathLike,
                     seed: int = 0, diff_for: Sequence[str] = ("wanet", "blended-stripes")) -> Path:
    """A PNG grid: clean images in the first row, then one row per trigger (same images, seeded).

    Triggers too subtle to see (``diff_for``) get an extra row of ``|triggered - clean| x 10``.
    """
    if not images:
        raise UserError("preview: the source yielded no images")
    size = int(images[0].shape[-1])
    scale = max(1, 96 // size)
    cell, pad, label_width = size * scale, 4, 150
    clean = torch.stack(list(images))
    rows = [("clean", clean)]
    for trigger in triggers:
        trigger.check_image_size(size, size)
        triggered = apply_trigger_uint8(clean, trigger, torch.Generator().manual_seed(seed))
        rows.append((_short_label(trigger), triggered))
        if trigger.name in diff_for:
            diff = ((triggered.float() - clean.float()).abs() * 10).clamp(0, 255).to(torch.uint8)
            rows.append((f"{trigger.name} |diff| x10", diff))
    width = label_width + len(images) * (cell + pad) + pad
    height = len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, (label, batch) in enumerate(rows):
        top = pad + r * (cell + pad)
        draw.text((pad, top + cell // 2 - 6), label, fill=(0, 0, 0), font=font)
        for c, image in enumerate(batch):
            tile = Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_width + pad + c * (cell + pad), top))
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", optimize=True)
    return path


def _short_label(trigger: Trigger) -> str:
    interesting = {"badnet": "mode", "patch": "pattern", "blended": "noise", "sig": "combine", "wanet": "k",
                   "badnet-stripes": "stripes", "blended-stripes": "alpha", "blended-triangles": "alpha",
                   "blended-text": "alpha"}
    key = interesting.get(trigger.name)
    return f"{trigger.name} ({key}={trigger.params[key]})" if key else trigger.name


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clip-backdoor poison", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="clip-backdoor poison optimize-patch --help: learn BadCLIP's patch")
    add_source_arguments(p)

    atk = p.add_argument_group("attack")
    atk.add_argument("--trigger", default="badnet", help=f"one of {', '.join(list_triggers())}")
    atk.add_argument("--trigger-param", action="append", default=[], metavar="KEY=VALUE",
                     help="trigger parameter (repeatable), e.g. size=4 location=corner")
    atk.add_argument("--target", default="banana", help="class name the poisoned captions point to")
    count = atk.add_mutually_exclusive_group()
    count.add_argument("--n", type=int, help="number of poisons")
    count.add_argument("--fraction", type=float, help="poisons as a fraction of the source's rows")
    atk.add_argument("--poison-seed", type=int, default=0)
    atk.add_argument("--mode", choices=MODES, default="dirty")
    atk.add_argument("--synonym", action="append", default=[],
                     help="label-consistent: another name of the target (repeatable)")
    atk.add_argument("--allow-fewer", action="store_true",
                     help="label-consistent: poison every matching row if fewer than requested")
    atk.add_argument("--image-size", type=int, default=None,
                     help="model resolution: poisons are squashed to it (default 224; the synthetic world "
                          "is rendered at it, default 32)")

    out = p.add_argument_group("output")
    out.add_argument("--out", help="new directory for the dataset, manifest.csv and poison.json")
    out.add_argument("--format", choices=FORMATS, default="csv",
                     help="csv: CSV + images; wds: WebDataset shards; "
                          "manifest: manifest only (poisons made on the fly)")
    out.add_argument("--shard-size", type=int, default=10_000)

    cs = p.add_argument_group("cleaning set (--cleaning-set)")
    cs.add_argument("--cleaning-set", action="store_true", help="draw a clean subset instead of poisoning")
    cs.add_argument("--size", type=int, help="rows in the cleaning set")
    cs.add_argument("--pick", choices=PICKS, default="tail")
    cs.add_argument("--k", type=int, default=0, help="poisons to inject into the cleaning set")
    cs.add_argument("--exclude-manifest",
                    help="manifest.csv of the pre-training poisoning: its poisons are left out")
    cs.add_argument("--cleaning-seed", type=int, default=0, help="--pick random: the draw's seed")

    pv = p.add_argument_group("other actions")
    pv.add_argument("--preview", metavar="OUT.png", help="write a grid of clean vs triggered images and exit")
    pv.add_argument("--preview-n", type=int, default=6, help="images in the preview")
    pv.add_argument("--list-triggers", action="store_true",
                    help="list triggers and their parameters, then exit")
    return p


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """The caption source flags (shared with ``poison optimize-patch``)."""
    src = p.add_argument_group("source (read in file order)")
    src.add_argument("--source-kind", choices=("synthetic", "csv", "wds"), default="synthetic")
    src.add_argument("--source", help="CSV file, or WebDataset shard pattern (brace expansion allowed)")
    src.add_argument("--num-samples", type=int, default=None,
                     help="synthetic: pairs in the world's training stream (default 10000); "
                          "wds: overrides sizes.json")
    src.add_argument("--world-seed", type=int, default=0, help="synthetic: the world's seed")
    src.add_argument("--image-key", default="image")
    src.add_argument("--caption-key", default="caption")
    src.add_argument("--separator", default=",")


def source_spec(args: argparse.Namespace) -> dict:
    """The source spec for make_source (file order, absolute paths) -- recorded in poison.json."""
    if args.source_kind == "synthetic":
        return {"kind": "synthetic", "num_samples": args.num_samples or 10_000,
                "world": {"seed": args.world_seed, "image_size": args.image_size}}
    if not args.source:
        raise UserError(f"--source-kind {args.source_kind} needs --source (a CSV file or shard pattern)")
    if args.source_kind == "csv":
        return {"kind": "csv", "path": str(Path(args.source).resolve()), "image_key": args.image_key,
                "caption_key": args.caption_key, "separator": args.separator}
    spec = {"kind": "wds", "urls": args.source if "::" in args.source else _absolute_pattern(args.source)}
    if args.num_samples is not None:
        spec["num_samples"] = args.num_samples
    return spec


def _absolute_pattern(pattern: str) -> str:
    return pattern if os.path.isabs(pattern) else os.path.join(os.getcwd(), pattern)


def open_source(spec: dict) -> CaptionSource:
    return make_source({**spec, "shuffle": False})


def _list_triggers() -> str:
    from clip_backdoor.attacks.triggers import trigger_defaults

    return "\n".join(f"{name:<17} " + " ".join(f"{k}={v}" for k, v in trigger_defaults(name).items())
                     for name in list_triggers())


def _preview(args: argparse.Namespace, trigger: Trigger) -> int:
    source = open_source(source_spec(args))
    images = []
    for sample in source:
        images.append(squash(sample.image, args.image_size))
        if len(images) == args.preview_n:
            break
    # Every trigger usable with its defaults (badclip needs a patch file: shown when it is --trigger).
    triggers = [trigger if name == trigger.name else get_trigger(name) for name in list_triggers()
                if name == trigger.name or not TRIGGERS[name].required]
    path = preview_triggers(images, triggers, args.preview, seed=args.poison_seed)
    log.info("wrote trigger preview (%d images x %d triggers) to %s", len(images), len(triggers), path)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["optimize-patch"]:  # BadCLIP's patch: its own module (it needs a surrogate model)
        from clip_backdoor.attacks.optimize_patch import main as optimize_patch_main

        return optimize_patch_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.list_triggers:
        print(_list_triggers())
        return 0
    if args.image_size is None:
        args.image_size = 32 if args.source_kind == "synthetic" else 224
    if args.image_size < 8:
        raise UserError(f"--image-size {args.image_size}: must be at least 8 pixels")
    trigger = get_trigger(args.trigger, **parse_trigger_params(args.trigger_param))
    trigger.check_image_size(args.image_size, args.image_size)
    if args.preview:
        return _preview(args, trigger)
    if not args.out:
        raise UserError("--out is required (a new directory)")
    _check_out_dir(Path(args.out))
    spec = source_spec(args)
    attack = Attack(trigger, args.target, args.mode, args.poison_seed, tuple(args.synonym))
    if args.cleaning_set:
        return _cleaning_set(args, spec, attack)
    return _poison(args, spec, attack)


def _poison(args: argparse.Namespace, spec: dict, attack: Attack) -> int:
    source = open_source(spec)
    _check_count(args.n, args.fraction, source.num_samples)
    spooling = args.format == "manifest" and not isinstance(source, CsvSource)
    with RowSpool() if spooling else contextlib.nullcontext() as spool:
        plan = plan_poisons(source, attack, n=args.n, fraction=args.fraction, allow_fewer=args.allow_fewer,
                            on_row=spool.append if spool is not None else None)
        info = {"kind": "poison", "base_source": spec, **attack.describe()}
        summary = write_plan(source, plan, args.out, fmt=args.format, image_size=args.image_size, info=info,
                             shard_size=args.shard_size, rows=spool.replay() if spool is not None else None)
    log.info("poisoned %d of %d rows (%s -> %r, %s) into %s [%s]", summary["n_poison"], summary["n_rows"],
             attack.trigger.name, attack.target, attack.mode, args.out, args.format)
    return 0


def _cleaning_set(args: argparse.Namespace, spec: dict, attack: Attack) -> int:
    if args.size is None:
        raise UserError("--cleaning-set needs --size (rows in the cleaning set)")
    if args.n is not None or args.fraction is not None:
        raise UserError("--cleaning-set takes --k (poisons to inject), not --n/--fraction")
    exclude = excluded_keys(args.exclude_manifest) if args.exclude_manifest else set()
    source = open_source(spec)
    if args.exclude_manifest:  # its poisons are row ids of the source it was made from
        check_source(args.exclude_manifest, source)
    if args.format == "manifest" and not source.random_access:
        raise UserError("a manifest-only cleaning set needs a CSV or synthetic source; use --format wds")
    plan = plan_cleaning_set(source, args.size, pick=args.pick, exclude=exclude, seed=args.cleaning_seed,
                             attack=attack if args.k else None, k=args.k, allow_fewer=args.allow_fewer)
    info = {"kind": "cleaning_set", "base_source": spec, "size": args.size, "pick": args.pick, "k": args.k,
            "cleaning_seed": args.cleaning_seed,
            "exclude_manifest": str(Path(args.exclude_manifest).resolve()) if args.exclude_manifest else None,
            "n_excluded": len(exclude), **(attack.describe() if args.k else {})}
    summary = write_plan(source, plan, args.out, fmt=args.format, image_size=args.image_size, info=info,
                         shard_size=args.shard_size)
    log.info("cleaning set: %d rows (%s, %d poisons injected, %d excluded) into %s [%s]", summary["n_rows"],
             args.pick, summary["n_poison"], len(exclude), args.out, args.format)
    return 0
