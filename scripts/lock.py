"""Regenerate constraints.txt: every package `make install` puts in .venv, pinned to an exact version.

    make lock                       # = python3 scripts/lock.py
    python3 scripts/lock.py --from .venv/bin/python    # freeze an existing environment instead

By default it builds a fresh temporary virtual environment, installs the project exactly as
`make install` does (`pip install -c <torch pin> --upgrade pip setuptools wheel`, then
`pip install -c <torch pin> -e '.[dev]'`) with only the torch pin below as a constraint, so
everything else resolves to what the package index offers today, and writes `pip freeze --all`
(the project itself left out) to constraints.txt, atomically, under the explanatory header.
It needs the package index (network); it changes nothing else. Standard library only: it runs
before anything is installed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The one hand-chosen pin: the CPU build of torch this project is developed and tested with.
TORCH_PIN = "torch==2.13.0"
PROJECT = "clip-backdoor"
HEADER = f"""\
# The locked environment: every package `make install` puts in .venv, at an exact version.
# Every install goes through `pip install -c constraints.txt`, so a fresh clone gets these versions,
# not whatever is newest on the day (which changed the demo's numbers once: issue 16).
# The CPU build of torch 2.13.0 is what this machine (and CI) has; an unpinned install pulls
# gigabytes of CUDA packages.
# Regenerate with `make lock` (scripts/lock.py: a fresh temporary venv, only `{TORCH_PIN}` as a
# constraint, then `pip freeze --all`); do not edit the pins by hand. tests/test_lock.py fails when an
# installed package is not pinned here.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(cmd: list[str], **kwargs) -> str:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE, **kwargs).stdout


def fresh_install(workdir: Path, python: str) -> str:
    """The python of a new venv in ``workdir`` with the project installed as `make install` does."""
    venv = workdir / "venv"
    run([python, "-m", "venv", str(venv)])
    seed = workdir / "seed-constraints.txt"
    seed.write_text(TORCH_PIN + "\n", encoding="utf-8")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
           "-c", str(seed)]
    run([*pip, "--upgrade", "pip", "setuptools", "wheel"])
    run([*pip, "-e", f"{REPO}[dev]"], cwd=REPO)
    return str(venv / "bin" / "python")


def pins_of(python: str) -> list[str]:
    """``name==version`` of every distribution in that environment, the project left out, torch as
    the pin says (a local build label such as +cpu is not on the index)."""
    frozen = run([python, "-m", "pip", "freeze", "--all", "--exclude-editable",
                  "--disable-pip-version-check"])
    pins = {}
    for line in frozen.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e")):
            continue
        if "==" not in line:
            raise SystemExit(f"lock: cannot pin {line!r} (installed from a path or URL?)")
        name, version = line.split("==", 1)
        if canonical(name) == PROJECT:
            continue
        if canonical(name) == "torch":
            torch_version = TORCH_PIN.split("==", 1)[1]
            if version.split("+", 1)[0] != torch_version:
                raise SystemExit(f"lock: the environment has torch {version}, the pin says {TORCH_PIN}")
            version = torch_version
        pins[canonical(name)] = f"{name}=={version}"
    return [pins[k] for k in sorted(pins)]


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", metavar="PYTHON",
                        help="freeze this interpreter's environment instead of building a fresh one")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that makes the fresh venv")
    parser.add_argument("--out", default=str(REPO / "constraints.txt"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clip-backdoor-lock-") as workdir:
        python = args.source or fresh_install(Path(workdir), args.python)
        pins = pins_of(python)
    write_atomically(Path(args.out), HEADER + "\n".join(pins) + "\n")
    print(f"lock: {len(pins)} pins written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
