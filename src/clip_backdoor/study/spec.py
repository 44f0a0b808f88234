"""A study as one YAML file: the grid of the paper (pre-training objectives x cleaning methods x
learning rates x cleaning epochs x poisons in the cleaning set), read and validated; `study/expand.py`
expands it into runs.

The file is validated like every config here: an unknown key names its path in the file
(``cleaning.lrz``), a bad grid value names itself (``cleaning.lrs[2]``). Expansion is a pure
function of the spec, so run names and their order never change between invocations:

```
<study dir>/
  study.yaml                                  the resolved spec
  data/poisoned/                              manifest.csv + poison.json (poisons made on the fly)
  data/clean,k=<k>/                           cleaning sets (k poisons injected; k=0 is clean)
  pretrain/<objective>,seed=<s>/              one pre-training run per objective and seed
    detection/                                its training pairs' poison scores (detection.detectors)
  pretrain/<objective>,clean,seed=<s>/        the same without poisons (pretrain.clean_baseline: true)
  pretrain/<objective>,defense=<label>,seed=<s>/   the same, with a pre-training defence
  data/filtered/<objective>,defense=<label>,seed=<s>/   filter-then-retrain: the rows it keeps
  clean/<objective>,seed=<s>/<method>/lr=<lr>[,k=<k>]/   k appears only when k > 0
```

Every run is a :class:`~clip_backdoor.config.TrainConfig` for the one training loop. A cleaning run
starts from its pre-training run's ``latest.pt``, evaluates before its first step (epoch 0), and
gets its recipe's settings via ``cleaning.build_recipe(...).apply_to_config``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from clip_backdoor.config import (
    DataConfig,
    EvalConfig,
    TrainConfig,
    apply_overrides,
    bounds_of,
    from_dict,
    to_dict,
)
from clip_backdoor.errors import UserError

OBJECTIVES = {"mmcl": (1.0, 0.0), "mmcl+ssl": (1.0, 1.0), "ssl": (0.0, 1.0)}
PRECISIONS = ("fp32", "bf16", "fp16")
DATA_KINDS = ("synthetic", "csv", "wds")
EVAL_KINDS = ("synthetic", "imagefolder", "labels_csv")


# --------------------------------------------------------------------------------------------
# The spec, section by section (defaults visible in one place)
# --------------------------------------------------------------------------------------------
@dataclass
class DataSpec:
    """The pre-training data; the cleaning sets are drawn from it (poisons left out)."""

    kind: str = "synthetic"  # synthetic | csv | wds
    path: str | None = None  # CSV file or WebDataset shard pattern
    num_samples: int = 10000  # synthetic: pairs; wds: overrides sizes.json when set explicitly
    world: dict = field(default_factory=dict)  # synthetic: World(**world), e.g. {seed: 0}
    image_key: str = "image"
    caption_key: str = "caption"
    separator: str = ","
    workers: int = 1  # dataloader worker processes per run

    BOUNDS: ClassVar[dict[str, str]] = bounds_of(DataConfig, num_samples="num_samples", workers="workers")


@dataclass
class AttackSpec:
    trigger: str = "badnet"
    trigger_params: dict = field(default_factory=dict)
    target: str = "banana"
    n: int | None = None  # number of poisons ...
    fraction: float | None = None  # ... or a fraction of the rows (exactly one of the two)
    mode: str = "dirty"  # dirty | label-consistent
    synonyms: list = field(default_factory=list)  # label-consistent: other names of the target
    poison_seed: int = 0  # which rows are poisoned and their trigger draws; not a training seed

    BOUNDS: ClassVar[dict[str, str]] = {"n": ">= 0", "fraction": "[0, 1]", "poison_seed": ">= 0"}


@dataclass
class PretrainSpec:
    model: str = "tiny"
    # names, or {name, label, <any of the scalar settings below>} to change one for that objective only
    # (the paper: batch 2048 for MMCL, 1024 for MMCL+SSL); a label (default: the name) names the runs,
    # so one objective may appear with several settings, e.g. a dose-response over ssl_weight
    objectives: list = field(default_factory=lambda: ["mmcl", "mmcl+ssl"])
    epochs: int = 10
    lr: float = 5e-4
    batch_size: int = 128
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float | None = None
    precision: str = "fp32"
    eda: str = "static"  # text views for SSL: static (reference) | dynamic
    ssl_weight: float = 1.0  # λ2 of the objectives with an SSL term (mmcl+ssl, ssl); mmcl has none
    # AutoAugment policy of the pre-training SSL image view: imagenet | cifar10 | svhn (cleaning keeps
    # the reference's imagenet view)
    image_policy: str = "imagenet"
    eval_every: int = 1  # evaluate every N epochs (and the last)
    save_every: int = 0  # also keep checkpoints/epoch_N.pt every N epochs (latest.pt always)
    save_every_steps: int = 0  # also write an exact mid-epoch latest.pt every N steps (0: epoch ends only)
    # Cleaning runs start from this pre-training epoch's checkpoint (None: the last epoch). The
    # pre-training then also saves and evaluates that epoch; its evaluation is the poisoned baseline.
    clean_from: int | None = None
    # Also pre-train each objective without poisons (same seed, data, schedule): the clean model's
    # accuracy and ASR are the headline's floor. Nothing is cleaned from it.
    clean_baseline: bool = False

    # pre-training defences, each run for every objective and seed next to the undefended run:
    # safeclip | roclip | {name, params, label}, or {name: filter, params: {detector, budget}}
    # (filter-then-retrain: drop the top-scored pairs of the undefended run's detection, pre-train again)
    defenses: list = field(default_factory=list)

    # The training config's bounds for the values it becomes; an SSL weight of 0 is the mmcl objective.
    BOUNDS: ClassVar[dict[str, str]] = {
        **bounds_of(TrainConfig, epochs="epochs", lr="optim.lr", batch_size="batch_size",
                    warmup_steps="optim.warmup_steps", weight_decay="optim.weight_decay",
                    grad_clip="optim.grad_clip", eval_every="eval.every", save_every="save_every",
                    save_every_steps="save_every_steps"),
        "ssl_weight": "> 0", "clean_from": ">= 1"}


@dataclass
class CleaningSpec:
    size: int = 1000  # pairs in the cleaning set
    pick: str = "tail"  # tail (the last rows) | random (seeded by `seed`)
    seed: int = 0  # the cleaning-set draw (pick: random)
    # names, or {name, params, label, lrs, k, batch_size}: lrs/k/batch_size override the grid for that
    # method only (the reference cleans MMCL-only at batch 128, the SSL methods at 64)
    methods: list = field(default_factory=lambda: ["cleanclip", "mmcl", "ssl"])
    lrs: list = field(default_factory=lambda: [1e-5])
    epochs: int = 10
    batch_size: int = 64
    warmup_steps: int = 50
    weight_decay: float = 0.1
    precision: str | None = None  # default: the pre-training precision
    k: list = field(default_factory=lambda: [0])  # poisons injected into the cleaning set
    optimizer_state: str = "fresh"  # fresh | inherit (reference compat)
    keep_checkpoints: bool = False  # a finished cleaning run keeps only its metrics (checkpoints are big)
    # constrained successive halving over each group's lrs, e.g. {eta: 3, rungs: [1, 3]} (study/prune.py)
    prune: dict | None = None

    BOUNDS: ClassVar[dict[str, str]] = {
        **bounds_of(TrainConfig, epochs="epochs", batch_size="batch_size", warmup_steps="optim.warmup_steps",
                    weight_decay="optim.weight_decay"),
        "size": ">= 1", "seed": ">= 0"}


@dataclass
class DetectionSpec:
    """Poisoned-sample scores (clip_backdoor.detection) of every undefended poisoned model's training data."""

    detectors: list = field(default_factory=list)  # kdist | lid | dao; [] = none (unless a filter needs one)
    k: int = 16  # neighbours of k-dist and DAO
    lid_k: int = 64  # neighbours of LID (the reference's extract_bd_scores.py)
    batch_size: int = 512  # pairs per reference batch
    reference: str = "pairs"  # pairs: other images and captions | images: other images
    seed: int = 0  # shuffles the pairs into batches

    BOUNDS: ClassVar[dict[str, str]] = {"k": ">= 1", "lid_k": ">= 1", "batch_size": ">= 2", "seed": ">= 0"}


