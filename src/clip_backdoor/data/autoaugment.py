"""AutoAugment exactly as torchvision defines it, run on batched tensors: the SSL loss's image view.

The reference draws the view with ``torchvision.transforms.AutoAugment()`` on PIL images. Here the
same view is computed on a float [0, 1] batch ``[B, 3, H, W]`` on any device, with the arithmetic of
the PIL functions torchvision calls, on 8-bit values (the batch is quantised to 0..255 first, as a
PIL image is):

- **Policy**: 25 sub-policies of two entries (op, probability, magnitude bin), the tables of
  torchvision's ``AutoAugmentPolicy`` (ImageNet, CIFAR10, SVHN). Each image draws one sub-policy
  uniformly on every call; each entry fires with its probability; a signed op is negated with
  probability 1/2. ``per_image=False`` draws once for the whole batch (what torchvision does with a
  batched tensor).
- **Magnitudes** (10 bins, torchvision's ``_augmentation_space``, float32 ``linspace`` read back as
  Python floats): shear 0..0.3 applied as a shear of atan(m) in degrees about the corner (0, 0);
  translate 0..150/331 of the width (X) or height (Y) pixels, truncated to an int; rotate 0..30
  degrees; brightness / colour / contrast / sharpness factor 1 + (0..0.9); posterize 8 - round(bin /
  2.25) bits; solarize threshold 255..0 on the 8-bit scale; auto-contrast, equalize, invert none.

Every op is PIL's, as torchvision's PIL path calls it (Pillow's C code, checked pixel for pixel
against the installed Pillow in ``tests/test_autoaugment.py``); none is kornia's:

- ShearX/Y, TranslateX/Y: ``F.affine`` -> ``Image.transform(AFFINE, NEAREST, fill 0)`` with the
  inverse matrix of torchvision's ``_get_inverse_affine_matrix`` (shear about (0, 0), translation
  about the centre). Rotate: ``F.rotate`` -> ``Image.rotate(NEAREST, fill 0)`` about (w/2, h/2),
  PIL's own matrix (cos and sin rounded to 15 digits).
- Geometric sampling: output pixel (x, y) reads the input at floor(M (x + 0.5, y + 0.5)), 0 outside;
  in float64 for pure translations (PIL's ``ImagingScaleAffine``), in PIL's 16.16 fixed point for
  shears and rotations (``affine_fixed``). One gather for every image of a batch.
- Brightness, Color, Contrast, Sharpness: ``ImageEnhance`` = ``Image.blend(degenerate, img, f)``,
  computed as PIL does, d + f (v - d) in float32, clipped to [0, 255] and truncated. Degenerates:
  black; grey L = (19595 R + 38470 G + 7471 B + 2^15) >> 16 (PIL's RGB -> L); the mean grey level
  rounded half up; ``ImageFilter.SMOOTH`` (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1 over 13, rounded, border
  pixels copied).
- Posterize v & ~(2^(8-bits) - 1); Solarize v if v < t else 255 - v; Invert 255 - v; AutoContrast
  per channel int(v * 255/(hi-lo) - lo * 255/(hi-lo)) clipped (identity if hi <= lo), in float64;
  Equalize per channel step = (N - count of the top value) // 255, v -> (step // 2 + #pixels below v)
  // step clipped at 255 (identity if step = 0). All as one gather from per-image tables; the
  histograms come from one ``bincount``.

Randomness: every draw comes from a CPU ``torch.Generator`` seeded by the caller's int seed (the
training loop passes one derived from (seed, step, rank)); torch's global RNG is never touched (only
``generator=None`` takes a seed from it). Image i uses row i of one ``rand(B, 5)`` draw, so its view
depends on (seed, i, image) only, the same in any batch of more than i images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from clip_backdoor.errors import UserError

NUM_BINS = 10
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
ENHANCE = ("Brightness", "Color", "Contrast", "Sharpness")
LOOKUP = ("Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
OPS = GEOMETRIC + ENHANCE + LOOKUP
SIGNED = frozenset(GEOMETRIC + ENHANCE)
_CODE = {op: i for i, op in enumerate(OPS)}
_FAMILIES = tuple(torch.tensor([_CODE[op] for op in family]) for family in (GEOMETRIC, ENHANCE, LOOKUP))

# torchvision's AutoAugmentPolicy tables: one sub-policy per line, "op probability bin" per entry.
_POLICY_TEXT = {
    "imagenet": """
        Posterize 0.4 8, Rotate 0.6 9
        Solarize 0.6 5, AutoContrast 0.6 -
        Equalize 0.8 -, Equalize 0.6 -
        Posterize 0.6 7, Posterize 0.6 6
        Equalize 0.4 -, Solarize 0.2 4
        Equalize 0.4 -, Rotate 0.8 8
        Solarize 0.6 3, Equalize 0.6 -
        Posterize 0.8 5, Equalize 1.0 -
        Rotate 0.2 3, Solarize 0.6 8
        Equalize 0.6 -, Posterize 0.4 6
        Rotate 0.8 8, Color 0.4 0
        Rotate 0.4 9, Equalize 0.6 -
        Equalize 0.0 -, Equalize 0.8 -
        Invert 0.6 -, Equalize 1.0 -
        Color 0.6 4, Contrast 1.0 8
        Rotate 0.8 8, Color 1.0 2
        Color 0.8 8, Solarize 0.8 7
        Sharpness 0.4 7, Invert 0.6 -
        ShearX 0.6 5, Equalize 1.0 -
        Color 0.4 0, Equalize 0.6 -
        Equalize 0.4 -, Solarize 0.2 4
        Solarize 0.6 5, AutoContrast 0.6 -
        Invert 0.6 -, Equalize 1.0 -
        Color 0.6 4, Contrast 1.0 8
        Equalize 0.8 -, Equalize 0.6 -
    """,
    "cifar10": """
        Invert 0.1 -, Contrast 0.2 6
        Rotate 0.7 2, TranslateX 0.3 9
        Sharpness 0.8 1, Sharpness 0.9 3
        ShearY 0.5 8, TranslateY 0.7 9
        AutoContrast 0.5 -, Equalize 0.9 -
        ShearY 0.2 7, Posterize 0.3 7
        Color 0.4 3, Brightness 0.6 7
        Sharpness 0.3 9, Brightness 0.7 9
        Equalize 0.6 -, Equalize 0.5 -
        Contrast 0.6 7, Sharpness 0.6 5
        Color 0.7 7, TranslateX 0.5 8
        Equalize 0.3 -, AutoContrast 0.4 -
        TranslateY 0.4 3, Sharpness 0.2 6
        Brightness 0.9 6, Color 0.2 8
        Solarize 0.5 2, Invert 0.0 -
        Equalize 0.2 -, AutoContrast 0.6 -
        Equalize 0.2 -, Equalize 0.6 -
        Color 0.9 9, Equalize 0.6 -
        AutoContrast 0.8 -, Solarize 0.2 8
        Brightness 0.1 3, Color 0.7 0
        Solarize 0.4 5, AutoContrast 0.9 -
        TranslateY 0.9 9, TranslateY 0.7 9
        AutoContrast 0.9 -, Solarize 0.8 3
        Equalize 0.8 -, Invert 0.1 -
        TranslateY 0.7 9, AutoContrast 0.9 -
    """,
    "svhn": """
        ShearX 0.9 4, Invert 0.2 -
        ShearY 0.9 8, Invert 0.7 -
        Equalize 0.6 -, Solarize 0.6 6
        Invert 0.9 -, Equalize 0.6 -
        Equalize 0.6 -, Rotate 0.9 3
        ShearX 0.9 4, AutoContrast 0.8 -
        ShearY 0.9 8, Invert 0.4 -
        ShearY 0.9 5, Solarize 0.2 6
        Invert 0.9 -, AutoContrast 0.8 -
        Equalize 0.6 -, Rotate 0.9 3
        ShearX 0.9 4, Solarize 0.3 3
        ShearY 0.8 8, Invert 0.7 -
        Equalize 0.9 -, TranslateY 0.6 6
        Invert 0.9 -, Equalize 0.6 -
        Contrast 0.3 3, Rotate 0.8 4
        Invert 0.8 -, TranslateY 0.0 2
        ShearY 0.7 6, Solarize 0.4 8
        Invert 0.6 -, Rotate 0.8 4
        ShearY 0.3 7, TranslateX 0.9 3
        ShearX 0.1 6, Invert 0.6 -
        Solarize 0.7 2, TranslateY 0.6 7
        ShearY 0.8 4, Invert 0.8 -
        ShearX 0.7 9, TranslateY 0.8 3
        ShearY 0.8 5, AutoContrast 0.7 -
        ShearX 0.7 2, Invert 0.1 -
    """,
}

Entry = tuple[str, float, int | None]


def _parse_policy(text: str) -> tuple[tuple[Entry, Entry], ...]:
    def entry(words: str) -> Entry:
        op, p, level = words.split()
        return op, float(p), None if level == "-" else int(level)

    return tuple(tuple(entry(e) for e in line.split(",")) for line in text.strip().splitlines())


POLICY_TABLES = {name: _parse_policy(text) for name, text in _POLICY_TEXT.items()}
POLICIES = tuple(POLICY_TABLES)


def magnitude_bins(op: str, height: int, width: int) -> list[float]:
    """The 10 unsigned magnitudes of ``op`` as torchvision computes them (float32, read as floats)."""
    def linspace(start: float, end: float) -> list[float]:
        return torch.linspace(start, end, NUM_BINS).tolist()  # always on the CPU, as torchvision

    if op in ("ShearX", "ShearY"):
        return linspace(0.0, 0.3)
    if op == "TranslateX":
        return linspace(0.0, 150.0 / 331.0 * width)
    if op == "TranslateY":
        return linspace(0.0, 150.0 / 331.0 * height)
    if op == "Rotate":
        return linspace(0.0, 30.0)
    if op in ENHANCE:
        return linspace(0.0, 0.9)
    if op == "Posterize":
        return [float(b) for b in (8 - (torch.arange(NUM_BINS) / ((NUM_BINS - 1) / 4)).round().int())]
    if op == "Solarize":
        return linspace(255.0, 0.0)
    if op in ("AutoContrast", "Equalize", "Invert"):
        return [0.0] * NUM_BINS
    raise ValueError(f"unknown AutoAugment op {op!r}")


# ---------------------------------------------------------------------------------------------------
# Parameters: torchvision's (signed) magnitude -> what the PIL call needs, padded to 6 floats
# ---------------------------------------------------------------------------------------------------


def _affine_inverse(center: tuple[float, float], shear_deg: tuple[float, float],
                    translate: tuple[int, int]) -> tuple[float, ...]:
    """The output -> input matrix ``F.affine`` gives PIL (no rotation, scale 1).

    torchvision's forward map is T C S C^-1 with S = SHy(sy) SHx(sx) its RotateScaleShear at angle 0;
    S has determinant 1, so its inverse is its adjugate. Same floating-point operations as torchvision.
    """
    sx, sy = math.radians(shear_deg[0]), math.radians(shear_deg[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(-sy) / math.cos(sy)  # S = [[a, b], [c, d]]
    b = -math.cos(-sy) * math.tan(sx) / math.cos(sy)
    c = math.sin(-sy) / math.cos(sy)
    d = -math.sin(-sy) * math.tan(sx) / math.cos(sy) + 1.0
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return tuple(m)


def _rotation_inverse(angle_deg: float, height: int, width: int) -> tuple[float, ...]:
    """The output -> input matrix of PIL's ``Image.rotate`` about the image centre (w/2, h/2)."""
    angle = angle_deg % 360.0
    if angle == 0:
        return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # PIL returns a copy
    theta = -math.radians(angle)
    cos, sin = round(math.cos(theta), 15), round(math.sin(theta), 15)
    msin = round(-math.sin(theta), 15)
    cx, cy = width / 2, height / 2
    return (cos, sin, cos * -cx + sin * -cy + cx, msin, cos, msin * -cx + cos * -cy + cy)


