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

Step 1 lives in ``attacks/plan.py``, the caption side (seeds, templates, target mentions) in
``attacks/targets.py``, the source flags shared with ``poison optimize-patch`` in
``attacks/source_args.py``; this module writes and holds the command.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from clip_backdoor.attacks.manifest import (
    INFO_NAME,
    MANIFEST_NAME,
    ManifestRow,
    ManifestWriter,
    check_source,
)
from clip_backdoor.attacks.plan import (
    MODES,
    PICKS,
    Attack,
    Plan,
    Row,
    RowSpool,
    check_count,
    excluded_keys,
    plan_cleaning_set,
    plan_poisons,
    progress,
    scan_rows,
)
from clip_backdoor.attacks.source_args import add_source_arguments, open_source, source_spec
from clip_backdoor.attacks.targets import (
    check_target,
    derive_seed,
    dirty_caption,
    imagenet_templates,
    mention_pattern,
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
from clip_backdoor.data.captions import CaptionSource, CsvSource, Sample, usable_caption
from clip_backdoor.data.transforms import squash
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import atomic_dir, atomic_path, write_json

log = logging.getLogger(__name__)

FORMATS = ("csv", "wds", "manifest")
CSV_NAME = "train.csv"  # the same layout as clip_backdoor.data.writers.write_csv_dataset


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
    for position, sample in enumerate(progress(samples, total, "writing")):
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
        for index in progress(indices, len(indices), "writing"):
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
    check_count(args.n, args.fraction, source.num_samples)
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


# Choosing rows (attacks/plan.py), the caption side (attacks/targets.py) and the source options
# (attacks/source_args.py) have modules of their own; their names stay importable from here.
__all__ = ["MODES", "PICKS", "FORMATS", "Attack", "Plan", "Row", "RowSpool", "plan_poisons",
           "plan_cleaning_set", "excluded_keys", "scan_rows", "derive_seed", "imagenet_templates",
           "check_target", "dirty_caption", "mention_pattern", "add_source_arguments", "source_spec",
           "open_source", "write_plan", "preview_triggers", "build_parser", "main"]
