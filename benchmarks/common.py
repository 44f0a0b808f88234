"""What every benchmark script shares: the environment record, the load line, table printing and the
JSON-then-table ending. Scripts import it by path (they are run as files, not as a package)."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from clip_backdoor.fileio import write_json


def environment(**extra) -> dict:
    """torch/python versions, the CPU's name and core count, plus whatever the script adds."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), **extra}


def load_line(result: dict) -> str:
    return f"load average {result['load_average_before'][0]:.2f} -> {result['load_average_after'][0]:.2f}"


def print_rows(columns: Sequence[tuple[str, str, str]], rows: Sequence[dict]) -> None:
    """A fixed-width table: ``columns`` are ``(title, key, format)``, e.g. ``("ms/step", "ms", ">8.1f")``;
    the title takes the format's alignment and width."""
    def cell_format(fmt: str) -> str:
        return fmt.split(".")[0].rstrip("df")

    header = " ".join(f"{title:{cell_format(fmt)}}" for title, _, fmt in columns)
    print(header)
    print("-" * len(header))
    for row in rows:
        print(" ".join(f"{row[key]:{fmt}}" for _, key, fmt in columns))


def finish(out: Path, result: dict, print_table: Callable[[dict], None]) -> int:
    """Write the JSON (atomically), print the table, say where the JSON went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print_table(result)
    print(f"\nwrote {out}")
    return 0
