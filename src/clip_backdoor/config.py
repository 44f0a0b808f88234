"""Typed configuration for every stage: dataclasses, YAML in, dotted overrides, resolved YAML out.

A run's config is data (YAML), never executed code. Unknown keys and wrong types are rejected with
the key's dotted path and the file it came from, so a typo never silently falls back to a default
(a flag that silently does nothing is one of the reference code's smells).

Every numeric field has a bound, declared in its class's ``BOUNDS`` (``"> 0"``, ``">= 1"``,
``"[0, 1)"``) and checked by :func:`check_bounds` wherever a config is loaded (``from_dict``) or
handed to the training loop, so ``optim.lr=-1e-3`` is a one-line error naming the key instead of a
traceback from inside torch. Other configs (the study spec) reuse these bounds via :func:`bounds_of`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from clip_backdoor.errors import UserError


# --------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Where image-caption pairs come from (see clip_backdoor.data.captions.make_source)."""

    kind: str = "synthetic"  # synthetic | csv | wds
    path: str | None = None  # CSV file, or WebDataset shard pattern (brace expansion allowed)
    num_samples: int = 10000  # synthetic: pairs in the world's training stream; wds: overrides sizes.json
    # synthetic: World(**world), e.g. {seed: 0, image_size: 32}; the eval split uses the same world.
    # image_size defaults to the model's resolution.
    world: dict = field(default_factory=dict)
    cache: bool = True  # synthetic: render every pair once before workers start (~3 KB a pair at 32 px)
    image_key: str = "image"
    caption_key: str = "caption"
    separator: str = ","
    poison_manifest: str | None = None  # manifest.csv: poisons applied on the fly (manifest-only mode)
    workers: int = 2

    BOUNDS: ClassVar[dict[str, str]] = {"num_samples": ">= 1", "workers": ">= 0"}


@dataclass
class EvalConfig:
    """Zero-shot accuracy and ASR, evaluated during training and by `clip-backdoor evaluate`."""

    kind: str = "synthetic"  # synthetic | imagefolder | labels_csv
    path: str | None = None
    n: int = 2000  # synthetic: number of eval images
    target: str | None = "banana"  # ASR target class name; None = accuracy only
    trigger: str | None = "badnet"
    trigger_params: dict = field(default_factory=dict)
    seed: int = 0  # test-time trigger seed: a checkpoint's ASR is repeatable
    every: int = 1  # evaluate every N epochs (0 = never during training)
    epochs: list = field(default_factory=list)  # ... and after each of these epochs too
    batch_size: int = 256
    workers: int = 0
    # A validation split, disjoint from the test images, evaluated in the same pass (metrics val_*):
    # synthetic: val_n images of the world's eval split from val_start (default n, after the test images);
    # imagefolder / labels_csv: a second set (val_path) or a seeded per-class partition (val_fraction).
    val_n: int = 0
    val_start: int | None = None
    val_path: str | None = None
    val_fraction: float | None = None
    split_seed: int = 0

    BOUNDS: ClassVar[dict[str, str]] = {"n": ">= 1", "seed": ">= 0", "every": ">= 0", "batch_size": ">= 1",
                                        "workers": ">= 0", "val_n": ">= 0", "val_start": ">= 0",
                                        "val_fraction": "(0, 1)", "split_seed": ">= 0"}


@dataclass
class ObjectiveConfig:
    """L = mmcl_weight * L_mmcl + ssl_weight * L_ssl (REFERENCE.md, Objectives)."""

    mmcl_weight: float = 1.0
    ssl_weight: float = 0.0
    ssl_symmetric: bool = False
    eda: str = "static"  # static (reference: once per caption) | dynamic (fresh per epoch)
    eda_alpha: float = 0.1
    image_policy: str = "imagenet"  # AutoAugment policy for the image view

    BOUNDS: ClassVar[dict[str, str]] = {"mmcl_weight": ">= 0", "ssl_weight": ">= 0", "eda_alpha": "(0, 1)"}


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 50
    grad_clip: float | None = None  # max global grad norm; None = no clipping

    BOUNDS: ClassVar[dict[str, str]] = {"lr": "> 0", "weight_decay": ">= 0", "beta1": "[0, 1)",
                                        "beta2": "[0, 1)", "eps": "> 0", "warmup_steps": ">= 0",
                                        "grad_clip": "> 0"}