@dataclass
class EvalSpec:
    kind: str = "synthetic"  # synthetic | imagefolder | labels_csv
    path: str | None = None
    n: int = 1000  # synthetic: test images (world eval indices [0, n))
    seed: int = 0  # test-time trigger seed
    batch_size: int = 256
    # The validation split that chooses (lr, epoch); the test split above reports. Synthetic: val_n
    # images from index val_start (default n); file kinds: val_path (a second set of the same kind) or
    # val_fraction of eval.path's images (a seeded per-class partition by split_seed). 0 / None: none.
    val_n: int = 0
    val_start: int | None = None
    val_path: str | None = None
    val_fraction: float | None = None
    split_seed: int = 0

    BOUNDS: ClassVar[dict[str, str]] = bounds_of(EvalConfig, n="n", seed="seed", batch_size="batch_size",
                                                 val_n="val_n", val_start="val_start",
                                                 val_fraction="val_fraction", split_seed="split_seed")


@dataclass
class RunSettings:
    jobs: int = 1  # runs in parallel (CPU worker processes)
    threads: int | None = None  # torch threads per job; default max(1, cores // jobs)
    device: str = "cpu"  # cpu | auto | cuda | cuda:N
    devices: list = field(default_factory=list)  # one run per listed CUDA device, e.g. [cuda:0, cuda:1]
    executor: str = "local"  # local | slurm | ray (study/executors.py)
    slurm: dict = field(default_factory=dict)  # partition, time, gpus_per_node, ... (study/slurm.py)
    ray: dict = field(default_factory=dict)  # address, num_gpus, num_cpus, ... (study/ray_tasks.py)
    claim_stale_s: float = 600.0  # a run's claim without a heartbeat for this long is taken over
    report_to: str | None = None  # every run also reports to: tensorboard (<run dir>/tensorboard/)
    # latest.pt waits this long between rewrites (the last epoch's is always written): a short run
    # writes one resume checkpoint instead of one per epoch; an interrupted one replays the rest exactly
    checkpoint_interval_s: float = 300.0

    BOUNDS: ClassVar[dict[str, str]] = {**bounds_of(TrainConfig, threads="threads",
                                                    checkpoint_interval_s="checkpoint_interval_s"),
                                        "jobs": ">= 1", "claim_stale_s": "> 0"}


