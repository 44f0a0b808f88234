"""Two gloo processes running the real loop match one process on the full batch.

The model is a small ViT (no BatchNorm: per-rank BN statistics legitimately differ from full-batch
ones), trained with MMCL for a few steps. Rank r holds rows r, r+2, ... of each global batch, so the
union of the ranks' batches is the single process's batch.
"""

import json
import logging
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from clip_backdoor.config import TrainConfig, load_config
from clip_backdoor.train.loop import train
from clip_backdoor.weights import load_checkpoint

VIT = {"embed_dim": 32, "quick_gelu": True,
       "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
       "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def _config(run_dir, model_path, batch_size):
    return load_config(TrainConfig, None, [
        f"run_dir={run_dir}", f"model={model_path}", f"batch_size={batch_size}", "epochs=1",
        "data.num_samples=128", "data.workers=0", "eval.every=0", "optim.warmup_steps=1", "optim.lr=1e-3",
        "threads=1", "save_every=0", "data.world.image_size=32",
        # Attention key biases have an exactly-zero true gradient; with Adam's tiny default eps their
        # float noise becomes +-lr steps that differ between any two summation orders.
        "optim.eps=1e-4"])


def _worker(rank, port, run_dir, model_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    log = logging.getLogger("clip_backdoor")  # what each rank would print, for the parent to read
    log.setLevel(logging.INFO)
    log.addHandler(logging.FileHandler(f"{run_dir}.rank{rank}.log"))
    train(_config(run_dir, model_path, batch_size=16))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_single_process(tmp_path):
    model_path = tmp_path / "vit-tiny.json"
    model_path.write_text(json.dumps(VIT))
    mp.spawn(_worker, args=(_free_port(), str(tmp_path / "ddp"), str(model_path)), nprocs=2, join=True)
    train(_config(tmp_path / "single", model_path, batch_size=32))

    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "latest.pt")
    single = load_checkpoint(tmp_path / "single" / "checkpoints" / "latest.pt")
    assert ddp["step"] == single["step"] == 4
    for key, value in single["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    ddp_loss = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    single_loss = json.loads((tmp_path / "single" / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert ddp_loss == pytest.approx(single_loss, rel=1e-5)
    # One summary line per epoch: rank 0 prints it, the other ranks do not.
    logs = [(tmp_path / f"ddp.rank{rank}.log").read_text() for rank in (0, 1)]
    assert logs[0].count("epoch 1/1") == 1 and "epoch 1/1" not in logs[1]
