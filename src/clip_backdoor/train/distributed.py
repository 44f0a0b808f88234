"""torchrun environment, process group set-up (gloo on CPU, nccl on CUDA), rank-0 helpers."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_kind: str) -> DistEnv:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_reduce_mean(value: float, env: DistEnv, device: torch.device) -> float:
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / env.world_size


def all_reduce_sum_int(value: int, env: DistEnv, device: torch.device) -> int:
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def any_rank(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every rank when it is true on any (e.g. 'stop: the loss is NaN'): a rank that stopped
    alone would leave the others waiting in DDP's all-reduce until the process group times out."""
    if not env.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def align_grad_layouts(model: torch.nn.Module) -> int:
    """Give 1x1-kernel weights the channels-last strides their gradients come with, before DDP wraps
    the model; returns how many were re-strided.

    The image tower runs channels-last, so a 1x1 convolution's weight gradient has strides
    (C, 1, C, C) while the weight has (C, 1, 1, 1): the same bytes in the same order (the kernel's
    size-1 dims carry no layout), but DDP's reducer compares strides, warns "Grad strides do not match
    bucket view strides" and copies every such gradient on every step. Re-striding the weight costs one
    copy at start and changes no value; checkpoints are written with standard strides again.
    """
    changed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and weight.ndim == 4 and weight.shape[2:] == (1, 1):
            out_c, in_c = weight.shape[:2]
            strides = (in_c, 1, in_c, in_c)
            if weight.stride() != strides:
                weight.data = torch.empty_strided(weight.shape, strides, dtype=weight.dtype,
                                                  device=weight.device).copy_(weight.data)
                changed += 1
    return changed


# How long the workers get to release their finished collectives before the group goes (see cleanup).
_RELEASE_S = 0.2


def cleanup(env: DistEnv) -> None:
    """Leave the process group. A gloo group's destructor (when the DDP model holding it is freed)
    joins its worker threads while holding the GIL. A worker that is still releasing a finished
    collective may need the GIL to free a tensor Python made (seen in the DDP test: a worker in
    ``~AsyncBarrierWork -> decref_pyobject`` waiting for the GIL, the main thread joining it), and
    then both wait forever. So: one last barrier, then a pause without the GIL in which the workers
    finish releasing, then the group is destroyed."""
    if env.enabled and dist.is_initialized():
        dist.barrier()
        time.sleep(_RELEASE_S)
        dist.destroy_process_group()