@dataclass
class StudySpec:
    name: str = ""
    seeds: list = field(default_factory=lambda: [0])  # training seeds: the whole study per seed
    data: DataSpec = field(default_factory=DataSpec)
    attack: AttackSpec = field(default_factory=AttackSpec)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    cleaning: CleaningSpec = field(default_factory=CleaningSpec)
    detection: DetectionSpec = field(default_factory=DetectionSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    thresholds: list = field(default_factory=lambda: [0.01, 0.05, 0.10])  # ASR levels for selection
    confidence: float = 0.95  # of every interval in the report, and 1 − the level of its tests
    run: RunSettings = field(default_factory=RunSettings)

    BOUNDS: ClassVar[dict[str, str]] = {"confidence": "(0, 1)"}  # checked in _validate, with a hint


@dataclass(frozen=True)
class Defense:
    """One pre-training defence of the study; ``label`` names its runs (``<objective>,defense=<label>``)."""

    name: str  # safeclip | roclip | filter
    params: dict
    label: str


@dataclass(frozen=True)
class Method:
    """One cleaning method of the grid; ``label`` names its directory and its rows in results.csv."""

    name: str
    params: dict
    label: str
    lrs: tuple[float, ...]
    ks: tuple[int, ...]
    batch_size: int | None = None  # None: cleaning.batch_size


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; in a study file it is always a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data


def load_spec(path: str | Path, overrides: list[str] | None = None) -> StudySpec:
    """Read, override (``cleaning.lrs=[1e-5,1e-4]``), validate; relative data paths become absolute."""
    data = apply_overrides(read_yaml(path), overrides or [], where="study override")
    return parse_spec(data, where=str(path))


def parse_spec(data: dict, where: str = "study") -> StudySpec:
    """Build and validate a :class:`StudySpec`; every error starts with ``where`` and names its key."""
    try:
        spec = _build(data)
        _validate(spec)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    for section in (spec.data, spec.eval):
        if section.path and "://" not in section.path:
            section.path = str(Path(section.path).expanduser().absolute())
    if spec.eval.val_path and "://" not in spec.eval.val_path:
        spec.eval.val_path = str(Path(spec.eval.val_path).expanduser().absolute())
    patch = spec.attack.trigger_params.get("patch")
    if isinstance(patch, str):  # badclip's patch file: every run, wherever it runs, reads the same one
        spec.attack.trigger_params["patch"] = str(Path(patch).expanduser().absolute())
    return spec


def _build(data: dict) -> StudySpec:
    names = {f.name: f for f in dataclasses.fields(StudySpec)}
    for key in data:
        if key not in names:
            raise UserError(f"{key}: unknown key (valid: {', '.join(names)})")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "name":
            if not isinstance(value, str):
                raise UserError(f"name: expected a string, got {value!r}")
            kwargs[key] = value
            continue
        if key == "confidence":
            kwargs[key] = value  # checked in _validate
            continue
        if key == "seeds" and not isinstance(value, list):  # `seeds: 3` is seed 3, not three seeds
            raise UserError(f"seeds: expected a list of distinct integers such as [0, 1, 2], got {value!r}")
        default = names[key].default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise UserError(f"{key}: expected a mapping, got {value!r}")
            kwargs[key] = from_dict(type(default), value, key)
        else:  # seeds, thresholds: a single value is a list of one
            kwargs[key] = value if isinstance(value, list) else [value]
    return StudySpec(**kwargs)


def _number(value: Any, where: str) -> float:
    """A grid value: a number, or a string that reads as one ("1e-5")."""
    if isinstance(value, bool):
        raise UserError(f"{where}: {value!r} is not a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise UserError(f"{where}: {value!r} is not a number") from None
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{where}: {value!r} is not a finite number")
    return float(value)


def _integer(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{where}: {value!r} is not an integer >= {minimum}")
    return value


def _unique(values: list, where: str) -> None:
    seen = set()
    for i, v in enumerate(values):
        if v in seen:
            raise UserError(f"{where}[{i}]: {v!r} is listed twice")
        seen.add(v)


def _choice(value: Any, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        raise UserError(f"{where}: {value!r} is not one of {', '.join(choices)}")


def _lrs(values: list, where: str) -> tuple[float, ...]:
    if not values:
        raise UserError(f"{where}: give at least one learning rate")
    lrs = []
    for i, v in enumerate(values):
        lr = _number(v, f"{where}[{i}]")
        if lr <= 0:
            raise UserError(f"{where}[{i}]: learning rate {v!r} must be > 0")
        lrs.append(lr)
    _unique(lrs, where)
    return tuple(lrs)


def _ks(values: list, where: str, size: int) -> tuple[int, ...]:
    if not values:
        raise UserError(f"{where}: give at least one k (0 = a clean cleaning set)")
    ks = tuple(_integer(v, f"{where}[{i}]") for i, v in enumerate(values))
    for i, k in enumerate(ks):
        if k > size:
            raise UserError(f"{where}[{i}]: {k} poisons do not fit a cleaning set of {size} (cleaning.size)")
    _unique(list(ks), where)
    return ks


def _validate(spec: StudySpec) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", spec.name or ""):
        raise UserError(f"name: {spec.name!r} must be a non-empty word of letters, digits, '.', '_', '+', "
                        "'-' (it names the study directory)")
    if not spec.seeds:
        raise UserError("seeds: give at least one training seed")
    for i, s in enumerate(spec.seeds):
        _integer(s, f"seeds[{i}]")
    _unique(spec.seeds, "seeds")
    c = spec.confidence
    if isinstance(c, bool) or not isinstance(c, int | float) or not 0 < c < 1:
        raise UserError(f"confidence: {c!r} must lie strictly between 0 and 1 (e.g. 0.95 for 95% intervals)")
    spec.confidence = float(c)
    _validate_data(spec.data, spec.eval)
    _validate_attack(spec.attack)
    _validate_pretrain(spec.pretrain)
    _validate_detection(spec)
    _validate_defenses(spec)
    _validate_cleaning(spec.cleaning)
    for i, t in enumerate(spec.thresholds):
        if not 0 < _number(t, f"thresholds[{i}]") <= 1:
            raise UserError(f"thresholds[{i}]: {t!r} must be an ASR fraction in (0, 1], e.g. 0.05 for 5%")
    spec.thresholds = [float(t) for t in spec.thresholds]
    _unique(spec.thresholds, "thresholds")
    r = spec.run
    for i, d in enumerate(r.devices):
        if not isinstance(d, str) or not re.fullmatch(r"cuda(:\d+)?", d):
            raise UserError(f"run.devices[{i}]: {d!r} is not a CUDA device such as cuda:0")
    _unique(r.devices, "run.devices")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", r.device):
        raise UserError(f"run.device: {r.device!r} is not auto, cpu, cuda or cuda:N")
    from clip_backdoor.train.scalars import check_report_to

    check_report_to(r.report_to, "run.report_to")
    _validate_executor(r)
    from clip_backdoor.study.prune import parse_prune

    parse_prune(spec.cleaning.prune, spec.cleaning.epochs, spec.thresholds)


def _validate_executor(r: RunSettings) -> None:
    """The executor's settings are checked here, without importing its package (study list works
    without it); a missing package is reported when the executor starts."""
    from clip_backdoor.study.executor_settings import EXECUTORS, parse_ray, parse_slurm

    _choice(r.executor, EXECUTORS, "run.executor")
    if r.slurm or r.executor == "slurm":
        parse_slurm(r.slurm)
    if r.ray or r.executor == "ray":
        parse_ray(r.ray)


def _validate_data(d: DataSpec, e: EvalSpec) -> None:
    _choice(d.kind, DATA_KINDS, "data.kind")
    if d.kind != "synthetic" and not d.path:
        raise UserError(f"data.path: required for data.kind={d.kind} (the poison stage and every run "
                        "read it)")
    if d.kind == "synthetic":
        from clip_backdoor.data.world import make_knobs

        _integer(d.world.get("seed", 0), "data.world.seed")
        try:
            make_knobs(**{k: v for k, v in d.world.items() if k not in ("seed", "image_size")})
        except (UserError, TypeError, ValueError) as e:
            raise UserError(f"data.world: {e}") from None
    _choice(e.kind, EVAL_KINDS, "eval.kind")
    if e.kind != "synthetic" and not e.path:
        raise UserError(f"eval.path: required for eval.kind={e.kind} (every run's evaluation reads it)")
    _validate_splits(e)


def _validate_splits(e: EvalSpec) -> None:
    """The validation split's keys fit the eval kind, and the two splits cannot overlap."""
    from clip_backdoor.data.classification import check_synthetic_splits

    _integer(e.val_n, "eval.val_n")
    _integer(e.split_seed, "eval.split_seed")
    if e.kind == "synthetic":
        for key in ("val_path", "val_fraction"):
            if getattr(e, key) is not None:
                raise UserError(f"eval.{key}: applies to imagefolder / labels_csv eval sets; the synthetic "
                                "set takes eval.val_n (and eval.val_start)")
        if e.val_start is not None:
            _integer(e.val_start, "eval.val_start")
        check_synthetic_splits(e.n, e.val_n, e.val_start)
        return
    for key in ("val_n", "val_start"):
        if getattr(e, key):
            raise UserError(f"eval.{key}: applies to the synthetic eval set; for eval.kind={e.kind} give "
                            "eval.val_path or eval.val_fraction")
    if e.val_path is not None and e.val_fraction is not None:
        raise UserError("eval.val_fraction: give a validation set (eval.val_path) or a fraction, not both")
    if e.val_path is not None and e.path and "://" not in e.val_path and \
            Path(e.val_path).expanduser().absolute() == Path(e.path).expanduser().absolute():
        raise UserError(f"eval.val_path: {e.val_path!r} is eval.path itself; the validation and test splits "
                        "must be disjoint (or use eval.val_fraction to partition one set)")


def _validate_attack(a: AttackSpec) -> None:
    from clip_backdoor.attacks.poison import MODES, check_target
    from clip_backdoor.attacks.triggers import get_trigger

    try:
        get_trigger(a.trigger, **a.trigger_params)
    except UserError as e:
        raise UserError(f"attack.trigger: {e}") from None
    try:
        check_target(a.target)
    except UserError as e:
        raise UserError(f"attack.target: {e}") from None
    _choice(a.mode, MODES, "attack.mode")
    if (a.n is None) == (a.fraction is None):
        raise UserError("attack: give the number of poisons as exactly one of n or fraction")


def _validate_pretrain(p: PretrainSpec) -> None:
    from clip_backdoor.models import get_model_config

    try:
        get_model_config(p.model)
    except UserError as e:
        raise UserError(f"pretrain.model: {e}") from None
    if not p.objectives:
        raise UserError("pretrain.objectives: give at least one of mmcl, mmcl+ssl, ssl")
    _check_pretrain_settings(p, "pretrain")
    for objective, settings in pretrain_objectives(p).items():
        _check_pretrain_settings(settings, f"pretrain.objectives[{objective}]")


def _check_pretrain_settings(p: PretrainSpec, where: str) -> None:
    # Numbers were checked against PretrainSpec.BOUNDS when the section was read (from_dict).
    if p.clean_from is not None and p.clean_from > p.epochs:
        raise UserError(f"{where}.clean_from: epoch {p.clean_from} is past the pre-training's {p.epochs} "
                        "epochs, so no such checkpoint is ever saved")
    _choice(p.precision, PRECISIONS, f"{where}.precision")
    _choice(p.eda, ("static", "dynamic"), f"{where}.eda")
    from clip_backdoor.data.augment import POLICIES

    _choice(p.image_policy, POLICIES, f"{where}.image_policy")


def _named_entry(entry, where: str, expected: str) -> dict:
    """A list entry given as a bare name or as a mapping with a name: always the mapping."""
    if isinstance(entry, str):
        return {"name": entry}
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected {expected}, got {entry!r}")
    return entry


def _recipe_entry(entry, where: str, what: str, valid: tuple[str, ...]) -> tuple[dict, str, dict]:
    """A defence or cleaning-method entry: (the mapping, its name, its params), keys and types checked."""
    entry = _named_entry(entry, where, f"a {what} name or {{{', '.join(valid)}}}")
    for key in entry:
        if key not in valid:
            raise UserError(f"{where}.{key}: unknown key (valid: {', '.join(valid)})")
    name, params = entry.get("name"), entry.get("params") or {}
    if not isinstance(name, str):
        raise UserError(f"{where}.name: expected a {what} name, got {name!r}")
    if not isinstance(params, dict):
        raise UserError(f"{where}.params: expected a mapping, got {params!r}")
    return entry, name, params


def pretrain_objectives(p: PretrainSpec) -> dict[str, PretrainSpec]:
    """Objective label -> its pre-training settings (the section's, changed by the entry's own)."""
    return {label: settings for label, (_, settings) in _objective_entries(p).items()}


def objective_names(p: PretrainSpec) -> dict[str, str]:
    """Objective label -> the objective it trains (mmcl, mmcl+ssl, ssl)."""
    return {label: name for label, (name, _) in _objective_entries(p).items()}


def _objective_entries(p: PretrainSpec) -> dict[str, tuple[str, PretrainSpec]]:
    out: dict[str, tuple[str, PretrainSpec]] = {}
    for i, entry in enumerate(p.objectives):
        where = f"pretrain.objectives[{i}]"
        entry = _named_entry(entry, where, "an objective name or {name, label, batch_size, ...}")
        changes = {k: v for k, v in entry.items() if k not in ("name", "label")}
        for key in ("objectives", "model", "defenses"):  # one model and one list per study
            if key in changes:
                raise UserError(f"{where}.{key}: cannot differ per objective")
        name = entry.get("name")
        _choice(name, tuple(OBJECTIVES), f"{where}.name" if "name" in entry and len(entry) > 1 else where)
        label = entry.get("label", name)
        if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", label):
            raise UserError(f"{where}.label: {label!r} must be a word of letters, digits, '.', '_', '+', "
                            "'=', '-' (it names the runs' directories)")
        if label in out:
            raise UserError(f"{where}: {label!r} is listed twice" + (" (give each entry its own label)"
                                                                     if "label" not in entry else ""))
        base = {k: v for k, v in to_dict(p).items() if k != "objectives"}
        out[label] = (name, from_dict(PretrainSpec, {**base, **changes}, where))
    return out


def _validate_detection(spec: StudySpec) -> None:
    from clip_backdoor.detection import REFERENCES, check_detectors, check_k

    d = spec.detection
    if d.detectors:
        d.detectors = list(check_detectors(d.detectors, "detection.detectors"))
    # k, lid_k, batch_size and seed were checked against DetectionSpec.BOUNDS when the section was read
    _choice(d.reference, REFERENCES, "detection.reference")
    if spec.data.kind == "synthetic":  # the rows are known: k must fit the smallest batch now
        batch = min(d.batch_size, spec.data.num_samples)
        check_k(d.k, batch, d.reference, "detection.k")
        check_k(d.lid_k, batch, d.reference, "detection.lid_k")


FILTER = "filter"  # filter-then-retrain: not a training recipe, a data step before a plain pre-training


def _filter_params(params: dict, where: str) -> dict:
    from clip_backdoor.detection import DETECTORS

    for key in params:
        if key not in ("detector", "budget"):
            raise UserError(f"{where}.{key}: unknown key (valid: detector, budget)")
    detector = params.get("detector", "dao")
    _choice(detector, DETECTORS, f"{where}.detector")
    if "budget" not in params:
        raise UserError(f"{where}.budget: required (the fraction of the pairs to remove, e.g. 0.1)")
    budget = _number(params["budget"], f"{where}.budget")
    if not 0 < budget < 1:
        raise UserError(f"{where}.budget: {params['budget']!r} must be a fraction of the pairs in (0, 1)")
    return {"detector": detector, "budget": budget}


def defenses(p: PretrainSpec) -> list[Defense]:
    """The pre-training defences of the study, each with its full parameters and a label."""
    from clip_backdoor.defenses import build_defense

    out = []
    for i, entry in enumerate(p.defenses):
        where = f"pretrain.defenses[{i}]"
        entry, name, params = _recipe_entry(entry, where, "defence", ("name", "params", "label"))
        if name == FILTER:
            params = _filter_params(params, f"{where}.params")
            default = f"filter-{params['detector']}-{short_number(params['budget'])}"
        else:
            try:
                params = dict(build_defense(name, params).params)
            except UserError as e:
                raise UserError(f"{where}: {e} (or {FILTER})") from None
            default = name
        label = entry.get("label") or default
        if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", label):
            raise UserError(f"{where}.label: {label!r} must be a word of letters, digits, '.', '_', '+', "
                            "'=', '-' (it names the runs)")
        out.append(Defense(name, params, label))
    _unique([d.label for d in out], "pretrain.defenses (labels; give each a label)")
    return out


def _validate_defenses(spec: StudySpec) -> None:
    from clip_backdoor.defenses import build_defense

    grid = defenses(spec.pretrain)
    for i, d in enumerate(grid):
        where = f"pretrain.defenses[{i}]"
        if d.name == FILTER:
            if spec.data.kind not in ("synthetic", "csv"):
                raise UserError(f"{where}: filter-then-retrain reads a subset of the rows, which needs "
                                f"data.kind synthetic or csv (not {spec.data.kind})")
            continue
        recipe = build_defense(d.name, d.params)
        for objective, settings in pretrain_objectives(spec.pretrain).items():
            if OBJECTIVES[objective][0] == 0:
                raise UserError(f"{where}: {d.name} replaces the MMCL term, which objective {objective!r} "
                                "has not; list it for mmcl and mmcl+ssl studies")
            try:
                recipe.check_schedule(settings.epochs)
            except UserError as e:
                raise UserError(f"{where}: {e} (objective {objective})") from None


def _validate_cleaning(c: CleaningSpec) -> None:
    from clip_backdoor.attacks.poison import PICKS

    _choice(c.pick, PICKS, "cleaning.pick")
    if c.precision is not None:
        _choice(c.precision, PRECISIONS, "cleaning.precision")
    _choice(c.optimizer_state, ("fresh", "inherit"), "cleaning.optimizer_state")
    c.lrs = list(_lrs(c.lrs, "cleaning.lrs"))
    c.k = list(_ks(c.k, "cleaning.k", c.size))
    methods(c)  # validates every entry


def methods(c: CleaningSpec) -> list[Method]:
    """The cleaning methods of the grid, each with its own learning rates and k values."""
    from clip_backdoor.cleaning import build_recipe

    out = []  # an empty list: a pre-training-only study (e.g. of defences)
    for i, entry in enumerate(c.methods):
        where = f"cleaning.methods[{i}]"
        entry, name, params = _recipe_entry(entry, where, "method",
                                            ("name", "params", "label", "lrs", "k", "batch_size"))
        try:
            recipe = build_recipe(name, params)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        label = entry.get("label") or _method_label(name, params)
        if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=,-]*", label):
            raise UserError(f"{where}.label: {label!r} must be a word usable as a directory name")
        lrs = _lrs(entry["lrs"], f"{where}.lrs") if "lrs" in entry else tuple(c.lrs)
        ks = _ks(entry["k"], f"{where}.k", c.size) if "k" in entry else tuple(c.k)
        batch = _integer(entry["batch_size"], f"{where}.batch_size", 1) if "batch_size" in entry else None
        out.append(Method(name, dict(recipe.params), label, lrs, ks, batch))
    _unique([m.label for m in out], "cleaning.methods (labels)")
    return out


def _method_label(name: str, params: dict) -> str:
    return ",".join([name, *(f"{k}={short_number(v)}" for k, v in sorted(params.items()))])


def short_number(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if x == 0 or (isinstance(x, int)):
        return str(x)
    mantissa, exponent = f"{x:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    exp = int(exponent)
    if -2 <= exp <= 3:  # 0.05, 0.95, 2, 100 read better plainly
        return f"{x:.6g}"
    return f"{mantissa}e{exp}"



def resolved_yaml(spec: StudySpec) -> str:
    """The spec with every default filled in, as saved in the study directory."""
    return yaml.safe_dump(to_dict(spec), sort_keys=False)
