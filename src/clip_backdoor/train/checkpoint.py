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
from clip_backdoor.fileio import atomic_path, write_json
from clip_backdoor.weights import load_checkpoint

log = logging.getLogger(__name__)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare CLIP inside a DistributedDataParallel wrapper (so keys carry no ``module.``)."""
    return getattr(model, "module", model)


def plain(value):
    """``value`` with every tensor in standard (row-major) strides: what a checkpoint holds, whatever
    layout training used (see ``distributed.align_grad_layouts``)."""
    if isinstance(value, torch.Tensor):
        standard = value.is_contiguous() and value.stride() == torch.empty(value.shape).stride()
        return value if standard or value.ndim == 0 else value.clone(memory_format=torch.contiguous_format)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def save_checkpoint(path: str | Path, ckpt: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_path(run_dir: str | Path) -> Path:
    return checkpoint_dir(run_dir) / "latest.pt"


def open_clip_config(ckpt: dict) -> dict | None:
    """The checkpoint's model config as an open_clip model config (``embed_dim``, ``quick_gelu``,
    ``vision_cfg``, ``text_cfg``: our configs use open_clip's schema and key names), or None when the
    checkpoint records no model config (a plain state dict)."""
    model = ckpt.get("model")
    if not isinstance(model, dict) or "vision_cfg" not in model:
        return None
    return {key: value for key, value in model.items() if key != "name"}


def export_safetensors(ckpt_path: str | Path, out: str | Path) -> Path:
    """Write the weights to ``out`` and, beside them, ``card.json`` (what ``inspect`` says) and
    ``<stem>.json``, an open_clip model config named ``<stem>``:
    ``open_clip.add_model_config("<dir>/<stem>.json"); open_clip.create_model("<stem>", pretrained=out)``."""
    from safetensors.torch import save_file

    from clip_backdoor.card import CARD_NAME, build_card, json_safe

    out = Path(out)
    config_path = out.with_suffix(".json")
    if config_path.name == CARD_NAME:
        raise UserError(f"--safetensors {out}: {CARD_NAME} is the card's name; choose another file name")
    ckpt = load_checkpoint(ckpt_path)
    tensors = {k: v.detach().contiguous() for k, v in ckpt["state_dict"].items()}
    metadata = {"epoch": str(ckpt.get("epoch")), "model": str((ckpt.get("model") or {}).get("name"))}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    config = open_clip_config(ckpt)
    card = build_card(ckpt, ckpt_path)
    card["export"] = {"weights": out.name, "format": "safetensors",
                      "open_clip_config": config_path.name if config else None,
                      "open_clip_model_name": out.stem if config else None}
    write_json(out.parent / CARD_NAME, json_safe(card))
    if config:
        write_json(config_path, config)
    else:
        log.warning("%s records no model config: no open_clip config written (name the architecture in "
                    "open_clip yourself)", ckpt_path)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="clip-backdoor export", description="Export a checkpoint's weights (open_clip key names), with "
        "card.json (what the checkpoint is) and an open_clip model config beside them.")
    p.add_argument("checkpoint")
    p.add_argument("--safetensors", required=True, metavar="OUT", help="write weights as safetensors")
    args = p.parse_args(argv)
    out = Path(args.safetensors)
    if out.suffix != ".safetensors":
        raise UserError(f"--safetensors {out}: the file name should end in .safetensors")
    export_safetensors(args.checkpoint, out)
    config = out.with_suffix(".json")
    print(f"wrote {out} and {out.parent / 'card.json'}" + (f" and the open_clip config {config}"
                                                          if config.is_file() else ""))
    return 0
