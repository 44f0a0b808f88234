"""The caption-source options shared by ``clip-backdoor poison`` and ``poison optimize-patch``: the
flags, the :func:`~clip_backdoor.data.captions.make_source` spec they describe (recorded in
``poison.json``), and the source opened in file order.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from clip_backdoor.data.captions import make_source
from clip_backdoor.data.samples import CaptionSource
from clip_backdoor.errors import UserError


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
