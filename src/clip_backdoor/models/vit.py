"""CLIP's VisionTransformer image tower (ViT-B/32 for the backbone ablation), open_clip's names.

Patches -> class token + learned positions -> ln_pre -> Transformer -> ln_post of the class token
-> linear projection. Initialised as open_clip does: the embeddings and projection are drawn at
width^-0.5 scale, the rest keeps PyTorch's default initialisation.
"""

from __future__ import annotations

import torch
from torch import nn

from clip_backdoor.models.transformer import Transformer


class VisionTransformer(nn.Module):
    def __init__(self, *, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, mlp_ratio: float = 4.0, quick_gelu: bool = False):
        super().__init__()
        self.image_size = image_size
        self.output_dim = output_dim
        grid = image_size // patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))
        for embedding in (self.class_embedding, self.positional_embedding, self.proj):
            nn.init.normal_(embedding, std=scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"this image tower takes {self.image_size}x{self.image_size} images, "
                             f"got {tuple(x.shape[-2:])}")
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [N, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj
