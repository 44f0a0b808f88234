"""What a run ran on: the fingerprint written to every run directory as ``environment.json``.

Same seed and same thread count give identical numbers *on one machine and one install*; another
CPU (its vector unit), thread count, torch build or package version may not. So every run records:

- Python (version, implementation), the OS (``platform.platform()``, machine);
- torch: version, CUDA/cuDNN versions it was built with, ``torch.backends.cpu.get_cpu_capability()``,
  intra- and inter-op threads; the process's world size;
- the CPU model (``/proc/cpuinfo``) and its logical core count;
- the toolkit's version and git commit, and whether the tracked files had uncommitted changes
  (``dirty``; untracked files do not count, so a study's own outputs never make the tree dirty);
- when the run uses CUDA: the device name, its compute capability and the NVIDIA driver version;
- every installed distribution and its version.

``environment.json`` is ``{"fingerprints": [{"from_epoch": 0, ...}, ...]}``: one entry when a run ran
in one environment; a resumed run whose fingerprint differs logs one warning and appends the new one
with the epoch it resumed from. :func:`differences` compares fingerprints field by field (flattened,
e.g. ``packages.numpy``, ``torch.threads``), which the study report uses to say which runs differ.

This module also reads ``constraints.txt`` (:func:`read_pins`) and names installed distributions it
does not pin (:func:`unpinned`), which the test of the locked environment uses.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from clip_backdoor.fileio import write_json

log = logging.getLogger(__name__)

FILENAME = "environment.json"
PROJECT = "clip-backdoor"


# ------------------------------------------------------------------------------------------------
# Collecting
# ------------------------------------------------------------------------------------------------
def canonical_name(name: str) -> str:
    """A distribution name as PEP 503 compares them (``PyYAML`` = ``pyyaml``, ``a_b`` = ``a-b``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions() -> dict[str, str]:
    """{canonical name: version} of every distribution the running interpreter can import."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical_name(name), dist.version)  # the first on sys.path wins, as import does
    return dict(sorted(found.items()))


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model", "Hardware") and value.strip():
            return " ".join(value.split())
    return platform.processor() or None


def _git(args: list[str], where: Path) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def toolkit_info() -> dict[str, Any]:
    """The toolkit's version; its git commit and dirtiness when it runs from a git checkout."""
    import clip_backdoor

    package = Path(clip_backdoor.__file__).resolve().parent
    info: dict[str, Any] = {"version": clip_backdoor.__version__, "commit": None, "dirty": None}
    top = _git(["rev-parse", "--show-toplevel"], package)
    if top and (Path(top) / "pyproject.toml").is_file():  # the toolkit's own repository, not an outer one
        info["commit"] = _git(["rev-parse", "HEAD"], package)
        status = _git(["status", "--porcelain", "--untracked-files=no"], package)
        info["dirty"] = None if status is None else bool(status)
    return info


def nvidia_driver(proc: str | Path = "/proc/driver/nvidia/version") -> str | None:
    """The NVIDIA kernel driver's version (e.g. ``550.54.15``), from /proc, else ``nvidia-smi``."""
    try:
        match = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9][0-9.]+)", Path(proc).read_text())
        if match:
            return match.group(1)
    except OSError:
        pass
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


