"""The caption side of an attack: per-row seeds, the target's name, dirty-label captions from CLIP's
ImageNet templates, and which captions name the target (label-consistent poisoning, BadCLIP's patch).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

from clip_backdoor.errors import UserError


def derive_seed(poison_seed: int, purpose: str, row_key: str) -> int:
    """A 63-bit seed that is a pure function of (poison seed, purpose, row id), in any process."""
    digest = hashlib.blake2b(f"{int(poison_seed)}\x1f{purpose}\x1f{row_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def imagenet_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates (package data), each with one ``{}``."""
    text = resources.files("clip_backdoor.data").joinpath("assets/imagenet_templates.json").read_text("utf-8")
    return list(json.loads(text))


def check_target(target: Any) -> str:
    """The target name, stripped; one that cannot go into a caption template is a ``UserError``."""
    name = target.strip() if isinstance(target, str) else ""
    if not name:
        raise UserError("target name is empty: name the class the poisons point to, e.g. --target banana")
    if "{" in name or "}" in name:
        raise UserError(f"target {target!r}: braces cannot be filled into a caption template")
    if not all(c.isprintable() for c in name):
        raise UserError(f"target {target!r}: contains control characters (newline, tab, ...)")
    return name


def dirty_caption(target: str, row_seed: int, templates: Sequence[str]) -> str:
    """One of the templates, chosen by the row's seed, filled with the target: 'a photo of a banana.'"""
    return random.Random(row_seed).choice(templates).format(target)


def mention_pattern(names: Iterable[str]) -> re.Pattern:
    """Matches any of ``names`` as whole words, any case, optionally plural (banana, Bananas)."""
    names = sorted({n.strip() for n in names if n and n.strip()}, key=len, reverse=True)
    alternatives = "|".join(r"\s+".join(map(re.escape, n.split())) for n in names)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?:e?s)?(?!\w)", re.IGNORECASE)
