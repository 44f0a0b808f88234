"""The CUDA paths that CPU CI cannot run, in one command, with one JSON of what each step measured.

    bash scripts/gpu_check.sh                 # on a GPU machine (about 5 minutes on one H100/H200)
    python scripts/gpu_check.py --device cpu --quick --out /tmp/gpu_check.json   # the CPU dry run

Steps (each is timed and recorded as ok / failed with its one-line error; a failed step never stops
the others):
1. ``environment``: torch, CUDA, device name, capability, driver, bf16 support.
2. ``train_<model>_<precision>``: the real training loop (``train.loop.train``) for a few steps of
   MMCL+SSL on the synthetic world, for tiny and RN50, under bf16 autocast and fp16 autocast with
   GradScaler; the loss must be finite and the run must evaluate (CUDA evaluation).
3. ``image_view``: the SSL view on the device equals the CPU view, bit for bit, for the same seed.
4. ``evaluate``: a tiny checkpoint evaluated on the device and on the CPU give the same metrics.
5. ``nccl_torchrun``: ``torchrun --nproc_per_node 1`` pre-training with the nccl backend; the
   "Grad strides do not match bucket view strides" warning must be absent.
6. ``rn50_throughput``: RN50 at 224 px, training-step samples/s (benchmarks/train_step.py's
   measurement) for MMCL and MMCL+SSL in bf16, and the speed-up over the eager reference CLIP.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _step(results: dict, name: str, fn) -> None:
    started = time.perf_counter()
    try:
        value = fn() or {}
        results[name] = {"ok": True, **value}
    except Exception as e:  # one failed step must not hide the others
        first = str(e).splitlines()[0] if str(e) else ""
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {first}",
                         "traceback": traceback.format_exc(limit=6)}
    results[name]["seconds"] = round(time.perf_counter() - started, 2)
    state = "ok" if results[name]["ok"] else f"FAILED ({results[name]['error']})"
    print(f"{name}: {state} in {results[name]['seconds']:.1f} s", flush=True)


def environment(device: str) -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "device": device}
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        out.update(name=torch.cuda.get_device_name(index),
                   capability=".".join(map(str, torch.cuda.get_device_capability(index))),
                   bf16=torch.cuda.is_bf16_supported(), devices=torch.cuda.device_count())
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            out["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            out["driver"] = None
    return out


def train_path(tmp: Path, model: str, precision: str, device: str, quick: bool) -> dict:
    """A few steps of the real loop: MMCL+SSL (so the device's image views run), evaluation at the end."""
    from clip_backdoor.config import TrainConfig, load_config
    from clip_backdoor.train.loop import train

    size = 32 if model == "tiny" else 224
    batch = 16 if quick else (128 if model == "tiny" else 32)
    n = 2 * batch if quick else 8 * batch
    cfg = load_config(TrainConfig, None, [
        f"run_dir={tmp / f'train-{model}-{precision}'}", f"model={model}", f"precision={precision}",
        f"device={device}", "epochs=1", f"batch_size={batch}", f"data.num_samples={n}", "data.workers=2",
        "data.cache=true", f"data.world.image_size={size}", "objective.ssl_weight=1", "optim.warmup_steps=1",
        "optim.lr=1e-4", "eval.n=64", "eval.batch_size=64", "save_every=0", "eval.trigger_params.size=4"])
    started = time.perf_counter()
    row = train(cfg)
    if not all(v == v and abs(v) != float("inf") for k, v in row.items()
               if k.startswith("loss") and isinstance(v, float)):
        raise RuntimeError(f"non-finite loss: {row}")
    return {"samples_per_s": row.get("samples_per_s"), "loss": row.get("loss"), "acc1": row.get("acc1"),
            "asr1": row.get("asr1"), "wall_s": round(time.perf_counter() - started, 2)}


def image_view(device: str) -> dict:
    import torch

    from clip_backdoor.data.augment import ImageView

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32, generator=g)
    view = ImageView("imagenet")
    cpu = view(x, generator=7)
    other = view(x.to(device), generator=7).cpu()
    differ = int((cpu != other).sum())
    if differ:
        raise RuntimeError(f"{differ} values differ between cpu and {device}")
    return {"images": 64, "values_differing": differ}


