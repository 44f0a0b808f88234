"""How one run's wall time grows with the number of pre-training pairs, the evaluation size and the
cleaning-set size (3 points each), so that a larger study can be budgeted from the demo's.

    .venv/bin/python benchmarks/cost_growth.py               # the demo's settings, one torch thread
    .venv/bin/python benchmarks/cost_growth.py --epochs 1    # a faster, coarser table

Each point is one ``pretrain`` or ``clean`` command run in this process exactly as a study runs it
(tiny model, the demo's lr, batch and warm-up, evaluation of accuracy and ASR after every epoch) and
timed from its start to its end, so process start-up is excluded (a small run first takes the
first-use costs). Only the named size changes between the points of a row; the other two stay at
the demo's values (5,000 pairs, 1,000 test images, 400 cleaning pairs). The "per unit" column
divides by the size, so a flat column means linear growth. Writes benchmarks/results/cost_growth.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, finish, print_rows  # noqa: E402

from clip_backdoor.cli import main as cli_main  # noqa: E402

DEMO = {"pairs": 5000, "eval_n": 1000, "cleaning": 400}
POINTS = {"pairs": (2500, 5000, 10000), "eval_n": (500, 1000, 2000), "cleaning": (200, 400, 800)}


def _pretrain(run_dir: Path, pairs: int, eval_n: int, epochs: int) -> float:
    argv = ["pretrain", "--run-dir", str(run_dir), "--objective", "mmcl", "--epochs", str(epochs),
            "--lr", "2e-3", "--batch-size", "128", f"data.num_samples={pairs}", "data.workers=0",
            f"eval.n={eval_n}", "eval.trigger_params.size=8", "optim.warmup_steps=50",
            "optim.weight_decay=0.1", "threads=1"]
    start = time.perf_counter()
    if cli_main(argv) != 0:
        raise SystemExit(f"pretrain failed: {' '.join(argv)}")
    return time.perf_counter() - start


def _clean(run_dir: Path, checkpoint: Path, pairs: int, eval_n: int, epochs: int) -> float:
    # the cleaning set is the world's first `pairs` rows: its size, not its content, sets the time
    argv = ["clean", "--checkpoint", str(checkpoint), "--method", "cleanclip", "--run-dir", str(run_dir),
            "--epochs", str(epochs), "--lr", "3e-4", "--batch-size", "25", f"data.num_samples={pairs}",
            "data.workers=0", f"eval.n={eval_n}", "eval.trigger_params.size=8", "optim.warmup_steps=10",
            "threads=1"]
    start = time.perf_counter()
    if cli_main(argv) != 0:
        raise SystemExit(f"clean failed: {' '.join(argv)}")
    return time.perf_counter() - start


def measure(epochs: int, cleaning_epochs: int, work: Path, scale: float = 1.0) -> list[dict]:
    demo = {k: round(v * scale) for k, v in DEMO.items()}
    points = {k: tuple(round(v * scale) for v in vs) for k, vs in POINTS.items()}
    rows = []
    base = None
    # first-use costs (imports, kernels' first calls) would otherwise land on the first point
    _pretrain(work / "warm-up", points["pairs"][0], points["eval_n"][0], 1)
    for pairs in points["pairs"]:
        seconds = _pretrain(work / f"pre-{pairs}", pairs, demo["eval_n"], epochs)
        rows.append({"grows": "pre-training pairs", "size": pairs, "seconds": seconds})
        if pairs == demo["pairs"]:
            base = work / f"pre-{pairs}" / "checkpoints" / "latest.pt"
    for n in points["eval_n"]:
        if n == demo["eval_n"]:  # the pairs row already ran this point
            seconds = next(r["seconds"] for r in rows if r["size"] == demo["pairs"])
        else:
            seconds = _pretrain(work / f"pre-eval-{n}", demo["pairs"], n, epochs)
        rows.append({"grows": "evaluation images (pre-training run)", "size": n, "seconds": seconds})
    for pairs in points["cleaning"]:
        seconds = _clean(work / f"clean-{pairs}", base, pairs, demo["eval_n"], cleaning_epochs)
        rows.append({"grows": "cleaning pairs (CleanCLIP run)", "size": pairs, "seconds": seconds})
    for r in rows:
        r["ms_per_unit"] = 1000.0 * r["seconds"] / r["size"]
    return rows


def print_table(result: dict) -> None:
    print(f"pre-training {result['epochs']} epochs, cleaning {result['cleaning_epochs']} epochs, "
          f"one torch thread; load average {result['load_average_before'][0]:.2f} -> "
          f"{result['load_average_after'][0]:.2f}")
    print_rows([("grows", "grows", "<38"), ("size", "size", ">6d"), ("seconds", "seconds", ">8.1f"),
                ("ms per unit", "ms_per_unit", ">11.2f")], result["rows"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=8, help="pre-training epochs (the demo's 8)")
    p.add_argument("--cleaning-epochs", type=int, default=5, help="cleaning epochs (the demo's 5)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every size (smoke tests: 0.2)")
    p.add_argument("--out", type=Path,
                   default=Path(__file__).resolve().parent / "results" / "cost_growth.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cost-growth-") as tmp:
        rows = measure(args.epochs, args.cleaning_epochs, Path(tmp), args.scale)
    result = {"epochs": args.epochs, "cleaning_epochs": args.cleaning_epochs, "scale": args.scale,
              "rows": rows,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "environment": environment(threads=1)}
    return finish(args.out, result, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
