"""``clip-backdoor demo``: the paper's whole study at toy scale, end to end, on CPU.

Runs ``configs/demo.yaml`` (poison -> pre-train MMCL and MMCL+SSL -> clean with CleanCLIP, MMCL-only
and SSL-only over a learning-rate grid -> results.csv -> report), prints the headline table and
says where the report is. ``--quick`` is the same study with every size shrunk (a smoke test that
the test suite runs); its numbers mean little. Rerunning skips what is finished.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import clip_backdoor
from clip_backdoor.errors import UserError

log = logging.getLogger(__name__)

# --quick: the demo study shrunk to a few minutes on 2 cores (same grid shape, smaller everything).
QUICK = [
    "name=demo-quick",
    "seeds=[0]",
    "data.num_samples=4000",
    "attack.n=800",  # the demo's 20% poison rate
    "pretrain.epochs=5",
    "pretrain.objectives=[mmcl, {name: mmcl+ssl, epochs: 1}]",  # SSL steps cost ~3x; one epoch shows it runs
    "pretrain.warmup_steps=20",
    "cleaning.size=200",
    "cleaning.batch_size=50",  # 4 steps per epoch: the grid's shape, at the smoke test's cost
    "cleaning.lrs=[1e-4,1e-3]",
    "cleaning.epochs=2",
    "cleaning.warmup_steps=2",
    "eval.n=500",  # the test asks for acc1 3 sigma above chance; 200 images made that borderline
]


def demo_config() -> Path:
    """configs/demo.yaml of the repository this package is installed from (src layout)."""
    candidates = [Path(clip_backdoor.__file__).resolve().parents[2] / "configs" / "demo.yaml",
                  Path.cwd() / "configs" / "demo.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    raise UserError("configs/demo.yaml not found next to the package or in the current directory; "
                    "run from the repository, or pass --config FILE")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clip-backdoor demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the same study with every size shrunk (minutes)")
    p.add_argument("--out", help="study directory (default runs/demo, or runs/demo-quick with --quick)")
    p.add_argument("--jobs", type=int, help="runs in parallel (default: run.jobs in the config)")
    p.add_argument("--config", help="another study file (default: configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. seeds=[0,1,2]")
    return p


def main(argv: list[str]) -> int:
    from clip_backdoor.study.runner import load_for_command, run_study

    args = build_parser().parse_intermixed_args(argv)
    config = Path(args.config) if args.config else demo_config()
    overrides = (QUICK if args.quick else []) + list(args.overrides)
    spec = load_for_command(str(config), overrides, args.jobs)
    out = Path(args.out or Path("runs") / spec.name)
    log.info("demo: %s%s -> %s", config, " (--quick)" if args.quick else "", out)
    code = run_study(spec, out)  # Ctrl-C: cli.main says how to go on, exit 130
    index = out / "report" / "index.html"
    if index.is_file():
        print(f"\nReport: {index}  (tables: {out / 'report'}, every point: {out / 'results.csv'})")
    return code
