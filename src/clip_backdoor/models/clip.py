"""CLIP = image tower + causal text tower + a learned temperature.

Parameter names and shapes are open_clip's for the same config (``visual.*`` for the image tower,
the text tower's parts at the top level, ``logit_scale``), so checkpoints move between the two.
Build one with :func:`clip_backdoor.models.create_model`; this class expects a validated config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clip_backdoor.models.resnet import ModifiedResNet
from clip_backdoor.models.text import TextTransformer, encode_tokens
from clip_backdoor.models.vit import VisionTransformer

INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)


def build_vision_tower(vision_cfg: dict, embed_dim: int, quick_gelu: bool) -> nn.Module:
    """A list of four stage depths means ModifiedResNet; an int depth means ViT (open_clip's rule)."""
    head_width = vision_cfg["head_width"]
    if isinstance(vision_cfg["layers"], (list, tuple)):
        return ModifiedResNet(layers=list(vision_cfg["layers"]), output_dim=embed_dim,
                              heads=vision_cfg["width"] * 32 // head_width,
                              image_size=vision_cfg["image_size"], width=vision_cfg["width"])
    return VisionTransformer(image_size=vision_cfg["image_size"], patch_size=vision_cfg["patch_size"],
                             width=vision_cfg["width"], layers=vision_cfg["layers"],
                             heads=vision_cfg["width"] // head_width, output_dim=embed_dim,
                             mlp_ratio=vision_cfg["mlp_ratio"], quick_gelu=quick_gelu)


class CLIP(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        embed_dim, quick_gelu = config["embed_dim"], config["quick_gelu"]
        text_cfg = config["text_cfg"]
        self.image_size: int = config["vision_cfg"]["image_size"]
        self.context_length: int = text_cfg["context_length"]
        self.vocab_size: int = text_cfg["vocab_size"]

        self.visual = build_vision_tower(config["vision_cfg"], embed_dim, quick_gelu)

        text = TextTransformer(context_length=text_cfg["context_length"], vocab_size=text_cfg["vocab_size"],
                               width=text_cfg["width"], heads=text_cfg["heads"], layers=text_cfg["layers"],
                               output_dim=embed_dim, mlp_ratio=text_cfg["mlp_ratio"], quick_gelu=quick_gelu)
        # Adopt the text parts at the top level, where open_clip's CLIP keeps them.
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)

        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """CLIP-normalised float images ``[B, 3, S, S]`` -> embeddings ``[B, embed_dim]``."""
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids ``[B, C]`` (C <= context_length) -> embeddings ``[B, embed_dim]``."""
        features = encode_tokens(self, tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None) -> dict:
        """Unit-norm features of the inputs given (None for one not given) and s = exp(logit_scale)."""
        return {
            "image_features": None if image is None else self.encode_image(image, normalize=True),
            "text_features": None if text is None else self.encode_text(text, normalize=True),
            "logit_scale": self.logit_scale.exp(),
        }

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep s = exp(logit_scale) in [1, 100]; call after every optimizer step, as CLIP does."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
