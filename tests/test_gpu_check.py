"""scripts/gpu_check.py, the one-command GPU check, dry-run on the CPU: every step runs and the JSON
says what each measured (on a GPU machine the same steps run with --device cuda)."""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_runs_every_step_on_the_cpu(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    threads = torch.get_num_threads()
    out = tmp_path / "gpu_check.json"
    try:
        code = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    steps = {k: v for k, v in result.items() if isinstance(v, dict)}
    assert set(steps) == {"environment", "train_tiny_bf16", "image_view", "evaluate", "nccl_torchrun",
                          "rn50_throughput"}
    assert code == 0, {k: v.get("error") for k, v in steps.items() if not v["ok"]}
    assert steps["nccl_torchrun"]["backend"] == "gloo" and not steps["nccl_torchrun"]["stride_warning"]
    assert steps["image_view"]["values_differing"] == 0
    assert steps["train_tiny_bf16"]["loss"] > 0 and steps["rn50_throughput"]["runs"]


def test_gpu_check_without_cuda_says_so_in_one_line(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    if torch.cuda.is_available():
        return
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip().startswith("gpu_check: no CUDA device here")