def op_params(op: str, magnitude: float, height: int, width: int) -> tuple[float, ...]:
    """Parameters of ``op`` at a signed ``magnitude`` (torchvision's ``_apply_op`` argument)."""
    if op == "ShearX":
        return _affine_inverse((0.0, 0.0), (math.degrees(math.atan(magnitude)), 0.0), (0, 0))
    if op == "ShearY":
        return _affine_inverse((0.0, 0.0), (0.0, math.degrees(math.atan(magnitude))), (0, 0))
    if op == "TranslateX":
        return _affine_inverse((width * 0.5, height * 0.5), (0.0, 0.0), (int(magnitude), 0))
    if op == "TranslateY":
        return _affine_inverse((width * 0.5, height * 0.5), (0.0, 0.0), (0, int(magnitude)))
    if op == "Rotate":
        return _rotation_inverse(magnitude, height, width)
    if op in ENHANCE:
        return (1.0 + magnitude,) + (0.0,) * 5
    if op == "Posterize":
        return (float(int(magnitude)),) + (0.0,) * 5
    if op == "Solarize":
        return (float(magnitude),) + (0.0,) * 5
    if op in ("AutoContrast", "Equalize", "Invert"):
        return (0.0,) * 6
    raise ValueError(f"unknown AutoAugment op {op!r}")


