"""Two gloo processes running the real loop match one process on the full batch.

The model is a small ViT (no BatchNorm: per-rank BN statistics legitimately differ from full-batch
ones), trained with MMCL for a few steps. Rank r holds rows r, r+2, ... of each global batch, so the
union of the ranks' batches is the single process's batch.
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from clip_backdoor.config import TrainConfig, load_config
from clip_backdoor.train.loop import train
from clip_backdoor.weights import load_checkpoint

VIT = {"embed_dim": 32, "quick_gelu": True,
       "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
       "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def _config(run_dir, model_path, batch_size, *extra):
    return load_config(TrainConfig, None, [*extra,
        f"run_dir={run_dir}", f"model={model_path}", f"batch_size={batch_size}", "epochs=1",
        "data.num_samples=128", "data.workers=0", "eval.every=0", "optim.warmup_steps=1", "optim.lr=1e-3",
        "threads=1", "save_every=0", "data.world.image_size=32",
        # Attention key biases have an exactly-zero true gradient; with Adam's tiny default eps their
        # float noise becomes +-lr steps that differ between any two summation orders.
        "optim.eps=1e-4"])


def _worker(rank, port, run_dir, model_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    train(_config(run_dir, model_path, 32, "report_to=tensorboard"))  # global batch: 16 per rank


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
    ddp_row = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])
    # TensorBoard: rank 0 alone writes (one event file, not one per rank)
    assert len(list((tmp_path / "ddp" / "tensorboard").iterdir())) == 1
    # batch_size is the global batch, whatever the launch; both the global and per-rank are recorded.
    assert (ddp_row["batch_size"], ddp_row["batch_size_per_rank"], ddp_row["world_size"]) == (32, 16, 2)
    resolved = yaml.safe_load((tmp_path / "ddp" / "config.yaml").read_text())["resolved"]
    assert resolved["batch_size_per_rank"] == 16 and resolved["world_size"] == 2
    ddp_loss = ddp_row["loss"]
    single_loss = json.loads((tmp_path / "single" / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert ddp_loss == pytest.approx(single_loss, rel=1e-5)


def _clean_worker(rank, port, run_dir, init):
    from clip_backdoor import cleaning

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    train(*_clustering(run_dir, init, cleaning))


def _clustering(run_dir, init, cleaning):
    """Deep clustering (reference variant) without the SSL term: per-rank views would differ from the
    single process's. The head is outside the DDP module, in the main optimizer: its gradients are
    averaged by hand, and the k-means sees every rank's embeddings in row-id order."""
    params = {"clusters": 4, "iterations": 3, "ssl_weight": 0.0}
    cfg = load_config(TrainConfig, None, [
        f"run_dir={run_dir}", f"init_checkpoint={init}", "batch_size=32", "epochs=1", "data.num_samples=128",
        "data.workers=0", "eval.every=0", "optim.warmup_steps=1", "optim.lr=1e-3", "threads=1", "save_every=0",
        "data.world.image_size=32", "optim.eps=1e-4"])
    recipe = cleaning.build_recipe("deep-clustering", params)
    return recipe.apply_to_config(cfg), recipe


def test_deep_clustering_head_under_two_process_ddp_matches_single_process(tmp_path):
    from clip_backdoor import cleaning

    model_path = tmp_path / "vit-tiny.json"
    model_path.write_text(json.dumps(VIT))
    train(_config(tmp_path / "pre", model_path, batch_size=32))
    init = str(tmp_path / "pre" / "checkpoints" / "latest.pt")
    mp.spawn(_clean_worker, args=(_free_port(), str(tmp_path / "ddp"), init), nprocs=2, join=True)
    train(*_clustering(tmp_path / "single", init, cleaning))

    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "latest.pt")
    single = load_checkpoint(tmp_path / "single" / "checkpoints" / "latest.pt")
    for key, value in single["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    rows = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1]) for run in ("ddp", "single")]
    assert rows[0]["loss_cluster"] == pytest.approx(rows[1]["loss_cluster"], rel=1e-5)
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5)
