"""Where a study's time goes: run it in one process under cProfile and split the wall time by stage.

    python benchmarks/profile_study.py                      # the demo's seed 0 (configs/demo.yaml)
    python benchmarks/profile_study.py --quick              # the --quick demo
    python benchmarks/profile_study.py -- seeds=[0] eval.n=1000   # any study override after --

Runs are executed one at a time in this process with one torch thread (the demo runs two such jobs
side by side on two cores, so the shares carry over; the wall time halves). Dataloader workers are
turned off (``data.workers=0``) so that data loading is measured too. Buckets are disjoint: each is a
set of functions whose cumulative time is counted once; "other" is the rest of the wall time.
Process start (a fresh interpreter importing torch and the toolkit) is timed separately, since a
spawned study worker pays it once. Writes benchmarks/results/profile_study.json.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, finish  # noqa: E402

# bucket -> (module path suffix, function name) pairs; the first match in this order wins for nesting
BUCKETS = {
    "evaluation: zero-shot classifier (text tower)": [("evaluate.py", "build_classifier")],
    "evaluation: eval images (render + trigger)": [("evaluate.py", "__getitem__")],
    "evaluation: image forward passes": [("evaluate.py", "image_logits")],
    "training: data source build (cached world render)": [("loop.py", "build_loader")],
    "training: batches (render, tokenise, EDA)": [("loader.py", "_indexed"), ("loader.py", "_streamed"),
                                                  ("loader.py", "_collate")],
    "training: SSL image views": [("autoaugment.py", "__call__")],
    "training: forward + loss (without the views)": [("loop.py", "_forward_losses")],
    "training: backward": [("_tensor.py", "backward")],
    "training: optimizer step": [("grad_scaler.py", "step")],
    "checkpoint writes": [("checkpoint.py", "save_checkpoint")],
    "deep-clustering / recipe epoch hooks": [("cleaning.py", "on_epoch_start")],
    "metrics.jsonl writes": [("fileio.py", "write_jsonl")],
    "data stages (poisons, cleaning sets)": [("data_stages.py", "make_poison"),
                                             ("data_stages.py", "make_cleaning_set")],
    "report and results.csv": [("results.py", "report")],
    "model build / checkpoint load": [("loop.py", "_build_model")],
}


def bucket_times(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds per bucket; nested matches (a bucket's function called inside another
    bucket's) are not subtracted, so the buckets are chosen not to nest."""
    out = dict.fromkeys(BUCKETS, 0.0)
    for (path, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        for bucket, patterns in BUCKETS.items():
            if any(path.endswith(suffix) and name == fn for suffix, fn in patterns):
                out[bucket] += ct
                break
    return out


def process_start_seconds() -> float:
    code = "import torch, clip_backdoor.study.runner, clip_backdoor.train.loop, clip_backdoor.evaluate"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - started


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "profile_study.json")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    import torch

    from clip_backdoor.demo import QUICK, demo_config
    from clip_backdoor.study.runner import load_for_command, run_study

    torch.set_num_threads(1)
    overrides = (QUICK if args.quick else []) + ["run.jobs=1", "run.threads=1", "data.workers=0",
                                                 *args.overrides]
    spec = load_for_command(str(demo_config()), overrides)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        code = run_study(spec, Path(tmp) / spec.name)
        profiler.disable()
        wall = time.perf_counter() - started
    if code:
        print("the study failed", file=sys.stderr)
        return code
    buckets = bucket_times(pstats.Stats(profiler))
    # The only nesting: the views are drawn inside _forward_losses.
    buckets["training: forward + loss (without the views)"] -= buckets["training: SSL image views"]
    buckets["other (loop bookkeeping, logging, ...)"] = wall - sum(buckets.values())
    result = {"environment": environment(), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "overrides": overrides, "wall_seconds": wall,
              "process_start_seconds": process_start_seconds(), "buckets": buckets}

    def table(r: dict) -> None:
        print(f"study wall time {r['wall_seconds']:.0f} s in one process, one thread "
              f"(load {r['load_average_before'][0]:.1f} -> {r['load_average_after'][0]:.1f}); "
              f"a fresh worker process starts in {r['process_start_seconds']:.1f} s")
        for name, seconds in sorted(r["buckets"].items(), key=lambda kv: -kv[1]):
            print(f"  {name:<48} {seconds:8.1f} s  {100 * seconds / r['wall_seconds']:5.1f}%")

    return finish(args.out, result, table)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