def collect(device: Any = None, world_size: int = 1) -> dict[str, Any]:
    """The fingerprint of this process, as it is now (call it after setting the thread count)."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    fingerprint: dict[str, Any] = {
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "os": {"platform": platform.platform(), "machine": platform.machine()},
        "cpu": {"model": cpu_model(), "logical_cores": os.cpu_count()},
        "torch": {"version": torch.__version__, "cuda_build": torch.version.cuda,
                  "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                  "world_size": world_size},
        "toolkit": toolkit_info(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        fingerprint["cuda"] = {"device": props.name, "capability": f"{props.major}.{props.minor}",
                               "driver": nvidia_driver(), "runtime": torch.version.cuda,
                               "cudnn": torch.backends.cudnn.version()}
    fingerprint["packages"] = installed_distributions()
    return fingerprint


# ------------------------------------------------------------------------------------------------
# Recording (one file per run)
# ------------------------------------------------------------------------------------------------
def read_environment(run_dir: str | Path) -> list[dict]:
    """The fingerprints recorded in ``run_dir/environment.json`` (oldest first); [] when absent or
    unreadable."""
    path = Path(run_dir) / FILENAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    entries = data.get("fingerprints") if isinstance(data, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _without_epoch(entry: Mapping) -> dict:
    return {k: v for k, v in entry.items() if k != "from_epoch"}


def record_environment(run_dir: str | Path, fingerprint: dict, *, start_epoch: int, fresh: bool) -> None:
    """Write (fresh start) or extend (resume in another environment) ``run_dir/environment.json``.

    A resumed run in the same environment leaves the file as it is."""
    path = Path(run_dir) / FILENAME
    entries = [] if fresh else read_environment(run_dir)
    if entries and _without_epoch(entries[-1]) == fingerprint:
        return
    if entries:
        changed = differences({"before": [entries[-1]], "now": [fingerprint]})
        fields = ", ".join(changed) if len(changed) <= 6 else ", ".join(list(changed)[:6]) + ", ..."
        log.warning("%s resumes at epoch %d in another environment than it started in (%s); both are "
                    "recorded in %s", run_dir, start_epoch, fields, FILENAME)
    write_json(path, {"fingerprints": [*entries, {"from_epoch": start_epoch, **fingerprint}]})


# ------------------------------------------------------------------------------------------------
# Comparing
# ------------------------------------------------------------------------------------------------
def flatten(fingerprint: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"torch": {"threads": 1}}`` -> ``{"torch.threads": 1}`` (``from_epoch`` left out)."""
    out: dict[str, Any] = {}
    for key, value in fingerprint.items():
        if not prefix and key == "from_epoch":
            continue
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(by_run: Mapping[str, Iterable[Mapping]]) -> dict[str, dict[str, list[str]]]:
    """Fields whose value is not the same in every recorded fingerprint:
    ``{field: {value as text: [run, ...]}}``, a run listed under each value it ran with (a run's
    later fingerprints are named ``run@epoch N``). A field missing from a fingerprint counts as a
    value ("absent")."""
    flat: list[tuple[str, dict[str, Any]]] = []
    for run, entries in by_run.items():
        for i, entry in enumerate(entries):
            label = run if i == 0 else f"{run}@epoch {entry.get('from_epoch', '?')}"
            flat.append((label, flatten(entry)))
    fields = sorted({f for _, values in flat for f in values})
    out: dict[str, dict[str, list[str]]] = {}
    for field in fields:
        values: dict[str, list[str]] = {}
        for label, entry in flat:
            text = json.dumps(entry[field]) if field in entry else "absent"
            values.setdefault(text, []).append(label)
        if len(values) > 1:
            out[field] = values
    return out


def common(fingerprints: Iterable[Mapping]) -> dict[str, Any]:
    """The flattened fields every fingerprint agrees on."""
    flats = [flatten(f) for f in fingerprints]
    if not flats:
        return {}
    first = flats[0]
    return {k: v for k, v in first.items() if all(k in f and f[k] == v for f in flats[1:])}


# ------------------------------------------------------------------------------------------------
# The locked environment (constraints.txt)
# ------------------------------------------------------------------------------------------------
def read_pins(text: str) -> dict[str, str]:
    """``name==version`` lines of a constraints file -> {canonical name: version}. Comments and blank
    lines are skipped; any other line is a ValueError naming it (the lock pins exact versions only)."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)", line)
        if not match:
            raise ValueError(f"line {number}: {raw.strip()!r} is not an exact pin (name==version)")
        pins[canonical_name(match.group(1))] = match.group(2)
    return pins


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def unpinned(installed: Mapping[str, str], pins: Mapping[str, str],
             ignore: Iterable[str] = (PROJECT,)) -> list[str]:
    """Installed distributions the pins do not cover, as ``name version (why)``.

    A pin without a local label matches a local build of that version (``torch==2.13.0`` is satisfied
    by ``2.13.0+cpu``, as pip decides)."""
    skip = {canonical_name(n) for n in ignore}
    problems = []
    for name, version in sorted(installed.items()):
        name = canonical_name(name)
        if name in skip:
            continue
        pin = pins.get(name)
        if pin is None:
            problems.append(f"{name} {version} (not pinned)")
        elif pin != version and not ("+" not in pin and _public(version) == pin):
            problems.append(f"{name} {version} (pinned to {pin})")
    return problems


def in_project_venv(repo: str | Path) -> bool:
    """True when this interpreter is ``<repo>/.venv``'s (the environment ``make install`` builds)."""
    venv = Path(repo) / ".venv"
    try:
        return Path(sys.prefix).resolve() == venv.resolve()
    except OSError:
        return False
