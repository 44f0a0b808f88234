"""Module-level pieces for the 2-process gloo test of the objectives (``mp.spawn`` pickles by name).

A tiny two-tower "CLIP" in float64 and a fixed batch: the parent computes the single-process
full-batch loss and gradients, each spawned rank runs a step on its slice and averages parameter
gradients over ranks the way DDP does (all-reduce sum, divide by world size), and the parent
compares what the ranks saved. DDP itself is not used because its constructor imports
torch._dynamo, which costs ~7 s per process on a small CPU; the same check passed with DDP.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clip_backdoor.objectives import Objective, split_views

IMAGE_IN, TEXT_IN, EMBED = 6, 5, 4
BATCH = 8

# (case name, objective, rows held by rank 0 and rank 1)
DDP_CASES: list[tuple[str, Objective, tuple[int, int]]] = [
    ("mmcl", Objective.from_name("mmcl"), (4, 4)),
    ("mmcl+ssl", Objective.from_name("mmcl+ssl"), (4, 4)),
    ("weighted-symmetric-unequal", Objective(mmcl_weight=0.5, ssl_weight=2.0, ssl_symmetric=True), (3, 5)),
]


class TinyTwoTower(nn.Module):
    """Two linear towers and a learnable log temperature; deterministic from ``seed``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.image_tower = nn.Linear(IMAGE_IN, EMBED, dtype=torch.float64)
        self.text_tower = nn.Linear(TEXT_IN, EMBED, dtype=torch.float64)
        with torch.no_grad():
            for p in (*self.image_tower.parameters(), *self.text_tower.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image_features": F.normalize(self.image_tower(images), dim=-1),
            "text_features": F.normalize(self.text_tower(texts), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }


def make_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    return {
        "images": draw(BATCH, IMAGE_IN),
        "images_aug": draw(BATCH, IMAGE_IN),
        "texts": draw(BATCH, TEXT_IN),
        "texts_aug": draw(BATCH, TEXT_IN),
    }


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], objective: Objective) -> dict[str, float]:
    """One forward (originals and augmented views concatenated) and backward; returns the losses."""
    n = batch["images"].shape[0]
    out = model(
        torch.cat([batch["images"], batch["images_aug"]]), torch.cat([batch["texts"], batch["texts_aug"]])
    )
    u, u_aug = split_views(out["image_features"], n)
    v, v_aug = split_views(out["text_features"], n)
    losses = objective(
        image_features=u,
        text_features=v,
        image_aug_features=u_aug,
        text_aug_features=v_aug,
        logit_scale=out["logit_scale"],
    )
    losses["loss"].backward()
    return {key: value.item() for key, value in losses.items()}


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def average_gradients_over_ranks(model: nn.Module) -> None:
    """What DDP does to every parameter gradient after backward."""
    for p in model.parameters():
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= dist.get_world_size()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank: its slice of the batch, DDP-style gradient averaging, results saved for the parent."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        full = make_batch()
        for case, objective, rows in DDP_CASES:
            start = sum(rows[:rank])
            local = {key: value[start : start + rows[rank]] for key, value in full.items()}
            model = TinyTwoTower()
            losses = train_step(model, local, objective)
            average_gradients_over_ranks(model)
            torch.save({"losses": losses, "grads": gradients(model)}, Path(out_dir) / f"{case}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()
