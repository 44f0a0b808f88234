"""Checkpoints: atomic save, exact resume, safetensors export.

A checkpoint is the dict documented in ``clip_backdoor.weights`` (epoch, step, model config,
open_clip-compatible ``state_dict`` without a ``module.`` prefix, optimizer, scaler, rng, run
config). It holds only tensors and plain containers, so ``torch.load(weights_only=True)`` reads it.
``latest.pt`` is rewritten atomically at the end of every epoch; ``epoch_N.pt`` every K epochs.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from clip_backdoor.errors import UserError
from clip_backdoor.fileio import atomic_path
from clip_backdoor.weights import load_checkpoint

log = logging.getLogger(__name__)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare CLIP inside a DistributedDataParallel wrapper (so keys carry no ``module.``)."""
    return getattr(model, "module", model)


def save_checkpoint(path: str | Path, ckpt: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_path(run_dir: str | Path) -> Path:
    return checkpoint_dir(run_dir) / "latest.pt"


def export_safetensors(ckpt_path: str | Path, out: str | Path) -> Path:
    from safetensors.torch import save_file

    ckpt = load_checkpoint(ckpt_path)
    tensors = {k: v.detach().contiguous() for k, v in ckpt["state_dict"].items()}
    metadata = {"epoch": str(ckpt.get("epoch")), "model": str((ckpt.get("model") or {}).get("name"))}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clip-backdoor export",
                                description="Export a checkpoint's weights (open_clip key names).")
    p.add_argument("checkpoint")
    p.add_argument("--safetensors", required=True, metavar="OUT", help="write weights as safetensors")
    args = p.parse_args(argv)
    out = Path(args.safetensors)
    if out.suffix != ".safetensors":
        raise UserError(f"--safetensors {out}: the file name should end in .safetensors")
    export_safetensors(args.checkpoint, out)
    print(f"wrote {out}")
    return 0