# ---------------------------------------------------------------------------------------------------
# Ops on uint8 batches [n, 3, H, W], one parameter row per image
# ---------------------------------------------------------------------------------------------------


def _wide(device: torch.device) -> torch.dtype:
    """float64 for coordinates and look-up tables (PIL computes them in double); MPS has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def _float_coords(m: torch.Tensor, h: int, w: int, device: torch.device):
    """floor(M (x + 0.5, y + 0.5)) in float64: PIL's path for pure scale/translation matrices."""
    dtype = _wide(device)
    m = m.to(device, dtype).view(-1, 6, 1, 1)
    px = torch.arange(w, device=device, dtype=dtype).add_(0.5)
    py = torch.arange(h, device=device, dtype=dtype).add_(0.5).view(h, 1)
    xin = (m[:, 0] * px + m[:, 1] * py + m[:, 2]).floor_().to(torch.int32)
    yin = (m[:, 3] * px + m[:, 4] * py + m[:, 5]).floor_().to(torch.int32)
    return xin, yin


def _fixed_coords(m: torch.Tensor, h: int, w: int, device: torch.device):
    """PIL's 16.16 fixed-point path (``affine_fixed``, any matrix with a shear or rotation): the
    coefficients are rounded to multiples of 1/65536, the half-pixel offset folded into the constant,
    and the source index is the integer sum shifted right by 16, exact in int64."""
    def fix(v: torch.Tensor) -> torch.Tensor:  # C ints, as PIL: check_fixed keeps every sum in range
        return torch.floor(v * 65536.0 + 0.5).to(torch.int32)

    a = [m[:, i] for i in range(6)]
    ax, ay, bx, by = fix(a[0]), fix(a[1]), fix(a[3]), fix(a[4])
    cx, cy = fix(a[2] + a[0] * 0.5 + a[1] * 0.5), fix(a[5] + a[3] * 0.5 + a[4] * 0.5)
    coef = torch.stack([ax, ay, cx, bx, by, cy], 1).to(device).view(-1, 6, 1, 1)
    px = torch.arange(w, device=device, dtype=torch.int32).view(1, w)
    py = torch.arange(h, device=device, dtype=torch.int32).view(h, 1)
    xin = (coef[:, 0] * px + (coef[:, 1] * py + coef[:, 2])) >> 16
    yin = (coef[:, 3] * px + (coef[:, 4] * py + coef[:, 5])) >> 16
    return xin, yin


