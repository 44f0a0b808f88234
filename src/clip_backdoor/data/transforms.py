"""CLIP image preprocessing on uint8 tensors; normalisation happens last, on the training device.

Data, triggers and SSL views meet at one representation: uint8 ``[3, H, W]`` at the model
resolution (see docs/INTERFACES.md). Triggers and AutoAugment work on float [0, 1]; CLIP's mean/std
is applied only when the batch enters the model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_tensor_uint8(img: Image.Image | torch.Tensor) -> torch.Tensor:
    """PIL image (any mode) or uint8 tensor -> uint8 ``[3, H, W]``."""
    if isinstance(img, torch.Tensor):
        if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"expected a uint8 [3,H,W] tensor, got {img.dtype} {tuple(img.shape)}")
        return img
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] -> uint8 with rounding (what saving as 8-bit PNG does)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    y = F.interpolate(x.unsqueeze(0).float(), size=size, mode="bicubic", align_corners=False,
                      antialias=True)[0]
    return y.round().clamp(0, 255).to(torch.uint8)


def preprocess(img: Image.Image | torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bicubic, antialiased) and centre-crop to ``size × size``."""
    x = to_tensor_uint8(img)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = _resize(x, (nh, nw))
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, top:top + size, left:left + size]
    return x.contiguous()


def squash(img: Image.Image | torch.Tensor, size: int) -> torch.Tensor:
    """Resize to ``size × size`` ignoring aspect ratio: the reference's geometry for poisoned images."""
    return _resize(to_tensor_uint8(img), (size, size)).contiguous()


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] ``[..., 3, H, W]`` -> CLIP-normalised, on whatever device ``x`` lives."""
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std
