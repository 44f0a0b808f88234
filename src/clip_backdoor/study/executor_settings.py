"""What ``run.executor``, ``run.slurm`` and ``run.ray`` may say, checked without importing submitit or
ray: ``spec.py`` validates a study file with these, and the executors (``slurm.py``, ``ray_tasks.py``)
run with the settings they return. See those modules for what each setting does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from clip_backdoor.errors import UserError

EXECUTORS = ("local", "slurm", "ray")


# ----------------------------------------------------------------------------------------------
# run.slurm
# ----------------------------------------------------------------------------------------------
CLUSTERS = ("slurm", "local", "debug")
_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
_TIME = re.compile(r"(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)")
_MEM = re.compile(r"\d+[KMGT]?")
_OPTION = re.compile(r"[a-z][a-z0-9-]*")


@dataclass
class Resources:
    """What one job asks SLURM for; None leaves the cluster's default."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: Any = "24:00:00"  # a string (see time_minutes)
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    constraint: str | None = None
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: time to finish a step and save
    array_parallelism: int = 256  # cleaning arrays: at most this many tasks at once
    setup: list = field(default_factory=list)  # shell lines before the run (module load, source venv)
    additional: dict = field(default_factory=dict)  # any other sbatch option, e.g. {exclusive: true}


@dataclass
class SlurmSettings:
    cluster: str = "slurm"
    folder: str | None = None  # submitit's job files and logs; default <study>/slurm
    poll_s: float = 30.0  # how often the driver asks SLURM about its jobs
    pretrain: Resources = field(default_factory=Resources)
    clean: Resources = field(default_factory=Resources)


RESOURCE_KEYS = tuple(f.name for f in fields(Resources))


def parse_slurm(data: dict, where: str = "run.slurm") -> SlurmSettings:
    """Validate ``run.slurm``: shared keys at its top, ``pretrain:`` / ``clean:`` override them."""
    from clip_backdoor.config import from_dict

    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {data!r}")
    valid = {"cluster", "folder", "poll_s", "pretrain", "clean", *RESOURCE_KEYS}
    for key in data:
        if key not in valid:
            raise UserError(f"{where}.{key}: unknown key (valid: {', '.join(sorted(valid))})")
    shared = {k: v for k, v in data.items() if k in RESOURCE_KEYS}
    stages = {}
    for stage in ("pretrain", "clean"):
        own = data.get(stage) or {}
        if not isinstance(own, dict):
            raise UserError(f"{where}.{stage}: expected a mapping, got {own!r}")
        for key in own:
            if key not in RESOURCE_KEYS:
                raise UserError(f"{where}.{stage}.{key}: unknown key (valid: {', '.join(RESOURCE_KEYS)})")
        from_dict(Resources, shared, where)  # type errors named where the key was written
        from_dict(Resources, own, f"{where}.{stage}")
        stages[stage] = from_dict(Resources, {**shared, **own}, where)
        _check_resources(stages[stage], lambda key, s=stage, o=own: f"{where}.{s}.{key}" if key in o
                         else f"{where}.{key}")
    clean = stages["clean"]
    if clean.nodes * clean.tasks_per_node != 1:
        raise UserError(f"{where}.clean: a cleaning run is one process (nodes 1, tasks_per_node 1)")
    settings = SlurmSettings(cluster=data.get("cluster", "slurm"), folder=data.get("folder"),
                             poll_s=data.get("poll_s", 30.0), **stages)
    if settings.cluster not in CLUSTERS:
        raise UserError(f"{where}.cluster: {settings.cluster!r} is not one of {', '.join(CLUSTERS)}")
    if settings.folder is not None and not isinstance(settings.folder, str):
        raise UserError(f"{where}.folder: expected a path, got {settings.folder!r}")
    poll = settings.poll_s
    if isinstance(poll, bool) or not isinstance(poll, int | float) or poll <= 0:
        raise UserError(f"{where}.poll_s: {settings.poll_s!r} must be a number of seconds > 0")
    return settings