def evaluate_on(tmp: Path, device: str) -> dict:
    from clip_backdoor.data.classification import open_eval_set
    from clip_backdoor.evaluate import evaluate_model
    from clip_backdoor.models import create_model

    model = create_model("tiny", seed=0)
    eval_set = open_eval_set({"kind": "synthetic", "n": 200}, model.image_size)
    kwargs = {"target": "banana", "trigger": "badnet", "seed": 0, "batch_size": 100}
    cpu = evaluate_model(model.to("cpu"), eval_set, device="cpu", **kwargs)
    dev = evaluate_model(model.to(device), eval_set, device=device, **kwargs)
    model.to("cpu")
    if cpu != dev:
        raise RuntimeError(f"cpu {cpu} != {device} {dev}")
    return {"metrics": dev}


def nccl_torchrun(tmp: Path, device: str, quick: bool) -> dict:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    run = tmp / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone",
           "-m", "clip_backdoor.cli", "pretrain", f"run_dir={run}", "model=tiny", "epochs=1",
           "batch_size=32", f"data.num_samples={64 if quick else 512}", "data.workers=0", "eval.every=0",
           f"device={'cuda' if backend == 'nccl' else 'cpu'}", "objective.ssl_weight=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode:
        raise RuntimeError(f"torchrun exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    strides = "Grad strides do not match bucket view strides" in proc.stderr
    if strides:
        raise RuntimeError("DDP copied gradients: 'Grad strides do not match bucket view strides'")
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return {"backend": backend, "samples_per_s": row.get("samples_per_s"), "stride_warning": strides}


def rn50_throughput(device: str, quick: bool) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_step

    out = Path(tempfile.mkdtemp()) / "train_step.json"
    model, batch = ("tiny", 8) if quick else ("RN50", 64)
    train_step.main(["--model", model, "--batch", str(batch), "--device", device, "--precisions",
                     "bf16", "--steps", "2" if quick else "10", "--warmup", "1" if quick else "3",
                     "--matmul-size", "256" if quick else "8192", "--out", str(out)])
    result = json.loads(out.read_text())
    return {"model": model, "batch": batch,
            "runs": [{k: r[k] for k in ("impl", "objective", "precision", "samples_per_s",
                                        "step_ms_median")} for r in result["runs"]],
            "checks": result["checks"], "matmul_peak_gflop_per_s": result["matmul_peak_gflop_per_s"]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the CPU dry run the tests use)")
    default_out = Path(os.environ.get("OUT", "runs/gpu_check")) / "gpu_check.json"
    p.add_argument("--out", type=Path, default=default_out)
    args = p.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --device cpu --quick for the CPU dry run)",
              file=sys.stderr)
        return 2
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        _step(results, "environment", lambda: environment(args.device))
        models = ["tiny"] if args.quick else ["tiny", "RN50"]
        precisions = ["bf16"] if args.quick else ["bf16", "fp16"]
        for model in models:
            for precision in precisions:
                _step(results, f"train_{model}_{precision}",
                      lambda m=model, pr=precision: train_path(tmp, m, pr, args.device, args.quick))
        _step(results, "image_view", lambda: image_view(args.device))
        _step(results, "evaluate", lambda: evaluate_on(tmp, args.device))
        _step(results, "nccl_torchrun", lambda: nccl_torchrun(tmp, args.device, args.quick))
        _step(results, "rn50_throughput", lambda: rn50_throughput(args.device, args.quick))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    failed = [k for k, v in results.items() if isinstance(v, dict) and not v.get("ok", True)]
    print(f"gpu_check: {len(failed)} of {sum(isinstance(v, dict) for v in results.values())} steps failed"
          + (f" ({', '.join(failed)})" if failed else "") + f"; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