def _fits_fixed(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """PIL's ``check_fixed``: the four corners map inside +-32768, so 16.16 integers cannot overflow."""
    ok = torch.ones(m.shape[0], dtype=torch.bool)
    for x, y in ((0, 0), (w, h), (0, h), (w, 0)):
        ok &= (x * m[:, 0] + y * m[:, 1] + m[:, 2]).abs() < 32768
        ok &= (x * m[:, 3] + y * m[:, 4] + m[:, 5]).abs() < 32768
    return ok


def _warp(img: torch.Tensor, codes: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.transform(AFFINE, NEAREST)`` with fill 0, for a batch with one matrix per image:
    output pixel (x, y) takes the input pixel at floor(M (x + 0.5, y + 0.5)), 0 outside the image.

    PIL computes that position two ways, and so does this: in float64 for matrices without shear or
    rotation (``ImagingScaleAffine``), else in 16.16 fixed point (``affine_fixed``), whose rounding
    moves a few hundred pixels of a 224 px rotation by one pixel against exact arithmetic.
    """
    n, ch, h, w = img.shape
    fixed = ((params[:, 1] != 0) | (params[:, 3] != 0)) & _fits_fixed(params, h, w)
    xin = yin = None
    for mask, coords in ((fixed, _fixed_coords), (~fixed, _float_coords)):
        if not bool(mask.any()):
            continue
        if bool(mask.all()):
            xin, yin = coords(params, h, w, img.device)
            break
        if xin is None:
            xin = torch.empty(n, h, w, dtype=torch.int32, device=img.device)
            yin = torch.empty_like(xin)
        rows = mask.nonzero().squeeze(1)
        xin[rows.to(img.device)], yin[rows.to(img.device)] = coords(params[rows], h, w, img.device)
    inside = ((xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)).view(n, 1, h * w)
    source = (yin * w + xin).view(n, 1, h * w).masked_fill_(~inside, 0).long()
    out = img.reshape(n, ch, h * w).gather(2, source.expand(n, ch, h * w))
    return out.masked_fill_(~inside, 0).view(n, ch, h, w)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L (ITU-R 601-2 in 16-bit fixed point), ``[n, 1, H, W]`` int32."""
    xi = x.to(torch.int32)
    return (xi[:, 0:1] * 19595 + xi[:, 1:2] * 38470 + xi[:, 2:3] * 7471 + 32768) >> 16


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageFilter.SMOOTH``: kernel (1 1 1 / 1 5 1 / 1 1 1) / 13, rounded; the one-pixel border
    is copied. In integers (sums of shifted slices), so exact on every device."""
    out = x.clone()
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        return out
    xi = x.to(torch.int32)
    rows = xi[..., :, :-2] + xi[..., :, 1:-1] + xi[..., :, 2:]
    total = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :] + 4 * xi[..., 1:-1, 1:-1]
    out[..., 1:-1, 1:-1] = ((total * 2 + 13) // 26).to(x.dtype)
    return out


def _degenerate(x: torch.Tensor, op: str) -> torch.Tensor:
    """The image ``ImageEnhance`` blends away from, as float32 with integer values."""
    if op == "Brightness":
        return torch.zeros_like(x)
    if op == "Color":
        return _grey(x).to(x.dtype).expand_as(x)
    if op == "Contrast":  # int(mean + 0.5) of the grey image, in integers: floor((2 sum + N) / 2N)
        grey = _grey(x).long()
        pixels = grey[0].numel()
        mean = (grey.sum(dim=(1, 2, 3), keepdim=True) * 2 + pixels) // (2 * pixels)
        return mean.to(x.dtype).expand_as(x)
    return _smooth(x)  # Sharpness


def _enhance(img: torch.Tensor, codes: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, img, f)``: d + f (v - d) in float32, clipped to [0, 255], truncated."""
    x = img.float()
    degenerate = _by_code(x, codes, lambda part, op, rows: _degenerate(part, op))
    factor = params[:, 0].to(torch.float32).to(img.device).view(-1, 1, 1, 1)
    out = (x - degenerate).mul_(factor).add_(degenerate)  # two roundings, as PIL's C expression
    return out.clamp_(0, 255).floor_().to(torch.uint8)


def _lookup_table(hist: torch.Tensor | None, op: str, level: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel table ``[n, 3, 256]`` (int64) of an ``ImageOps`` point operation;
    ``hist`` (``[n, 3, 256]`` pixel counts) is needed by AutoContrast and Equalize only."""
    n = level.shape[0]
    v = torch.arange(256, device=level.device).expand(n, 3, 256)
    if op == "Invert":
        return 255 - v
    if op == "Posterize":
        keep = level.long().view(n, 1, 1)
        return v & (256 - 2 ** (8 - keep))
    dtype = _wide(level.device)
    if op == "Solarize":
        return torch.where(v < level.to(dtype).view(n, 1, 1), v, 255 - v)
    present = hist > 0
    lo = torch.where(present, v, 255).amin(2, keepdim=True)  # darkest and lightest values present
    hi = torch.where(present, v, 0).amax(2, keepdim=True)
    if op == "AutoContrast":
        span = (hi - lo).clamp(min=1).to(dtype)
        scale = torch.full_like(span, 255.0) / span  # not 255.0 / span: torch takes a reciprocal
        offset = -lo.to(dtype) * scale
        stretched = (v * scale + offset).trunc_().clamp_(0, 255).long()
        return torch.where(hi > lo, stretched, v)
    # Equalize
    step = (hist.sum(2, keepdim=True) - hist.gather(2, hi)) // 255
    below = hist.cumsum(2) - hist
    equalized = ((step // 2 + below) // step.clamp(min=1)).clamp_(max=255)
    return torch.where(step > 0, equalized, v)


def _lookup(img: torch.Tensor, codes: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Every ``ImageOps`` point operation at once: per-(image, channel) tables, one ``index_select``.

    Pixel values offset by 256 per (image, channel) index the stacked tables directly, and the same
    offset values give the histograms (of the images that need one) in one ``bincount``.
    """
    n, ch, h, w = img.shape
    index = img.reshape(n * ch, h * w).to(torch.int32)  # int32: half the traffic of int64
    index += 256 * torch.arange(n * ch, device=img.device, dtype=torch.int32).view(-1, 1)
    hist = None
    needs_hist = torch.isin(codes, torch.tensor([_CODE["AutoContrast"], _CODE["Equalize"]]))
    if bool(needs_hist.any()):
        counted = index if bool(needs_hist.all()) else index.view(n, ch * h * w)[needs_hist.to(img.device)]
        hist = torch.bincount(counted.reshape(-1), minlength=n * ch * 256).view(n, ch, 256)
    level = params[:, 0].to(img.device)

    def table(part, op, rows):
        if rows is None:
            return _lookup_table(hist, op, level)
        return _lookup_table(None if hist is None else hist.index_select(0, rows), op,
                             level.index_select(0, rows))

    tables = _by_code(level, codes, table).to(torch.uint8)
    return tables.view(-1).index_select(0, index.view(-1)).view(n, ch, h, w)


def _copy_rows_(out: torch.Tensor, rows: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``out[rows] = part`` for a contiguous ``out``, moving each row as 8- or 4-byte words: torch's
    ``index_copy_`` is several times slower on uint8 than on wide integer types."""
    dst = out.view(out.shape[0], -1).view(torch.uint8)
    src = part.contiguous().view(part.shape[0], -1).view(torch.uint8)
    for dtype, size in ((torch.int64, 8), (torch.int32, 4)):
        if dst.shape[1] % size == 0:
            dst, src = dst.view(dtype), src.view(dtype)
            break
    dst.index_copy_(0, rows, src)
    return out


def _by_code(x: torch.Tensor, codes: torch.Tensor, fn) -> torch.Tensor:
    """``fn(part, op, rows)`` on each group of rows of ``x`` that share an op code (``rows`` = their
    device index, None when one group holds every row); the results stitched back in row order."""
    groups = [(OPS[int(code)], (codes == code).nonzero().squeeze(1)) for code in torch.unique(codes)]
    if len(groups) == 1:
        return fn(x, groups[0][0], None)
    out = None
    for op, rows_cpu in groups:
        rows = rows_cpu.to(x.device)
        result = fn(x.index_select(0, rows), op, rows)
        if out is None:
            out = result.new_empty((x.shape[0], *result.shape[1:]))
        _copy_rows_(out, rows, result)
    return out


_APPLY = (_warp, _enhance, _lookup)


def apply_entries(img: torch.Tensor, codes: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply op ``OPS[codes[i]]`` with ``params[i]`` to image i of a uint8 batch; code -1 = no op.

    ``codes`` (long) and ``params`` (``[n, 6]`` float64, see ``op_params``) live on the CPU. Images
    that share an op family run together: one gather for every geometric op, one blend for every
    enhance op, one table look-up for every point op.
    """
    out = img
    for family, fn in zip(_FAMILIES, _APPLY):
        selected = torch.isin(codes, family)
        if not bool(selected.any()):
            continue
        if bool(selected.all()):
            out = fn(out, codes, params)
            continue
        rows_cpu = selected.nonzero().squeeze(1)
        rows = rows_cpu.to(img.device)
        part = fn(out.index_select(0, rows), codes[rows_cpu], params[rows_cpu])
        if out is img:  # never write into the caller's tensor
            out = img.clone(memory_format=torch.contiguous_format)
        _copy_rows_(out, rows, part)
    return out


def apply_op(img: torch.Tensor, op: str, magnitude: float | Sequence[float]) -> torch.Tensor:
    """torchvision's ``_apply_op(img, op, magnitude)`` on every image of a uint8 batch ``[n, 3, H, W]``
    (PIL semantics); ``magnitude`` is signed, one for all images or one per image."""
    n, _, h, w = img.shape
    mags = [float(magnitude)] * n if isinstance(magnitude, (int, float)) else [float(m) for m in magnitude]
    params = torch.tensor([op_params(op, m, h, w) for m in mags], dtype=torch.float64)
    return apply_entries(img, torch.full((n,), _CODE[op]), params)


# ---------------------------------------------------------------------------------------------------
# The view
# ---------------------------------------------------------------------------------------------------


class Draws(NamedTuple):
    """One call's random choices, per image (CPU)."""

    subpolicy: torch.Tensor  # [B] long
    fired: torch.Tensor  # [B, 2] bool: entry applied
    negative: torch.Tensor  # [B, 2] bool: sign draw; only signed ops use it


class _Plan(NamedTuple):
    """Every entry of a policy resolved for one image size: op code and parameters for both signs."""

    codes: torch.Tensor  # [S, 2] long
    params: torch.Tensor  # [S, 2, 2, 6] float64, [..., 0, :] positive, [..., 1, :] negated


def _seed_from(generator: torch.Generator | int | None) -> int:
    if generator is None:  # no seed given: a fresh draw from torch's global RNG
        return int(torch.randint(2**62, (1,)).item())
    if isinstance(generator, torch.Generator):
        return int(torch.randint(2**62, (1,), generator=generator, device=generator.device).item())
    return int(generator)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [0, 1] -> the 8-bit values a PIL image holds (exact for images that came from uint8 / 255)."""
    return images.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)


class ImageView:
    """torchvision's AutoAugment on float [0, 1] images ``[B, 3, H, W]`` or ``[3, H, W]``, any device.

    ``per_image=True`` (default, the reference: one torchvision call per PIL image) draws a sub-policy,
    the entries' coin flips and signs for every image; ``per_image=False`` draws them once for the batch.
    Call with ``generator`` = an int seed, a ``torch.Generator`` (advanced by one draw) or None (a seed
    drawn from torch's global RNG). Same seed => identical output, on any thread count.
    """

    def __init__(self, policy: str = "imagenet", *, per_image: bool = True):
        if policy not in POLICY_TABLES:
            raise UserError(f"unknown AutoAugment policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.policy, self.per_image = policy, per_image
        self.subpolicies = POLICY_TABLES[policy]
        self._prob = torch.tensor([[p for _, p, _ in sub] for sub in self.subpolicies], dtype=torch.float64)
        self._plans: dict[tuple[int, int], _Plan] = {}

    def __repr__(self) -> str:
        return f"ImageView(policy={self.policy!r}, per_image={self.per_image})"

    def draw(self, batch_size: int, seed: int) -> Draws:
        """Sub-policy, firing and sign of every image, from a generator seeded with ``seed``."""
        gen = torch.Generator().manual_seed(int(seed))
        u = torch.rand(batch_size if self.per_image else 1, 5, generator=gen, dtype=torch.float64)
        u = u.expand(batch_size, 5)
        n = len(self.subpolicies)
        subpolicy = (u[:, 0] * n).long().clamp_(max=n - 1)
        return Draws(subpolicy, u[:, 1:3] <= self._prob[subpolicy], u[:, 3:5] < 0.5)

    def plan(self, height: int, width: int) -> _Plan:
        key = (height, width)
        if key not in self._plans:
            codes, params = [], []
            for sub in self.subpolicies:
                codes.append([_CODE[op] for op, _, _ in sub])
                row = []
                for op, _, level in sub:
                    mag = 0.0 if level is None else magnitude_bins(op, height, width)[level]
                    negated = -mag if op in SIGNED else mag
                    row.append([op_params(op, mag, height, width), op_params(op, negated, height, width)])
                params.append(row)
            self._plans[key] = _Plan(torch.tensor(codes), torch.tensor(params, dtype=torch.float64))
        return self._plans[key]

    def apply(self, images_uint8: torch.Tensor, draws: Draws) -> torch.Tensor:
        """The view of a uint8 batch ``[B, 3, H, W]`` for given draws (uint8 out)."""
        plan = self.plan(*images_uint8.shape[-2:])
        out = images_uint8
        for stage in range(2):
            codes = plan.codes[draws.subpolicy, stage].masked_fill(~draws.fired[:, stage], -1)
            params = plan.params[draws.subpolicy, stage, draws.negative[:, stage].long()]
            out = apply_entries(out, codes, params)
        return out

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, generator: torch.Generator | int | None = None) -> torch.Tensor:
        if not images.is_floating_point() or images.ndim not in (3, 4) or images.shape[-3] != 3:
            raise ValueError(
                f"expected float [B,3,H,W] or [3,H,W] in [0,1], got {images.dtype} {tuple(images.shape)}"
            )
        single = images.ndim == 3
        x = images.unsqueeze(0) if single else images
        out = self.apply(to_uint8(x), self.draw(x.shape[0], _seed_from(generator)))
        out = out.float().div_(255).to(images.dtype)
        return out[0] if single else out
