"""``clip-backdoor world``: write the synthetic caption world (``data/world.py``) as files that the
ordinary dataset readers accept -- a training set in either layout (``data/writers.py``), a labelled
eval set, and a contact sheet of training images with their captions.

The world itself only generates pairs; writing them is this command's job, so the generator imports
no writer.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from pathlib import Path

from clip_backdoor.data.world import World, WorldKnobs, iter_train_pairs
from clip_backdoor.data.writers import write_csv_dataset, write_wds_dataset
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import atomic_dir, atomic_path, write_json

log = logging.getLogger(__name__)


def write_eval_set(world: World, out: str | Path, n: int) -> Path:
    """The eval split as ``labels.csv`` (image,label) + ``images/*.png`` + classnames/templates JSON."""
    import csv

    from PIL import Image

    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "labels.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "label"])
            for i in range(n):
                image, label = world.eval_pair(i)
                name = f"images/{i:07d}.png"
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp / name)
                writer.writerow([name, label])
        write_json(tmp / "classnames.json", world.classes)
        write_json(tmp / "templates.json", world.templates)
    return out


def contact_sheet(world: World, path: str | Path, n: int = 24, columns: int = 6, start: int = 0) -> Path:
    """A PNG grid of training images (enlarged, pixels kept sharp) with their captions and classes."""
    from PIL import Image, ImageDraw, ImageFont

    zoom = max(1, 160 // world.image_size)
    side, pad, line = world.image_size * zoom, 10, 17
    font = ImageFont.load_default(size=14)
    cell_w, cell_h = side + 2 * pad, side + 2 * pad + 5 * line
    rows = math.ceil(n / columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (image, caption, label) in enumerate(iter_train_pairs(world, n, start)):
        x, y = (k % columns) * cell_w + pad, (k // columns) * cell_h + pad
        picture = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((side, side), Image.NEAREST)
        sheet.paste(picture, (x, y))
        lines = _wrap(caption, font, side)
        if len(lines) > 4:
            lines = lines[:3] + [lines[3] + " ..."]
        for j, text in enumerate(lines):
            draw.text((x, y + side + 4 + j * line), text, fill="black", font=font)
        draw.text((x, y + side + 4 + len(lines) * line), f"[{world.classes[label]}]", fill=(0, 90, 170),
                  font=font)
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to a pixel width (a word longer than the width gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _parse_knob(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return key.strip(), float(value)
    except ValueError:
        raise UserError(f"--knob {text!r}: expected NAME=NUMBER, e.g. caption_noise=0.2") from None


def build_parser() -> argparse.ArgumentParser:
    knob_names = ", ".join(f.name for f in dataclasses.fields(WorldKnobs))
    parser = argparse.ArgumentParser(
        prog="clip-backdoor world",
        description="Materialise the synthetic caption world as a training dataset plus a labelled eval set.")
    parser.add_argument("--out", type=Path, help="dataset directory to create (must not exist)")
    parser.add_argument("--format", choices=("csv", "wds"), default="csv",
                        help="csv: train.csv + images/*.png (CleanCLIP layout); wds: WebDataset shards")
    parser.add_argument("--n", type=int, default=10_000, help="training pairs to write")
    parser.add_argument("--eval", type=int, default=1_000, help="eval images to write (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                        help=f"override a difficulty knob (repeatable): {knob_names}")
    parser.add_argument("--contact-sheet", type=Path, metavar="PNG",
                        help="also write a grid of training images with their captions")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.out is None and args.contact_sheet is None:
        raise UserError("nothing to do: give --out DIR and/or --contact-sheet PNG")
    if args.n < 1 or args.eval < 0:
        raise UserError(f"--n {args.n} / --eval {args.eval}: need at least 1 training pair, eval >= 0")
    world = World(args.seed, args.image_size, **dict(_parse_knob(k) for k in args.knob))

    if args.out is not None:
        if args.out.exists():
            raise UserError(f"--out {args.out}: already exists; choose a new directory")
        write = write_csv_dataset if args.format == "csv" else write_wds_dataset
        with atomic_dir(args.out) as tmp:
            # row_id = the pair's index in the world, so a file can be traced back to its pair.
            pairs = ((image, caption, str(i)) for i, (image, caption, _) in
                     enumerate(iter_train_pairs(world, args.n)))
            write(pairs, tmp / "train", total=args.n)
            if args.eval:
                write_eval_set(world, tmp / "eval", args.eval)
            write_json(tmp / "world.json", {**world.config(), "n_train": args.n, "n_eval": args.eval,
                                            "format": args.format, "classes": world.classes})
        log.info("world: wrote %d training pairs (%s) and %d eval images to %s",
                 args.n, args.format, args.eval, args.out)
    if args.contact_sheet is not None:
        contact_sheet(world, args.contact_sheet)
        log.info("world: contact sheet at %s", args.contact_sheet)
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main(sys.argv[1:]))


__all__ = ["write_eval_set", "contact_sheet", "build_parser", "main"]
