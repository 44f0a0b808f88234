"""Reading model weights: clip-backdoor checkpoints, and plain open_clip-style state dicts.

A **clip-backdoor checkpoint** (written by ``clip_backdoor.train.checkpoint``) is a ``torch.save``'d
dict holding only tensors, dicts, lists, str, int, float, bool and None, so that
``torch.load(path, weights_only=True)`` reads it without running any pickled code::

    {
      "epoch": int,             # epochs completed (0 = before the first training epoch)
      "step": int,              # optimizer steps completed
      "model": dict,            # the model config, as in models/configs/<name>.json, plus "name"
      "state_dict": dict,       # open_clip parameter names ("visual.*", "token_embedding.weight",
                                #   ..., "logit_scale"); no "module." prefix
      "optimizer": dict | None, # optimizer.state_dict()
      "scheduler": dict | None, # learning-rate schedule state
      "scaler": dict | None,    # GradScaler state (fp16), else None
      "rng": dict | None,       # RNG states as tensors / ints (never numpy objects)
      "config": dict,           # the resolved run config
      # what the run is, for `clip-backdoor inspect` (clip_backdoor.card; absent in older checkpoints):
      "version": str,           # the toolkit version that wrote it
      "data": dict,             # training data: kind, path, num_samples, poisoning (poison.json facts)
      "method": dict | None,    # cleaning method and its resolved parameters
      "start": dict | None,     # cleaning: the starting checkpoint's path, epoch, data and metrics
      "metrics": dict,          # this epoch's metrics.jsonl line
    }

A **plain state dict** (``{name: tensor}``; a ``.pt`` file, a ``.safetensors`` file, or an open_clip
training checkpoint ``{"state_dict": ..., "epoch": ...}`` with or without the DDP ``module.`` prefix)
carries no model config; name the architecture (``model_name="RN50"``) to load it.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from clip_backdoor.errors import UserError

DDP_PREFIX = "module."


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _read_file(path: Path) -> Any:
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory, not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError, ValueError, ...: whatever it is, not weights
            raise UserError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    try:
        # weights_only: tensors and plain containers only, never pickled code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises anything (KeyError, IndexError for a text file)
        raise UserError(f"{path} is not a clip-backdoor checkpoint ({_load_failure(path, e)})") from None


def _load_failure(path: Path, error: BaseException) -> str:
    """torch's weights-only errors run to a paragraph; keep the part that says what is in the file."""
    if not zipfile.is_zipfile(path):
        return "not a file written by torch.save (zip format)"
    detail = str(error).partition("WeightsUnpickler error:")[2].strip()
    if detail:
        return "it holds objects other than tensors and plain containers: " + detail.split(". ")[0].strip()
    return _first_line(error)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_ddp_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip's DDP checkpoints prefix every key with ``module.``; ours never do."""
    if state_dict and all(k.startswith(DDP_PREFIX) for k in state_dict):
        return {k[len(DDP_PREFIX):]: v for k, v in state_dict.items()}
    return state_dict


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint (or a plain state dict, returned as ``{"state_dict": ...}``) onto the CPU.

    Raises :class:`UserError` when the file is missing or is not a checkpoint, in one line.
    """
    path = Path(path)
    obj = _read_file(path)
    if _is_state_dict(obj):
        return {"state_dict": _strip_ddp_prefix(obj)}
    if not isinstance(obj, dict) or not _is_state_dict(obj.get("state_dict")):
        what = (f"a dict without a 'state_dict' of tensors (keys: {', '.join(map(str, list(obj)[:6]))})"
                if isinstance(obj, dict) else f"it holds a {type(obj).__name__}")
        raise UserError(f"{path} is not a clip-backdoor checkpoint ({what})")
    return {**obj, "state_dict": _strip_ddp_prefix(obj["state_dict"])}


def checkpoint_model_config(ckpt: dict, model_name: str | None = None, *, source: str = "checkpoint") -> dict:
    """The model config to build: the checkpoint's own, unless ``model_name`` overrides it."""
    from clip_backdoor.models import get_model_config

    if model_name is not None:
        return {**get_model_config(model_name), "name": model_name}
    config = ckpt.get("model")
    if isinstance(config, dict):
        return config
    raise UserError(f"{source} has weights but no model config; name the architecture (--model NAME)")


def model_from_checkpoint(path_or_ckpt: str | os.PathLike | dict, device: str | torch.device = "cpu", *,
                          model_name: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Build the checkpoint's model, load its weights and move it to ``device``; returns (model, ckpt).

    The architecture comes from the checkpoint's ``"model"`` config, or from ``model_name`` (needed
    for plain state dicts). A weight whose shape does not fit is reported by its key and both shapes.
    """
    from clip_backdoor.models import create_model, load_weights

    if isinstance(path_or_ckpt, dict):
        ckpt, source = path_or_ckpt, "checkpoint"
    else:
        ckpt, source = load_checkpoint(path_or_ckpt), str(path_or_ckpt)
    config = checkpoint_model_config(ckpt, model_name, source=source)
    architecture = {key: value for key, value in config.items() if key != "name"}
    # Every parameter is overwritten by the checkpoint; the seed only keeps global RNG state untouched.
    model = create_model(architecture, seed=0)
    load_weights(model, ckpt["state_dict"], source=source)
    return model.to(device), ckpt
