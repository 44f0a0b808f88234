"""Model registry and factory: architectures are JSON data in ``configs/`` (open_clip's schema).

``create_model("tiny")`` builds a registered architecture, ``create_model("my/arch.json")`` one from
a file, ``create_model(config_dict)`` one from a config saved with a checkpoint. Every config is
validated key by key so a typo fails at once, naming the file and the key.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from clip_backdoor.errors import UserError
from clip_backdoor.models.clip import CLIP

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# key -> (accepted types, default or REQUIRED). Numbers must be positive; a bool is not an int here.
REQUIRED = object()
_INT, _NUM, _BOOL = (int,), (int, float), (bool,)
TOP_SCHEMA = {"embed_dim": (_INT, REQUIRED), "quick_gelu": (_BOOL, False),
              "vision_cfg": ((dict,), REQUIRED), "text_cfg": ((dict,), REQUIRED)}
VISION_SCHEMA = {"image_size": (_INT, REQUIRED), "layers": ((int, list), REQUIRED), "width": (_INT, REQUIRED),
                 "patch_size": ((int, type(None)), None), "head_width": (_INT, 64), "mlp_ratio": (_NUM, 4.0)}
TEXT_SCHEMA = {"context_length": (_INT, REQUIRED), "vocab_size": (_INT, REQUIRED), "width": (_INT, REQUIRED),
               "heads": (_INT, REQUIRED), "layers": (_INT, REQUIRED), "mlp_ratio": (_NUM, 4.0)}


def list_models() -> list[str]:
    """Names of the registered architectures (the JSON files in ``models/configs``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_model_config(name_or_path: str | os.PathLike | Mapping) -> dict:
    """The validated config (defaults filled in) of a registered name, a JSON file, or a dict."""
    if isinstance(name_or_path, Mapping):
        return validate_config(copy.deepcopy(dict(name_or_path)), source="model config")
    name = str(name_or_path)
    if name in list_models():
        path = CONFIG_DIR / f"{name}.json"
    elif name.endswith(".json") or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"model config file not found: {path}")
    else:
        raise UserError(f"unknown model {name!r}; available: {', '.join(list_models())} "
                        f"(or a path to a config .json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a model config must be a JSON object")
    return validate_config(raw, source=str(path))


def _check_section(section: dict, schema: dict, where: str, source: str) -> dict:
    unknown = sorted(set(section) - set(schema))
    if unknown:
        raise UserError(f"{source}: unknown key {where}{unknown[0]!r}; allowed: {', '.join(schema)}")
    out = {}
    for key, (types, default) in schema.items():
        if key not in section:
            if default is REQUIRED:
                raise UserError(f"{source}: missing required key {where}{key}")
            out[key] = default
            continue
        value = section[key]
        wrong_bool = isinstance(value, bool) and bool not in types
        if wrong_bool or not isinstance(value, types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise UserError(f"{source}: key {where}{key} must be {expected}, got {json.dumps(value)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise UserError(f"{source}: key {where}{key} must be positive, got {value}")
        out[key] = value
    return out


def validate_config(raw: dict, *, source: str) -> dict:
    """Check types, required keys and architectural consistency; return a complete copy."""
    config = _check_section(raw, TOP_SCHEMA, "", source)
    vision = config["vision_cfg"] = _check_section(raw["vision_cfg"], VISION_SCHEMA, "vision_cfg.", source)
    text = config["text_cfg"] = _check_section(raw["text_cfg"], TEXT_SCHEMA, "text_cfg.", source)

    layers = vision["layers"]
    if isinstance(layers, list):  # ModifiedResNet
        if len(layers) != 4 or not all(type(n) is int and n > 0 for n in layers):
            raise UserError(f"{source}: key vision_cfg.layers must be 4 positive ints (ResNet stages) "
                            f"or one int (ViT depth), got {json.dumps(layers)}")
        if vision["patch_size"] is not None:
            raise UserError(f"{source}: key vision_cfg.patch_size must be null for a ResNet "
                            f"(layers is a list)")
        if vision["image_size"] % 32:
            raise UserError(f"{source}: key vision_cfg.image_size must be a multiple of 32 for a ResNet, "
                            f"got {vision['image_size']}")
        if vision["width"] % 2 or (vision["width"] * 32) % vision["head_width"]:
            raise UserError(f"{source}: key vision_cfg.width must be even, and width*32 divisible "
                            f"by head_width")
    else:  # VisionTransformer
        if vision["patch_size"] is None:
            raise UserError(f"{source}: missing required key vision_cfg.patch_size (a ViT: layers is an int)")
        if vision["image_size"] % vision["patch_size"]:
            raise UserError(f"{source}: key vision_cfg.image_size must be a multiple of patch_size")
        if vision["width"] % vision["head_width"]:
            raise UserError(f"{source}: key vision_cfg.width must be a multiple of head_width")
    if text["width"] % text["heads"]:
        raise UserError(f"{source}: key text_cfg.width must be a multiple of text_cfg.heads")
    return config


def create_model(name_or_path: str | os.PathLike | Mapping, *, seed: int | None = None) -> CLIP:
    """Build a freshly initialised CLIP. The same ``seed`` gives bit-identical weights.

    With ``seed=None`` the initialisation draws from torch's global generator, like any nn.Module.
    A seed is applied on a forked CPU generator, so the caller's random state is left untouched.
    Construct under ``with torch.device("meta"):`` to get shapes without allocating weights.
    """
    config = get_model_config(name_or_path)
    if seed is None:
        return CLIP(config)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return CLIP(config)


def load_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                 source: str = "state dict") -> None:
    """Load ``state_dict`` strictly, with one clear line for a mismatch.

    A ``module.`` prefix (a DistributedDataParallel checkpoint) is stripped. ``source`` names the
    file in error messages.
    """
    state_dict = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (first: {', '.join(unexpected[:3])})")
        raise UserError(f"{source}: does not match the model: {'; '.join(parts)}")
    for key, target in expected.items():
        shape = tuple(state_dict[key].shape)
        if shape != tuple(target.shape):
            raise UserError(f"{source}: key {key} has shape {list(shape)}, the model expects "
                            f"{list(target.shape)}")
    model.load_state_dict(state_dict, strict=True)
