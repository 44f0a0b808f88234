"""PAR under two gloo processes matches one process on the full batch: its distance terms and their
cap are computed on the gathered global batch, like L_CLIP (augmentation off: its draws are per rank)."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from clip_backdoor import cleaning
from clip_backdoor.config import TrainConfig, load_config
from clip_backdoor.train.loop import train
from clip_backdoor.weights import load_checkpoint

VIT = {"embed_dim": 32, "quick_gelu": True,
       "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
       "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
PARAMS = {"noise_p": 0.0, "erase_p": 0.0, "threshold": 3.9}


def _config(run_dir, model_path, batch_size, init=None):
    cfg = load_config(TrainConfig, None, [
        f"run_dir={run_dir}", f"model={model_path}", f"batch_size={batch_size}", "epochs=1",
        "data.num_samples=128", "data.workers=0", "eval.every=0", "optim.warmup_steps=1", "optim.lr=1e-3",
        "threads=1", "save_every=0", "data.world.image_size=32", "optim.eps=1e-4",
        *([f"init_checkpoint={init}"] if init else [])])
    return cleaning.build_recipe("par", PARAMS).apply_to_config(cfg) if init else cfg


def _worker(rank, port, run_dir, model_path, init):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    train(_config(run_dir, model_path, 32, init), cleaning.build_recipe("par", PARAMS))  # global batch


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_par_two_process_ddp_matches_single_process(tmp_path):
    model_path = tmp_path / "vit-tiny.json"
    model_path.write_text(json.dumps(VIT))
    train(_config(tmp_path / "start", model_path, 32))
    init = str(tmp_path / "start" / "checkpoints" / "latest.pt")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path / "ddp"), str(model_path), init), nprocs=2, join=True)
    train(_config(tmp_path / "single", model_path, 32, init), cleaning.build_recipe("par", PARAMS))

    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "latest.pt")
    single = load_checkpoint(tmp_path / "single" / "checkpoints" / "latest.pt")
    for key, value in single["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    rows = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[-1])
            for d in ("ddp", "single")]
    for key in ("loss", "loss_mmcl", "loss_par_image", "loss_par_text", "stat_par_dist_image"):
        assert rows[0][key] == pytest.approx(rows[1][key], rel=1e-5, abs=1e-7), key
    assert rows[1]["loss_par_image"] < 0  # the term is active, so its gradient was compared too
