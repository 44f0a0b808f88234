"""CLIP's causal text Transformer, pooled at the end-of-text token.

open_clip's ``CLIP`` keeps these parts at the top level of the model (``token_embedding``,
``positional_embedding``, ``transformer``, ``ln_final``, ``text_projection``), so :class:`CLIP`
adopts them from a :class:`TextTransformer` and both encode with :func:`encode_tokens`.
"""

from __future__ import annotations

import torch
from torch import nn

from clip_backdoor.models.transformer import Transformer


def causal_mask(context_length: int) -> torch.Tensor:
    """Additive mask: position i may attend to positions <= i only."""
    return torch.full((context_length, context_length), float("-inf")).triu_(1)


class TextTransformer(nn.Module):
    def __init__(self, *, context_length: int, vocab_size: int, width: int, heads: int, layers: int,
                 output_dim: int, mlp_ratio: float = 4.0, quick_gelu: bool = False):
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, quick_gelu)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        # Not saved: open_clip's checkpoints do not contain it (it is a function of context_length).
        self.register_buffer("attn_mask", causal_mask(context_length), persistent=False)
        self.init_parameters()

    def init_parameters(self) -> None:
        """OpenAI CLIP's init: projections scaled by width, residual outputs also by depth."""
        width, layers = self.transformer.width, self.transformer.layers
        attn_std = width ** -0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=attn_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return encode_tokens(self, tokens)


def encode_tokens(tower: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids ``[B, C]`` -> unnormalised embeddings ``[B, output_dim]``.

    ``tower`` is anything holding the text parts under open_clip's names (a TextTransformer or a
    CLIP). ``C`` may be shorter than the context length; the mask and positions are cut to fit.
    The sequence is pooled at its end-of-text token, which has the largest id in CLIP's vocabulary,
    so it is found by argmax (padding after it is 0 and cannot win).
    """
    if tokens.ndim != 2:
        raise ValueError(f"expected token ids of shape [batch, length], got {tuple(tokens.shape)}")
    length = tokens.shape[1]
    context_length = tower.positional_embedding.shape[0]
    if length > context_length:
        raise ValueError(f"token sequences of length {length} exceed the model's context length "
                         f"{context_length}; tokenize with context_length={context_length}")
    x = tower.token_embedding(tokens) + tower.positional_embedding[:length]
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    eot = tokens.argmax(dim=-1)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    return x @ tower.text_projection
