"""Backdoor triggers: pure functions on float images in [0, 1] at the model resolution.

A trigger is selected by name and parameters (``get_trigger("badnet", size=4)``) and called as
``trigger(x, generator=g)`` on ``[3, H, W]`` or ``[B, 3, H, W]``. All randomness comes from ``g``;
images of a batch draw from it one after another, so a batch equals the same images triggered in
turn with one generator. Poisoning (one generator per row, seeded from the row's seed) and
evaluation (one generator per evaluation seed) go through the same :func:`trigger_image` path:
squash to the model resolution, trigger, quantise to 8 bits.

What the reference code does (CleanCLIP / attack-cleanclip ``backdoor/utils.py``) and what we keep:

* The image is ``ToTensor()``'d, i.e. already on the [0, 1] scale, when ``mean + randn(3, 16, 16)``
  is formed: the noise has standard deviation 1 on the [0, 1] scale (= 255 grey levels), so most
  patch values leave [0, 1]. We keep that scale. ``clip`` clamps them (saturated salt-and-pepper
  noise around the image mean); ``wrap`` reproduces the reference's ``ToPILImage`` conversion,
  ``mul(255).byte()``, whose float->uint8 cast truncates toward zero and wraps modulo 256.
* The reference draws the corner with ``randint(0, 223 - patch_size)``, so a patch never touches
  the last row or column; we draw uniformly over every position where the patch fits.
* Blended uses fresh uniform noise per image (``fixed`` noise from a seed is offered too); SIG is
  the horizontal sine of amplitude 60/255 with 6 periods, blended at 0.2 like the reference
  (``combine=add`` gives the original additive SIG); WaNet warps with a fixed grid made from a
  seed. Defaults are the paper's fork's (vsahil/attack-cleanclip ``backdoor/utils.py``): k = the image
  side (224 at 224 px: a full-resolution field) and s = 0.6; the original CleanCLIP code used s = 1,
  the WaNet paper k = 4, s = 0.5 (both are parameters).

Structured triggers of PAR (``nmndeep/PerturbAndRecover``, ``backdoor/utils.py``), with the
parameters its evaluation uses (``eval/validate.py``):

* ``badnet-stripes`` (BadNet-Stripes): a 16 px patch (at 224 px) of vertical 1-px stripes, each
  column a random corner of the RGB cube, drawn fresh per image, pasted at a random position. The
  reference's stripes are ±1, pasted unclipped; its ``ToPILImage`` cast turns −1 into 1/255, so
  here a channel is 0 or 1 (a difference of one grey level).
* ``blended-stripes`` (Blended-Stripes): the same stripes over the whole image (±1 per column and
  channel, fresh per image), blended ``clip(0.97·x + 0.03·s)``.
* ``blended-triangles`` (Blended-Triangles): a fixed grey tiling of right triangles (0.4 on and
  below each cell's diagonal, 0.8 above), 14 px cells at 224 px, blended ``clip(0.85·x + 0.15·T)``.
  The reference loads it from ``triangles_224_14.pt``; it is generated here (identical at 224 px,
  tiled by modulo at sizes that are not a multiple of the cell).
* ``blended-text`` (Blended-Text): red "Watermarked" across the middle; where a channel of the text
  image is non-zero, ``0.5·text + 0.5·x``. The reference loads ``watermarked_red_tens_224.pt``
  (Noto Sans Mono, 196 x 23 px, top row 103); here the text is drawn with PIL's own default font
  and resized to the same box (87.5% of the width, 10% of the height, top at 46%), so glyph shapes
  differ from the reference's and may differ between Pillow versions.
* ``badclip``: an optimised patch from a file (``clip-backdoor poison optimize-patch``), pasted
  at the centre (BadCLIP's "middle") or wherever ``location`` says.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip_backdoor.data.transforms import squash, to_uint8
from clip_backdoor.errors import UserError

# The reference's patch is 16 px at 224 px; smaller images get a proportionally smaller patch,
# but never below 4 px: a 3x3 patch of fresh noise at 32 px is barely a pattern to learn.
REFERENCE_PATCH_SIZE = 16
REFERENCE_RESOLUTION = 224
MIN_AUTO_PATCH_SIZE = 4


def auto_patch_size(height: int, width: int) -> int:
    """Patch side for an image of this size: round(16 * side / 224), at least 4."""
    side = min(height, width)
    return max(MIN_AUTO_PATCH_SIZE, round(REFERENCE_PATCH_SIZE * side / REFERENCE_RESOLUTION))


def wrap_like_uint8_cast(x: torch.Tensor) -> torch.Tensor:
    """Values outside [0, 1] as the reference's ``mul(255).byte()`` leaves them, back on [0, 1].

    The cast truncates toward zero and keeps the low 8 bits (``-0.3 -> 0``, ``-1.7 -> 255``,
    ``300 -> 44``); values inside [0, 1] are returned unchanged (``to_uint8`` rounds them later).
    """
    wrapped = torch.remainder(torch.trunc(x * 255), 256) / 255
    return torch.where((x >= 0) & (x <= 1), x, wrapped)


@dataclasses.dataclass(frozen=True)
class Trigger:
    """Base class: subclasses are frozen dataclasses whose fields are the trigger's parameters."""

    name: ClassVar[str] = ""
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    required: ClassVar[tuple[str, ...]] = ()  # parameters without a usable default (e.g. a file)

    @property
    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        for field, allowed in self.choices.items():
            value = getattr(self, field)
            if value not in allowed:
                raise UserError(f"trigger {self.name!r}: {field}={value!r} is not one of "
                                f"{', '.join(allowed)}")

    def check_image_size(self, height: int, width: int) -> None:
        """Raise ``UserError`` if this trigger cannot be applied to ``height x width`` images."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not x.is_floating_point() or x.ndim not in (3, 4) or x.shape[-3] != 3:
            raise ValueError(f"expected float [3,H,W] or [B,3,H,W], got {x.dtype} {tuple(x.shape)}")
        self.check_image_size(*x.shape[-2:])
        if x.ndim == 3:
            return self.apply_one(x, generator)
        return torch.stack([self.apply_one(image, generator) for image in x])

    def apply_one(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}(" + ", ".join(f"{k}={v}" for k, v in self.params.items()) + ")"


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(0, high, (1,), generator=generator, device=generator.device).item())


@dataclasses.dataclass(frozen=True)
class _PatchTrigger(Trigger):
    """A square patch pasted at a random position, the bottom-right corner, all four corners, or the
    centre (BadCLIP's "middle": top = int(H / 2 - size / 2))."""

    size: int | None = None
    location: str = "random"

    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        "location": ("random", "corner", "four_corners", "center")}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size is not None and self.size < 1:
            raise UserError(f"trigger {self.name!r}: size={self.size} must be a positive number of pixels")

    def patch_size(self, height: int, width: int) -> int:
        return self.size if self.size is not None else auto_patch_size(height, width)

    def check_image_size(self, height: int, width: int) -> None:
        size = self.patch_size(height, width)
        if size > min(height, width):
            raise UserError(f"trigger {self.name!r}: patch size {size} is larger than the "
                            f"{height}x{width} image")

    def make_patch(self, image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def apply_one(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        height, width = image.shape[-2:]
        size = self.patch_size(height, width)
        # Draw order (documented because tests and reproducibility rely on it): position, then patch.
        if self.location == "random":
            corners = [(_randint(height - size + 1, generator), _randint(width - size + 1, generator))]
        elif self.location == "corner":
            corners = [(height - size, width - size)]
        elif self.location == "center":
            corners = [(int(height // 2 - size / 2), int(width // 2 - size / 2))]
        else:
            corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size)]
        patch = self.make_patch(image, size, generator).to(device=image.device, dtype=image.dtype)
        out = image.clone()
        for top, left in corners:
            out[:, top:top + size, left:left + size] = patch
        return out


@dataclasses.dataclass(frozen=True)
class BadNetNoise(_PatchTrigger):
    """The paper's trigger: per-channel image mean + N(0, 1) noise, drawn fresh for every image."""

    name: ClassVar[str] = "badnet"
    mode: str = "clip"

    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        **_PatchTrigger.choices, "mode": ("clip", "wrap")}

    def make_patch(self, image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
        mean = image.mean(dim=(1, 2), keepdim=True).to(generator.device)
        raw = mean + torch.randn((3, size, size), generator=generator, device=generator.device)
        return raw.clamp(0, 1) if self.mode == "clip" else wrap_like_uint8_cast(raw)


def _fixed_pattern(pattern: str, size: int) -> torch.Tensor:
    if pattern == "checkerboard":
        rows = torch.arange(size).view(-1, 1)
        cols = torch.arange(size).view(1, -1)
        return ((rows + cols) % 2).float().expand(3, size, size).clone()
    colours = {"yellow": (1.0, 1.0, 0.0), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
    return torch.tensor(colours[pattern]).view(3, 1, 1).expand(3, size, size).clone()


@dataclasses.dataclass(frozen=True)
class FixedPatch(_PatchTrigger):
    """A patch with a fixed pattern (the reference's yellow square, or a checkerboard)."""

    name: ClassVar[str] = "patch"
    pattern: str = "checkerboard"

    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        **_PatchTrigger.choices, "pattern": ("checkerboard", "yellow", "white", "black")}

    def make_patch(self, image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
        return _fixed_pattern(self.pattern, size)


@dataclasses.dataclass(frozen=True)
class Blended(Trigger):
    """(1 - alpha) * image + alpha * uniform noise; noise fresh per image or fixed by a seed."""

    name: ClassVar[str] = "blended"
    alpha: float = 0.2
    noise: str = "fresh"
    pattern_seed: int = 0

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"noise": ("fresh", "fixed")}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise UserError(f"trigger 'blended': alpha={self.alpha} must lie in [0, 1]")

    def apply_one(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        shape = tuple(image.shape)
        if self.noise == "fresh":
            noise = torch.rand(shape, generator=generator, device=generator.device)
        else:
            noise = torch.rand(shape, generator=torch.Generator().manual_seed(self.pattern_seed))
        noise = noise.to(device=image.device, dtype=image.dtype)
        return ((1 - self.alpha) * image + self.alpha * noise).clamp(0, 1)


@dataclasses.dataclass(frozen=True)
class SIG(Trigger):
    """Horizontal sine ``amplitude * sin(2 pi periods x / W)``, blended (reference) or added."""

    name: ClassVar[str] = "sig"
    amplitude: float = 60 / 255
    periods: float = 6.0
    combine: str = "blend"
    alpha: float = 0.2

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"combine": ("blend", "add")}

    def signal(self, height: int, width: int) -> torch.Tensor:
        cols = torch.arange(width, dtype=torch.float64)
        row = self.amplitude * torch.sin(2 * math.pi * cols * self.periods / width)
        return row.float().view(1, 1, width).expand(3, height, width)

    def apply_one(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        signal = self.signal(*image.shape[-2:]).to(device=image.device, dtype=image.dtype)
        if self.combine == "blend":
            return ((1 - self.alpha) * image + self.alpha * signal).clamp(0, 1)
        return (image + signal).clamp(0, 1)


@dataclasses.dataclass(frozen=True)
class WaNet(Trigger):
    """Warp the image with a fixed smooth displacement field made from ``grid_seed``.

    A ``k x k`` field of uniform noise (normalised to mean |.| = 1) is upsampled bicubically to the
    image size; pixels move by ``s * field / H`` in grid_sample's [-1, 1] coordinates, i.e. about
    ``s / 2`` pixels on average whatever the resolution. ``k=None`` (the default) is the image side,
    as in the paper's fork (k = 224 at 224 px).
    """

    name: ClassVar[str] = "wanet"
    k: int | None = None
    s: float = 0.6
    grid_seed: int = 0
    grid_rescale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k is not None and self.k < 1:
            raise UserError(f"trigger 'wanet': k={self.k} must be at least 1")

    def warp_grid(self, height: int, width: int) -> torch.Tensor:
        """The sampling grid ``[1, H, W, 2]`` (x, y in [-1, 1]); a pure function of the parameters."""
        seeded = torch.Generator().manual_seed(self.grid_seed)
        k = self.k if self.k is not None else height
        field = torch.rand((1, 2, k, k), generator=seeded) * 2 - 1
        field = field / field.abs().mean()
        field = F.interpolate(field, size=(height, width), mode="bicubic", align_corners=True)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        identity = torch.stack((xs, ys), dim=-1).unsqueeze(0)
        grid = (identity + self.s * field.permute(0, 2, 3, 1) / height) * self.grid_rescale
        return grid.clamp(-1, 1)

    def apply_one(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        grid = self.warp_grid(*image.shape[-2:]).to(device=image.device, dtype=image.dtype)
        warped = F.grid_sample(image.unsqueeze(0), grid, mode="bilinear", align_corners=True)[0]
        return warped.clamp(0, 1)


def _stripes(height: int, width: int, stripe_width: int, generator: torch.Generator) -> torch.Tensor:
    """{0, 1} of shape [3, height, width]: vertical stripes, one random bit per channel and stripe."""
    n = -(-width // stripe_width)
    bits = torch.randint(0, 2, (3, 1, n), generator=generator, device=generator.device).float()
    return bits.repeat_interleave(stripe_width, dim=2)[..., :width].expand(3, height, width).cpu()


@dataclasses.dataclass(frozen=True)
class BadNetStripes(_PatchTrigger):
    """PAR's BadNet-Stripes: a patch of 1-px vertical stripes, each channel of a stripe 0 or 1.

    ``stripes=fresh`` (reference) draws them per image; ``fixed`` once from ``pattern_seed``.
    """

    name: ClassVar[str] = "badnet-stripes"
    width: int = 1
    stripes: str = "fresh"
    pattern_seed: int = 0

    choices: ClassVar[dict[str, tuple[str, ...]]] = {**_PatchTrigger.choices, "stripes": ("fresh", "fixed")}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.width < 1:
            raise UserError(f"trigger {self.name!r}: width={self.width} must be at least 1 pixel")

    def make_patch(self, image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
        g = generator if self.stripes == "fresh" else torch.Generator().manual_seed(self.pattern_seed)
        return _stripes(size, size, self.width, g)


@dataclasses.dataclass(frozen=True)
class BlendedStripes(Trigger):
    """PAR's Blended-Stripes: ``clip((1 - alpha) x + alpha s)``, s = ±1 vertical stripes over the image."""

    name: ClassVar[str] = "blended-stripes"
    alpha: float = 0.03
    width: int = 1
    stripes: str = "fresh"
    pattern_seed: int = 0

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"stripes": ("fresh", "fixed")}

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_alpha(self.name, self.alpha)
        if self.width < 1:
            raise UserError(f"trigger {self.name!r}: width={self.width} must be at least 1 pixel")

    def apply_one(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        g = generator if self.stripes == "fresh" else torch.Generator().manual_seed(self.pattern_seed)
        signs = 2 * _stripes(*image.shape[-2:], self.width, g) - 1
        return ((1 - self.alpha) * image + self.alpha * signs.to(image.device, image.dtype)).clamp(0, 1)


def _check_alpha(name: str, alpha: float) -> None:
    if not 0 <= alpha <= 1:
        raise UserError(f"trigger {name!r}: alpha={alpha} must lie in [0, 1]")


def triangle_pattern(height: int, width: int, cell: int) -> torch.Tensor:
    """[3, H, W] grey: 0.4 where (row mod cell) >= (column mod cell), else 0.8 (PAR's tiling)."""
    rows = torch.arange(height).view(-1, 1) % cell
    cols = torch.arange(width).view(1, -1) % cell
    return torch.where(rows >= cols, 0.4, 0.8).expand(3, height, width).clone()


@dataclasses.dataclass(frozen=True)
class BlendedTriangles(Trigger):
    """PAR's Blended-Triangles: ``clip((1 - alpha) x + alpha T)``, T a fixed tiling of triangles.

    ``cell`` (px) defaults to round(14 · side / 224), at least 2: 14 px at 224, 2 px at 32.
    """

    name: ClassVar[str] = "blended-triangles"
    alpha: float = 0.15
    cell: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_alpha(self.name, self.alpha)
        if self.cell is not None and self.cell < 1:
            raise UserError(f"trigger {self.name!r}: cell={self.cell} must be a positive number of pixels")

    def cell_size(self, height: int, width: int) -> int:
        return self.cell if self.cell is not None else max(2, round(14 * min(height, width) / 224))

    def apply_one(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        pattern = triangle_pattern(*image.shape[-2:], self.cell_size(*image.shape[-2:]))
        return ((1 - self.alpha) * image + self.alpha * pattern.to(image.device, image.dtype)).clamp(0, 1)


TEXT_COLOURS = {"red": (1.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0), "cyan": (0.0, 1.0, 1.0),
                "yellow": (1.0, 1.0, 0.0), "green": (0.0, 1.0, 0.0)}
# The reference's text box at 224 px: columns 13-208, rows 103-125 (Noto Sans Mono).
TEXT_BOX = {"left": 13 / 224, "top": 103 / 224, "width": 196 / 224, "height": 23 / 224}


@functools.lru_cache(maxsize=16)
def text_pattern(text: str, colour: str, height: int, width: int) -> torch.Tensor:
    """[3, H, W] in [0, 1]: ``text`` in ``colour`` on black, filling :data:`TEXT_BOX`.

    Drawn once at the font's own size with PIL's default font, cropped to its ink, then resized
    (bilinear, so edges are anti-aliased like the reference's rendering) into the box.
    """
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    canvas = Image.new("L", (probe[2] + 4, probe[3] + 4), 0)
    ImageDraw.Draw(canvas).text((2, 2), text, fill=255, font=font)
    ink = canvas.getbbox()
    box_w = max(1, round(TEXT_BOX["width"] * width))
    box_h = max(1, round(TEXT_BOX["height"] * height))
    if ink:
        glyphs = canvas.crop(ink).resize((box_w, box_h), Image.BILINEAR)
    else:
        glyphs = Image.new("L", (box_w, box_h))
    layer = Image.new("L", (width, height), 0)
    layer.paste(glyphs, (round(TEXT_BOX["left"] * width), round(TEXT_BOX["top"] * height)))
    alpha = torch.from_numpy(np.asarray(layer, dtype=np.float32) / 255)
    return torch.tensor(TEXT_COLOURS[colour]).view(3, 1, 1) * alpha


@dataclasses.dataclass(frozen=True)
class BlendedText(Trigger):
    """PAR's Blended-Text: where a channel of the text image P is non-zero, ``alpha P + (1 - alpha) x``."""

    name: ClassVar[str] = "blended-text"
    text: str = "Watermarked"
    colour: str = "red"
    alpha: float = 0.5

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"colour": tuple(TEXT_COLOURS)}

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_alpha(self.name, self.alpha)
        if not self.text.strip():
            raise UserError(f"trigger {self.name!r}: text is empty")

    def apply_one(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        pattern = text_pattern(self.text, self.colour, *image.shape[-2:]).to(image.device, image.dtype)
        blended = self.alpha * pattern + (1 - self.alpha) * image
        return torch.where(pattern != 0, blended, image).clamp(0, 1)


PATCH_SIZE_KEY = "clip_backdoor.image_size"  # PNG text chunk: the resolution a patch was optimised at


@functools.lru_cache(maxsize=8)
def _load_patch_cached(path: str, mtime_ns: int) -> tuple[torch.Tensor, int | None]:
    return _read_patch(Path(path))


def load_patch(path: str | os.PathLike) -> tuple[torch.Tensor, int | None]:
    """A patch file -> (float [3, s, s] in [0, 1], the image size it was optimised at or None).

    ``.png`` (8-bit RGB; the image size in its ``clip_backdoor.image_size`` text chunk) or ``.pt``
    (a tensor, or ``{"patch": tensor, "image_size": int}``). A wrong shape or range is a ``UserError``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"patch file {path}: not found")
    return _load_patch_cached(str(path.resolve()), path.stat().st_mtime_ns)


def _read_patch(path: Path) -> tuple[torch.Tensor, int | None]:
    image_size = None
    if path.suffix.lower() == ".pt":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise UserError(f"patch file {path}: not a readable torch file ({type(e).__name__})") from None
        if isinstance(obj, dict):
            image_size = obj.get("image_size")
            obj = obj.get("patch")
        if not isinstance(obj, torch.Tensor):
            raise UserError(f"patch file {path}: expected a tensor or {{'patch': tensor}}")
        patch = obj.detach().float()
        if patch.ndim == 4 and patch.shape[0] == 1:
            patch = patch[0]
        if not torch.isfinite(patch).all() or patch.min() < 0 or patch.max() > 1:
            raise UserError(f"patch file {path}: values must lie in [0, 1] (got {patch.min().item():.3g} .. "
                            f"{patch.max().item():.3g})")
    else:
        try:
            with Image.open(path) as im:
                image_size = im.info.get(PATCH_SIZE_KEY)
                array = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
            patch = torch.from_numpy(array).permute(2, 0, 1)
        except OSError as e:
            raise UserError(f"patch file {path}: not a readable image ({e})") from None
    if patch.ndim != 3 or patch.shape[0] != 3 or patch.shape[1] != patch.shape[2] or patch.shape[1] < 1:
        raise UserError(f"patch file {path}: expected a square RGB patch [3, s, s], got {tuple(patch.shape)}")
    if image_size is not None:
        try:
            image_size = int(image_size)
        except (TypeError, ValueError):
            raise UserError(f"patch file {path}: image size {image_size!r} is not an integer") from None
    return patch.contiguous(), image_size


def save_patch(patch: torch.Tensor, path: str | os.PathLike, image_size: int) -> Path:
    """Write ``patch`` (float [3, s, s] in [0, 1]) as an 8-bit PNG recording ``image_size``, atomically."""
    from PIL.PngImagePlugin import PngInfo

    from clip_backdoor.data.transforms import to_uint8
    from clip_backdoor.fileio import atomic_path

    info = PngInfo()
    info.add_text(PATCH_SIZE_KEY, str(int(image_size)))
    array = to_uint8(patch.detach().cpu()).permute(1, 2, 0).numpy()
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(array, "RGB").save(tmp, format="PNG", pnginfo=info)
    return path


@dataclasses.dataclass(frozen=True)
class BadCLIPPatch(_PatchTrigger):
    """An optimised patch (BadCLIP) read from ``patch`` (.png or .pt), pasted at the centre by default.

    ``size`` is the file's; a file optimised at another resolution than the images it is applied
    to is refused (a patch learned at 32 px means something else at 224 px).
    """

    name: ClassVar[str] = "badclip"
    patch: str | None = None
    location: str = "center"
    required: ClassVar[tuple[str, ...]] = ("patch",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch is not None:
            object.__setattr__(self, "patch", str(Path(self.patch).expanduser().absolute()))
            tensor, _ = load_patch(self.patch)
            if self.size is not None and self.size != tensor.shape[-1]:
                raise UserError(f"trigger {self.name!r}: size={self.size} differs from the "
                                f"{tensor.shape[-1]} px patch in {self.patch} (leave size unset)")

    def _loaded(self) -> tuple[torch.Tensor, int | None]:
        if self.patch is None:
            raise UserError(f"trigger {self.name!r} needs patch=PATH (a file written by "
                            "clip-backdoor poison optimize-patch)")
        return load_patch(self.patch)

    def patch_size(self, height: int, width: int) -> int:
        return int(self._loaded()[0].shape[-1])

    def check_image_size(self, height: int, width: int) -> None:
        _, optimised_at = self._loaded()
        if optimised_at is not None and optimised_at != min(height, width):
            raise UserError(f"trigger {self.name!r}: the patch in {self.patch} was optimised for "
                            f"{optimised_at} px images, these are {height}x{width} (optimise one at this "
                            "resolution)")
        super().check_image_size(height, width)

    def make_patch(self, image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
        return self._loaded()[0]


TRIGGERS: dict[str, type[Trigger]] = {cls.name: cls for cls in (
    BadNetNoise, FixedPatch, Blended, SIG, WaNet, BadNetStripes, BlendedStripes, BlendedTriangles,
    BlendedText, BadCLIPPatch)}


def list_triggers() -> list[str]:
    return list(TRIGGERS)


def trigger_defaults(name: str) -> dict[str, Any]:
    """The parameters of trigger ``name`` with their defaults."""
    return dict(_trigger_class(name)().params)


def _trigger_class(name: str) -> type[Trigger]:
    if name not in TRIGGERS:
        raise UserError(f"unknown trigger {name!r}; choose from {', '.join(TRIGGERS)}")
    return TRIGGERS[name]


def _coerce(name: str, key: str, value: Any, annotation: str) -> Any:
    """Turn a CLI string (``"4"``, ``"none"``) into the parameter's declared type."""
    if not isinstance(value, str):
        if "float" in annotation and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    if "None" in annotation and value.lower() in ("none", "auto", ""):
        return None
    try:
        if annotation.startswith("int"):
            return int(value)
        if annotation.startswith("float"):
            return float(value)
    except ValueError:
        kind = "an integer" if annotation.startswith("int") else "a number"
        raise UserError(f"trigger {name!r}: {key}={value!r} is not {kind}") from None
    return value


def get_trigger(name: str, **params: Any) -> Trigger:
    """Build trigger ``name``; unknown names or parameters raise ``UserError`` listing the valid ones."""
    cls = _trigger_class(name)
    hints = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(hints))
    if unknown:
        raise UserError(f"trigger {name!r} has no parameter {', '.join(unknown)}; "
                        f"valid: {', '.join(f'{k}={v}' for k, v in trigger_defaults(name).items())}")
    typed = {key: _coerce(name, key, value, hints[key]) for key, value in params.items()}
    return cls(**typed)


def parse_trigger_params(items: typing.Iterable[str]) -> dict[str, str]:
    """``["size=4", "location=corner"]`` -> ``{"size": "4", "location": "corner"}``."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"trigger parameter {item!r} must look like key=value")
        params[key.strip()] = value.strip()
    return params


def apply_trigger_uint8(images: torch.Tensor, trigger: Trigger, generator: torch.Generator) -> torch.Tensor:
    """uint8 ``[3,H,W]`` or ``[B,3,H,W]`` -> float [0, 1] -> trigger -> uint8 (round + clamp)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    return to_uint8(trigger(images.float() / 255, generator))


def trigger_image(image: Image.Image | torch.Tensor, trigger: Trigger, image_size: int,
                  generator: torch.Generator) -> torch.Tensor:
    """The one trigger path for poisoning and testing: squash to ``image_size``, trigger, quantise."""
    return apply_trigger_uint8(squash(image, image_size), trigger, generator)
