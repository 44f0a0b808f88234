"""The pre-norm Transformer shared by the text tower and the ViT image tower.

Module and parameter names follow open_clip (``resblocks.N.ln_1/attn/ln_2/mlp.c_fc/mlp.c_proj``,
attention as ``torch.nn.MultiheadAttention`` so its weights are ``in_proj_weight``/``in_proj_bias``/
``out_proj.*``): a state dict from open_clip loads without renaming.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU (the paper's models were trained with it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(quick_gelu: bool) -> type[nn.Module]:
    return QuickGELU if quick_gelu else nn.GELU


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)); inputs are batch-first ``[N, L, D]``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", activation(quick_gelu)()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        # The mask is always causal when given; saying so lets attention use its fused causal kernel.
        is_causal = attn_mask is not None
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask, is_causal=is_causal)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
                 quick_gelu: bool = False):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        with _attention_kernel(x):
            for block in self.resblocks:
                x = block(x, attn_mask=attn_mask)
        return x


def _attention_kernel(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """On CPU in bfloat16, plain matmul + softmax attention instead of the fused flash kernel.

    For CLIP's short sequences the CPU flash kernel's bf16 backward is several times slower than the
    math path (about 4x for 16 tokens on a Xeon with AMX); results are the same up to rounding.
    """
    bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                          and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    if x.device.type == "cpu" and bf16:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()
