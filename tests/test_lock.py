"""The locked environment: constraints.txt pins every package `make install` puts in .venv, exactly.

The check of the running environment needs the project's own `.venv` (what `make install` builds);
run from elsewhere it skips with one line. The comparison itself is tested on constructed cases.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from _scripts import load_script
from clip_backdoor.environment import in_project_venv, installed_distributions, read_pins, unpinned

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"


def test_constraints_pin_exact_versions_and_torch_stays_the_cpu_build():
    pins = read_pins(CONSTRAINTS.read_text(encoding="utf-8"))
    assert pins["torch"] == "2.13.0"
    assert "clip-backdoor" not in pins  # the project itself is installed from the checkout
    for name in ("numpy", "pillow", "pyyaml", "pytest", "ruff", "scipy", "pip", "setuptools", "wheel"):
        assert name in pins, name
    assert CONSTRAINTS.read_text(encoding="utf-8").startswith("# ")  # the explanatory header


@pytest.mark.skipif(not in_project_venv(REPO), reason=f"not running in {REPO / '.venv'} (make install's "
                    "environment), so its packages say nothing about the lock")
def test_every_installed_package_is_pinned():
    problems = unpinned(installed_distributions(), read_pins(CONSTRAINTS.read_text(encoding="utf-8")))
    assert not problems, ("installed but not pinned in constraints.txt (run `make lock`): "
                          + "; ".join(problems))


def test_unpinned_names_what_is_missing_or_different():
    pins = read_pins("# header\n\ntorch==2.13.0\nPyYAML==6.0.4  # comment\ntyping_extensions==4.16.0\n")
    assert pins == {"torch": "2.13.0", "pyyaml": "6.0.4", "typing-extensions": "4.16.0"}
    installed = {"torch": "2.13.0+cpu", "pyyaml": "6.0.4", "typing-extensions": "4.16.0",
                 "clip-backdoor": "0.1.0"}
    assert unpinned(installed, pins) == []  # a local build meets an unlabelled pin; the project is skipped
    assert unpinned({**installed, "numpy": "2.4.6"}, pins) == ["numpy 2.4.6 (not pinned)"]
    assert unpinned({**installed, "pyyaml": "6.0.5"}, pins) == ["pyyaml 6.0.5 (pinned to 6.0.4)"]
    assert unpinned({"torch": "2.13.0+cu121"}, {"torch": "2.13.0+cpu"}) == \
        ["torch 2.13.0+cu121 (pinned to 2.13.0+cpu)"]


@pytest.mark.parametrize("line", ["torch>=2.1", "numpy", "-e .", "torch==2.13.0; python_version<'3.12'"])
def test_a_line_that_is_not_an_exact_pin_is_refused(line):
    with pytest.raises(ValueError, match="line 2: .* is not an exact pin"):
        read_pins("# header\n" + line + "\n")


def test_lock_script_freezes_an_environment_without_the_project(tmp_path):
    """`scripts/lock.py --from PYTHON` (the path `make lock` takes after its fresh install)."""
    lock = load_script("scripts/lock.py")
    out = tmp_path / "constraints.txt"
    assert lock.main(["--from", sys.executable, "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith(lock.HEADER)
    pins = read_pins(text)
    assert pins["torch"] == "2.13.0" and "clip-backdoor" not in pins and "pip" in pins
    assert unpinned(installed_distributions(), pins) == []  # it pins everything this interpreter has
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically, no temp left


def test_lock_pins_leave_out_the_project_and_keep_torch_as_pinned(monkeypatch):
    """pins_of on a constructed `pip freeze`: the project (editable or not) is left out, torch's local
    build label is dropped, a package installed from a path cannot be pinned."""
    lock = load_script("scripts/lock.py")
    frozen = ("PyYAML==6.0.4\nclip_backdoor==0.1.0\n-e /work/repo\ntorch==2.13.0+cpu\n# comment\n"
              "numpy==2.4.6\n")
    monkeypatch.setattr(lock, "run", lambda cmd, **kwargs: frozen)
    assert lock.pins_of("python") == ["numpy==2.4.6", "PyYAML==6.0.4", "torch==2.13.0"]
    monkeypatch.setattr(lock, "run", lambda cmd, **kwargs: "torch==2.12.0+cpu\n")
    with pytest.raises(SystemExit, match="the environment has torch 2.12.0"):
        lock.pins_of("python")
    monkeypatch.setattr(lock, "run", lambda cmd, **kwargs: "mylib @ file:///tmp/mylib\n")
    with pytest.raises(SystemExit, match="cannot pin 'mylib @ file:///tmp/mylib'"):
        lock.pins_of("python")
