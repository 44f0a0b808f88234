"""Training-step throughput of a CLIP config: forward + backward + AdamW step, in samples/s.

Measures MMCL (B images, B captions) and MMCL+SSL (originals and one augmented view of each modality
in one concatenated forward pass: 2B images, 2B captions) in fp32 and under bf16 autocast, and the
FLOP rate achieved (FLOPs counted with torch.utils.flop_counter) against the peak of a large matmul
measured in the same run. Inputs are random tensors: the cost of producing augmented views on the
data side is benchmarked elsewhere.

Every setting is also timed on the same-process reference (``reference_clip.py``: the same config and
weights written the plain open_clip way, NCHW, default attention, ``torch.optim.AdamW`` defaults), in
the same alternating rounds, and the speed-up over it is printed (``--no-reference`` skips it).

    .venv/bin/python benchmarks/train_step.py                      # tiny, batch 128, all cores
    .venv/bin/python benchmarks/train_step.py --model small --batch 64 --threads 1

Writes JSON (default benchmarks/results/train_step.json) and prints a table. Timings depend on
what else the machine is doing: the load average before and after is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from clip_backdoor.models import create_model
from clip_backdoor.objectives import Objective, split_views
from clip_backdoor.train.optim import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, finish, load_line, print_rows  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "train_step.json"
# Targets for the CPU workhorse config (tiny, batch 128) on a 2-core machine.
TARGET_MMCL_BF16_SAMPLES_PER_S = 1000.0
TARGET_SSL_OVER_MMCL = 2.0
# Speed-up over the eager reference CLIP timed in the same process (issue: >= 1.5x bf16, >= 1.1x fp32).
TARGET_SPEEDUP = {"bf16": 1.5, "fp32": 1.1}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="registered model name or config .json (default tiny)")
    p.add_argument("--batch", type=int, default=128, help="pairs per step (default 128)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--objectives", default="mmcl,mmcl+ssl", help="comma-separated (default mmcl,mmcl+ssl)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--matmul-size", type=int, default=2048, help="side of the peak matmul (default 2048)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    p.add_argument("--no-reference", action="store_true", help="do not time the eager reference CLIP")
    return p.parse_args(argv)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best rate of a size x size matmul: the ceiling the training step's FLOP rate is compared to."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device, dtype)
    b = torch.randn(size, size, generator=g).to(device, dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


class TrainStep:
    """One optimisation step on fixed random inputs, built as the training loop builds it."""

    def __init__(self, model_name: str, batch: int, objective_name: str, device: torch.device,
                 precision: str, impl: str = "ours"):
        self.device, self.precision, self.objective_name, self.impl = device, precision, objective_name, impl
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.model = create_model(model_name, seed=0)
        if impl == "reference":
            from reference_clip import reference_from, reference_optimizer

            self.model = reference_from(self.model).to(device).train()
            self.optimizer = reference_optimizer(self.model, lr=1e-4, weight_decay=0.1)
        else:
            self.model = self.model.to(device).train()
            self.optimizer = build_optimizer(self.model, lr=1e-4, weight_decay=0.1)
        self.objective = Objective.from_name(objective_name)
        self.batch = batch
        # With SSL, originals and augmented views travel as one concatenated batch.
        rows = 2 * batch if self.objective.uses_ssl else batch
        g = torch.Generator().manual_seed(0)
        size, context = self.model.image_size, self.model.context_length
        self.images = torch.randn(rows, 3, size, size, generator=g).to(device)
        self.texts = torch.randint(1, 49406, (rows, context), generator=g)
        self.texts[:, context // 2] = 49407  # an end-of-text token mid-sequence, as real captions have
        self.texts = self.texts.to(device)

    def forward_backward(self) -> dict:
        with autocast(self.device, self.precision):
            out = self.model(image=self.images, text=self.texts)
        features = {"image_features": out["image_features"], "text_features": out["text_features"]}
        if self.objective.uses_ssl:
            u, u_aug = split_views(out["image_features"], self.batch)
            v, v_aug = split_views(out["text_features"], self.batch)
            features = {"image_features": u, "text_features": v,
                        "image_aug_features": u_aug, "text_aug_features": v_aug}
        losses = self.objective(**features, logit_scale=out["logit_scale"])
        losses["loss"].backward()
        return losses

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_backward()
        self.optimizer.step()
        self.model.clamp_logit_scale()

    def count_flops(self) -> int:
        """FLOPs of forward + backward (the optimizer's elementwise work is not counted)."""
        counter = FlopCounterMode(display=False)
        with counter:
            self.forward_backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def measure(steps: list[TrainStep], n_steps: int, warmup: int) -> None:
    """Time the settings in turns (one step each per round), so a change in machine load during the
    run hits every setting alike and their ratios stay fair. Records wall and process CPU time."""
    for step in steps:
        for _ in range(warmup):
            step()
    for _ in range(n_steps):
        for step in steps:
            synchronize(step.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            synchronize(step.device)
            step.times.append(time.perf_counter() - start)
            step.cpu_times.append(time.process_time() - cpu_start)


def summarise(step: TrainStep, flops: int, peaks: dict[str, float]) -> dict:
    seconds = statistics.median(step.times)
    gflops_per_s = flops / seconds / 1e9
    return {
        "impl": step.impl, "objective": step.objective_name, "precision": step.precision, "batch": step.batch,
        "images_per_step": step.images.shape[0],
        "step_ms_median": 1000 * seconds, "step_ms_min": 1000 * min(step.times),
        "step_ms_max": 1000 * max(step.times),
        # CPU seconds the process spent per step (all threads): less sensitive to other load.
        "cpu_ms_per_step_median": 1000 * statistics.median(step.cpu_times),
        "samples_per_s": step.batch / seconds,
        "gflop_per_step": flops / 1e9, "gflop_per_s": gflops_per_s,
        "fraction_of_matmul_peak": gflops_per_s / peaks[step.precision],
    }


def target_checks(runs: list[dict], precisions: list[str]) -> dict:
    refs = {(r["objective"], r["precision"]): r for r in runs if r["impl"] == "reference"}
    by_key = {(r["objective"], r["precision"]): r for r in runs if r["impl"] == "ours"}
    checks: dict[str, object] = {}
    for key, ref in refs.items():
        speedup = ref["step_ms_median"] / by_key[key]["step_ms_median"]
        objective, precision = key
        checks[f"speed-up over the eager reference, {objective} {precision}"] = round(speedup, 3)
        if precision in TARGET_SPEEDUP:
            checks[f"{objective} {precision} >= {TARGET_SPEEDUP[precision]}x the reference"] = (
                speedup >= TARGET_SPEEDUP[precision])
    if ("mmcl", "bf16") in by_key:
        rate = by_key["mmcl", "bf16"]["samples_per_s"]
        checks[f"mmcl bf16 >= {TARGET_MMCL_BF16_SAMPLES_PER_S:.0f} samples/s"] = (
            rate >= TARGET_MMCL_BF16_SAMPLES_PER_S)
    for precision in precisions:
        mmcl, both = by_key.get(("mmcl", precision)), by_key.get(("mmcl+ssl", precision))
        if mmcl and both:
            ratio = both["step_ms_median"] / mmcl["step_ms_median"]
            checks[f"mmcl+ssl / mmcl step time, {precision}"] = round(ratio, 3)
            name = f"mmcl+ssl step <= {TARGET_SSL_OVER_MMCL}x mmcl, {precision}"
            checks[name] = ratio <= TARGET_SSL_OVER_MMCL
    return checks


def print_table(result: dict) -> None:
    print(f"\n{result['model']} batch {result['batch']}, {result['environment']['threads']} threads, "
          f"{load_line(result)}")
    print(f"matmul peak: fp32 {result['matmul_peak_gflop_per_s']['fp32']:.0f} GFLOP/s, "
          f"bf16 {result['matmul_peak_gflop_per_s']['bf16']:.0f} GFLOP/s")
    rows = [{**r, "percent_of_peak": 100 * r["fraction_of_matmul_peak"]} for r in result["runs"]]
    print_rows([("impl", "impl", "<10"), ("objective", "objective", "<10"), ("precision", "precision", "<9"),
                ("ms/step", "step_ms_median", ">8.1f"), ("cpu ms", "cpu_ms_per_step_median", ">8.1f"),
                ("samples/s", "samples_per_s", ">10.0f"), ("GFLOP/step", "gflop_per_step", ">11.2f"),
                ("GFLOP/s", "gflop_per_s", ">8.1f"), ("% peak", "percent_of_peak", ">7.1f")], rows)
    for name, value in result["checks"].items():
        print(f"{name}: {value}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for precision in precisions:
        if precision not in ("fp32", "bf16"):
            raise SystemExit(f"--precisions: unknown {precision!r}; use fp32 and/or bf16")

    load_before = os.getloadavg()
    peaks = {"fp32": matmul_peak_gflops(device, torch.float32, args.matmul_size),
             "bf16": matmul_peak_gflops(device, torch.bfloat16, args.matmul_size)}
    impls = ["ours"] if args.no_reference else ["ours", "reference"]
    steps = [TrainStep(args.model, args.batch, o, device, p, impl)
             for p in precisions for o in objectives for impl in impls]
    flops = [step.count_flops() for step in steps]
    measure(steps, args.steps, args.warmup)
    load_after = os.getloadavg()
    runs = [summarise(step, n, peaks) for step, n in zip(steps, flops)]
    checks = target_checks(runs, precisions)

    result = {
        "benchmark": "train_step", "model": args.model, "batch": args.batch,
        "steps": args.steps, "warmup": args.warmup, "matmul_size": args.matmul_size,
        "environment": environment(
            threads=args.threads,
            device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)),
        "load_average_before": load_before, "load_average_after": load_after,
        "matmul_peak_gflop_per_s": peaks, "runs": runs, "checks": checks,
    }
    return finish(args.out, result, print_table)


if __name__ == "__main__":
    sys.exit(main())