@dataclass
class TrainConfig:
    """One run of the one training loop: pre-training, or cleaning from a checkpoint."""

    run_dir: str = "runs/pretrain"
    model: str = "tiny"  # registry name or path to a JSON model config
    init_checkpoint: str | None = None  # cleaning: start from these weights
    optimizer_state: str = "fresh"  # fresh | inherit (reference compat: keep the checkpoint's moments)
    method: str | None = None  # cleaning recipe name (clip_backdoor.cleaning); None = plain run
    method_params: dict = field(default_factory=dict)
    defense: str | None = None  # pre-training defence (clip_backdoor.defenses): safeclip | roclip | None
    defense_params: dict = field(default_factory=dict)
    epochs: int = 5
    # The *global* batch: under torchrun each of the W ranks takes batch_size / W (it must divide), as
    # in the reference, so the paper's 2048 / 1024 mean the same whatever the launch.
    batch_size: int = 128
    precision: str = "fp32"  # fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch intra-op threads (None = torch's default)
    seed: int = 0  # training seed: init, data order, augmentations (poison seed lives elsewhere)
    eval_at_start: bool = False  # evaluate before the first step (epoch 0 of a cleaning run)
    save_every: int = 1  # also keep checkpoints/epoch_N.pt every K epochs (0 = latest.pt only)
    save_epochs: list = field(default_factory=list)  # ... and after each of these epochs (e.g. to clean from)
    save_every_steps: int = 0  # also write an exact mid-epoch latest.pt every N steps (0 = never)
    stop_epoch: int | None = None  # pause after this epoch; the lr schedule stays that of `epochs`
    # latest.pt (resume only) is rewritten at an epoch's end once this many seconds have passed since
    # the last write (0: every epoch); the last epoch's is always written. Results never depend on it.
    checkpoint_interval_s: float = 0.0
    resume: bool = True  # continue from run_dir/checkpoints/latest.pt when present
    # Resuming with another `epochs` changes the cosine schedule of the remaining steps: an error
    # unless this is set (the schedule of the new count is then used from the resume point on).
    allow_epochs_change: bool = False
    # Also report scalars to: tensorboard (losses and lr per step, every metric per epoch, into
    # run_dir/tensorboard/; needs the [tensorboard] extra). None = metrics.jsonl only.
    report_to: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    BOUNDS: ClassVar[dict[str, str]] = {"epochs": ">= 1", "batch_size": ">= 1", "threads": ">= 1",
                                        "seed": ">= 0", "save_every": ">= 0", "save_every_steps": ">= 0",
                                        "stop_epoch": ">= 1", "checkpoint_interval_s": ">= 0"}


# --------------------------------------------------------------------------------------------
# dict <-> dataclass with validation
# --------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int->float, return the value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return list(value)
    return value


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types name their dotted path."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise UserError(f"{where}.{key}: unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    check_bounds(obj, where, recurse=False)  # nested sections were checked by their own from_dict
    return obj


# --------------------------------------------------------------------------------------------
# Numeric bounds
# --------------------------------------------------------------------------------------------
# "> 0", ">= 1", ... or an interval "[0, 1)", "(0, 1)", "[0, 1]"
_BOUND = re.compile(r"^(?P<op>>=|>|<=|<) *(?P<x>\S+)$"
                    r"|^(?P<open>[\[(]) *(?P<lo>[^,]+), *(?P<hi>[^\])]+)(?P<close>[\])])$")


def _within(value: float, bound: str) -> bool:
    match = _BOUND.match(bound.strip())
    if match is None:
        raise ValueError(f"malformed bound {bound!r}")  # a programming error, not a user's
    if match["op"]:
        x = float(match["x"])
        return {">": value > x, ">=": value >= x, "<": value < x, "<=": value <= x}[match["op"]]
    lo, hi = float(match["lo"]), float(match["hi"])
    above = value >= lo if match["open"] == "[" else value > lo
    below = value <= hi if match["close"] == "]" else value < hi
    return above and below


def check_bounds(obj: Any, where: str = "config", *, recurse: bool = True) -> None:
    """Check every field named in ``type(obj).BOUNDS`` (and, with ``recurse``, in nested sections).

    ``None`` passes where the field allows it (``grad_clip: null``); a float must be finite. The
    error is one line: ``optim.lr: -0.001 must be > 0``.
    """
    for name, bound in getattr(type(obj), "BOUNDS", {}).items():
        value = getattr(obj, name)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue  # None where allowed; a wrong type is _coerce's to report
        key = f"{where}.{name}"
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key}: {value!r} is not a finite number")
        if not _within(value, bound):
            rule = f"lie in {bound}" if bound.strip()[0] in "[(" else f"be {bound}"
            raise UserError(f"{key}: {value!r} must {rule}")
    if recurse:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                check_bounds(value, f"{where}.{f.name}")


def bounds_of(cls: type, **fields: str) -> dict[str, str]:
    """Bounds taken from ``cls``'s fields by dotted path: ``bounds_of(TrainConfig, lr="optim.lr")``
    gives ``{"lr": "> 0"}``, so another config stating the same value states it once."""
    out = {}
    for name, path in fields.items():
        owner, *parts = [cls, *path.split(".")]
        for part in parts[:-1]:
            owner = typing.get_type_hints(owner)[part]
        out[name] = owner.BOUNDS[parts[-1]]
    return out


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def _parse_scalar(text: str) -> Any:
    """Parse an override value the way YAML would ("1e-4" -> float, "true" -> bool, "null" -> None)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        # YAML 1.1 reads "1e-4" as a string; users mean a number.
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict, overrides: list[str], where: str = "override") -> dict:
    """Apply ``a.b.c=value`` strings to a nested dict (a copy is returned)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"{where} {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
        key, text = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"{where} {key}: {part} is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data


# A run's config.yaml ends with what the launch made of the config (world size, per-rank batch, steps);
# it is a record, not a setting, so loading that file again ignores it.
RESOLVED_KEY = "resolved"


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Any:
    """``base`` dict, then the YAML file, then dotted overrides; validated into ``cls``."""
    data: dict = dict(base or {})
    where = "config"
    if path is not None:
        loaded = load_yaml(path)
        loaded.pop(RESOLVED_KEY, None)
        data = _deep_merge(data, loaded)
        where = str(path)
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data, where)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dump_yaml(obj: Any) -> str:
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return yaml.safe_dump(data, sort_keys=False)
