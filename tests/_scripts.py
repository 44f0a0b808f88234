"""Repository scripts (benchmarks/, scripts/) are not a package: tests load them by path."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """``load_script("benchmarks/evaluate.py")``: the script as a fresh module."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_keeping_threads(main, argv: list[str]) -> int:
    """A benchmark's ``main(argv)``; it sets torch's thread count, which the rest of the suite keeps."""
    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)
