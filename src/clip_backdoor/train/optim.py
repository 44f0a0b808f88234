"""AdamW with decay groups chosen by module type, and a warmup + cosine schedule from step 0.

Weight decay applies to the weights of linear maps only: Linear / Conv / attention input
projections and the two raw projection matrices (``text_projection``, ViT ``proj``). Norms,
biases, embeddings (token, positional, class) and ``logit_scale`` are never decayed. The
reference chose groups by name substrings ("bn", "ln"), which decayed the BatchNorms inside
ResNet downsample branches and every embedding (REFERENCE.md, bug 9).
"""

from __future__ import annotations

import math

import torch
from torch import nn

_LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Raw nn.Parameter matrices that are linear maps (exact attribute names, not substrings).
_PROJECTION_ATTRS = {"text_projection", "proj"}
_MHA_WEIGHTS = {"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"}


def split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Return (decay, no_decay) trainable parameters, classified by the module that owns them."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_linear_weight = (
                (isinstance(module, _LINEAR_TYPES) and name == "weight")
                or (isinstance(module, nn.MultiheadAttention) and name in _MHA_WEIGHTS)
                or (name in _PROJECTION_ATTRS and p.ndim == 2)
            )
            (decay if is_linear_weight else no_decay).append(p)
    return decay, no_decay


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    decay, no_decay = split_decay(model)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]
    # The fused kernel does the whole update in one pass (about a quarter of a tiny CPU step saved).
    devices = {p.device.type for p in decay + no_decay}
    fused = bool(devices) and devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup from the very first step (base/W at step 0, base at step W-1), then a cosine
    from base at step W to exactly 0 at the last step T-1. The reference started counting at one
    epoch's worth of steps, so warmup never happened and the last epoch overran the cosine (bug 2).
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


def schedule_warning(warmup_steps: int, total_steps: int) -> str | None:
    """A warm-up that fills the whole run never reaches its cosine phase: say so (None when fine)."""
    if warmup_steps <= 0 or warmup_steps < total_steps - 1:
        return None
    peak = min(1.0, total_steps / warmup_steps)
    return (f"optim.warmup_steps={warmup_steps} covers the whole run ({total_steps} steps): the learning "
            f"rate only warms up (to {peak:.0%} of optim.lr) and never reaches its cosine decay; lower "
            "optim.warmup_steps or train longer")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