def _check_resources(r: Resources, at) -> None:
    """``at(key)``: where the user wrote the key (its stage section or the shared one)."""
    for key in ("partition", "account", "qos"):
        value = getattr(r, key)
        if value is None:
            continue
        names = value.split(",") if key == "partition" else [value]
        if not isinstance(value, str) or not all(_NAME.fullmatch(n) for n in names):
            raise UserError(f"{at(key)}: {value!r} is not a SLURM {key} name (letters, digits, '_', '.', "
                            f"'-'{', comma-separated' if key == 'partition' else ''})")
    time_minutes(r.time, at("time"))
    for key, minimum in (("nodes", 1), ("tasks_per_node", 1), ("gpus_per_node", 0), ("cpus_per_task", 1),
                         ("signal_delay_s", 0), ("array_parallelism", 1)):
        value = getattr(r, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise UserError(f"{at(key)}: {value!r} is not an integer >= {minimum}")
    if r.mem is not None and not (isinstance(r.mem, str) and _MEM.fullmatch(r.mem)):
        raise UserError(f"{at('mem')}: {r.mem!r} is not a SLURM memory size (an integer with an optional "
                        "unit K, M, G or T, e.g. 64G)")
    if r.constraint is not None and (not isinstance(r.constraint, str)
                                     or any(c.isspace() for c in r.constraint)):
        raise UserError(f"{at('constraint')}: {r.constraint!r} must be one word (e.g. a100|h100)")
    if not all(isinstance(line, str) for line in r.setup):
        raise UserError(f"{at('setup')}: expected a list of shell lines")
    for key, value in r.additional.items():
        if not isinstance(key, str) or not _OPTION.fullmatch(key.replace("_", "-")):
            raise UserError(f"{at('additional')}: {key!r} is not an sbatch option name")
        if not isinstance(value, str | int | bool):
            raise UserError(f"{at('additional')}.{key}: {value!r} must be a string, number or true")


def time_minutes(value: Any, where: str) -> int:
    """SLURM's --time in whole minutes (submitit wants an integer), or a one-line error. A number is
    refused: YAML reads an unquoted 24:00:00 as the integer 86400, which would silently mean minutes."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise UserError(f"{where}: {value!r} is a number; write a SLURM time as a quoted string, e.g. "
                        "\"24:00:00\" or \"90\" (YAML reads an unquoted 24:00:00 as 86400)")
    match = _TIME.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise UserError(f"{where}: {value!r} is not a SLURM time (minutes, M:S, H:M:S, D-H, D-H:M or "
                        "D-H:M:S)")
    d, dh, dm, ds, m, ms, hs = (int(g) if g else 0 for g in match.groups())
    if match.group(1) is not None:
        seconds = ((d * 24 + dh) * 60 + dm) * 60 + ds
    elif match.group(7) is not None:  # H:M:S
        seconds = (m * 60 + ms) * 60 + hs
    else:  # M or M:S
        seconds = m * 60 + ms
    if seconds <= 0:
        raise UserError(f"{where}: {value!r} is no time at all")
    return -(-seconds // 60)


# ----------------------------------------------------------------------------------------------
# run.ray
# ----------------------------------------------------------------------------------------------
STAGE_KEYS = ("num_cpus", "num_gpus")


@dataclass
class TaskResources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class RaySettings:
    address: str | None = None
    max_retries: int = 3
    connect_timeout_s: float = 10.0
    local_cpus: int | None = None  # a Ray started here: its CPUs (default: all of this machine's)
    local_gpus: int | None = None
    object_store_mb: int | None = None
    pretrain: TaskResources = field(default_factory=TaskResources)
    clean: TaskResources = field(default_factory=TaskResources)


def parse_ray(data: dict, where: str = "run.ray") -> RaySettings:
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {data!r}")
    top = ("address", "max_retries", "connect_timeout_s", "local_cpus", "local_gpus", "object_store_mb")
    valid = {*top, *STAGE_KEYS, "pretrain", "clean"}
    for key in data:
        if key not in valid:
            raise UserError(f"{where}.{key}: unknown key (valid: {', '.join(sorted(valid))})")
    shared = {k: data[k] for k in STAGE_KEYS if k in data}
    stages = {}
    for stage in ("pretrain", "clean"):
        own = data.get(stage) or {}
        if not isinstance(own, dict):
            raise UserError(f"{where}.{stage}: expected a mapping, got {own!r}")
        merged = {**shared, **own}
        for key, value in merged.items():
            at = f"{where}.{stage}.{key}" if key in own else f"{where}.{key}"
            if key not in STAGE_KEYS:
                raise UserError(f"{at}: unknown key (valid: {', '.join(STAGE_KEYS)})")
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise UserError(f"{at}: {value!r} must be a number >= 0")
        stages[stage] = TaskResources(**{k: float(v) for k, v in merged.items()})
        gpus = stages[stage].num_gpus
        if gpus > 1 and not gpus.is_integer():
            raise UserError(f"{where}.{stage}.num_gpus: {gpus:g} GPUs: more than one must be a whole number "
                            "(one torchrun process per GPU)")
    if stages["clean"].num_gpus > 1:
        raise UserError(f"{where}.clean.num_gpus: a cleaning run is one process (at most 1 GPU)")
    settings = RaySettings(**{k: data[k] for k in top if k in data}, **stages)
    if settings.address is not None and (not isinstance(settings.address, str) or not settings.address):
        raise UserError(f"{where}.address: expected host:port, ray://host:port or auto, "
                        f"got {settings.address!r}")
    for key, minimum in (("max_retries", 0), ("local_cpus", 1), ("local_gpus", 0), ("object_store_mb", 80)):
        value = getattr(settings, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise UserError(f"{where}.{key}: {value!r} is not an integer >= {minimum}")
    if isinstance(settings.connect_timeout_s, bool) or not settings.connect_timeout_s > 0:
        raise UserError(f"{where}.connect_timeout_s: {settings.connect_timeout_s!r} must be > 0")
    return settings
