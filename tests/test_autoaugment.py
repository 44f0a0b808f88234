"""The SSL image view against its definition: torchvision's AutoAugment on PIL images.

Oracles: Pillow itself, called the way torchvision's ``functional_pil`` calls it (the affine matrix
re-derived here from torchvision's ``_get_inverse_affine_matrix``); the policy tables and magnitude
bins typed in from torchvision's ``autoaugment.py``; a per-image re-enactment of torchvision's
``AutoAugment.forward`` on PIL images, fed the view's own random draws.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from clip_backdoor.data import autoaugment as aa
from clip_backdoor.data.augment import POLICIES, ImageView
from clip_backdoor.errors import UserError

# ---------------------------------------------------------------------------------------------------
# torchvision's definitions, typed in from torchvision/transforms/autoaugment.py
# ---------------------------------------------------------------------------------------------------

# fmt: off
TORCHVISION_POLICIES = {
    "imagenet": [
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)), (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)), (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)), (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)), (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ],
    "cifar10": [
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)), (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)), (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)), (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)), (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)), (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)), (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)), (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ],
    "svhn": [
        (("ShearX", 0.9, 4), ("Invert", 0.2, None)), (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.6, None), ("Solarize", 0.6, 6)), (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)), (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.4, None)), (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
        (("Invert", 0.9, None), ("AutoContrast", 0.8, None)), (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)), (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)), (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)), (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
        (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)), (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
        (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)), (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
        (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)), (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
        (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)), (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
        (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
    ],
}
# fmt: on
SIGNED_OPS = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
              "Sharpness"}


def torchvision_magnitudes(op: str, width: int, height: int) -> list[float]:
    """``_augmentation_space(10, [width, height])[op][0]``, read back as Python floats."""
    if op in ("ShearX", "ShearY"):
        values = torch.linspace(0.0, 0.3, 10)
    elif op == "TranslateX":
        values = torch.linspace(0.0, 150.0 / 331.0 * width, 10)
    elif op == "TranslateY":
        values = torch.linspace(0.0, 150.0 / 331.0 * height, 10)
    elif op == "Rotate":
        values = torch.linspace(0.0, 30.0, 10)
    elif op in ("Brightness", "Color", "Contrast", "Sharpness"):
        values = torch.linspace(0.0, 0.9, 10)
    elif op == "Posterize":
        values = 8 - (torch.arange(10) / ((10 - 1) / 4)).round().int()
    elif op == "Solarize":
        values = torch.linspace(255.0, 0.0, 10)
    else:
        values = torch.zeros(10)
    return [float(v) for v in values]


def torchvision_inverse_affine(center, angle, translate, scale, shear):
    """torchvision's ``_get_inverse_affine_matrix``: M^-1 = C RSS^-1 C^-1 T^-1, as PIL wants it."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    matrix = [x / scale for x in (d, -b, 0.0, -c, a, 0.0)]
    matrix[2] += matrix[0] * (-cx - tx) + matrix[1] * (-cy - ty)
    matrix[5] += matrix[3] * (-cx - tx) + matrix[4] * (-cy - ty)
    matrix[2] += cx
    matrix[5] += cy
    return matrix


def pil_affine(img, translate, shear, center=None):
    """``F.affine(img, angle=0, translate, scale=1, shear, NEAREST, fill=None, center)`` on a PIL image."""
    w, h = img.size
    center = [w * 0.5, h * 0.5] if center is None else center
    matrix = torchvision_inverse_affine(center, 0.0, translate, 1.0, shear)
    return img.transform(img.size, Image.AFFINE, matrix, Image.NEAREST, fillcolor=(0, 0, 0))


def torchvision_apply_op(img: Image.Image, op: str, magnitude: float) -> Image.Image:
    """torchvision's ``_apply_op`` on a PIL image with AutoAugment's defaults (nearest, fill None)."""
    if op == "ShearX":
        return pil_affine(img, [0, 0], [math.degrees(math.atan(magnitude)), 0.0], center=[0, 0])
    if op == "ShearY":
        return pil_affine(img, [0, 0], [0.0, math.degrees(math.atan(magnitude))], center=[0, 0])
    if op == "TranslateX":
        return pil_affine(img, [int(magnitude), 0], [0.0, 0.0])
    if op == "TranslateY":
        return pil_affine(img, [0, int(magnitude)], [0.0, 0.0])
    if op == "Rotate":
        return img.rotate(magnitude, Image.NEAREST, False, None, fillcolor=(0, 0, 0))
    enhancers = {"Brightness": ImageEnhance.Brightness, "Color": ImageEnhance.Color,
                 "Contrast": ImageEnhance.Contrast, "Sharpness": ImageEnhance.Sharpness}
    if op in enhancers:
        return enhancers[op](img).enhance(1.0 + magnitude)
    if op == "Posterize":
        return ImageOps.posterize(img, int(magnitude))
    if op == "Solarize":
        return ImageOps.solarize(img, magnitude)
    return {"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize,
            "Invert": ImageOps.invert}[op](img)


def torchvision_forward(img: Image.Image, policy, subpolicy: int, fired, negative) -> Image.Image:
    """``AutoAugment.forward`` on one PIL image, with its random draws given."""
    for i, (op, _, level) in enumerate(policy[subpolicy]):
        if fired[i]:
            magnitude = torchvision_magnitudes(op, *img.size)[level] if level is not None else 0.0
            if op in SIGNED_OPS and negative[i]:
                magnitude *= -1.0
            img = torchvision_apply_op(img, op, magnitude)
    return img


# ---------------------------------------------------------------------------------------------------
# Test images
# ---------------------------------------------------------------------------------------------------


def sample_images(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 ``[n, h, w, 3]``: uniform noise, smooth colour gradients, few grey levels, a narrow value
    range (auto-contrast stretches it), two values only, one value only (equalize's identity cases)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    gradient = np.stack([255 * xx / max(w - 1, 1), 255 * yy / max(h - 1, 1), 255 * (xx + yy) / (h + w)], -1)
    images = [
        rng.integers(0, 256, (h, w, 3)),
        gradient,
        (rng.integers(0, 4, (h, w, 3)) * 70 + 20),
        rng.integers(100, 131, (h, w, 3)),
        np.where(rng.random((h, w, 1)) < 0.3, 40, 200).repeat(3, -1),
        np.full((h, w, 3), 77),
    ]
    return np.stack(images).astype(np.uint8)


def to_batch(arrays: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arrays)).permute(0, 3, 1, 2).contiguous()


def to_arrays(batch: torch.Tensor) -> np.ndarray:
    return batch.permute(0, 2, 3, 1).numpy()


def assert_matches_pil(mine: np.ndarray, ref: np.ndarray, op: str, what: str) -> None:
    """Exact, except ``Image.blend``'s float32 expression, whose rounding a C compiler may fuse
    differently: there at most 1 grey level, on at most 0.5% of the values."""
    diff = np.abs(mine.astype(int) - ref.astype(int))
    if op in aa.ENHANCE:
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.005, (what, diff.max(), (diff > 0).mean())
    else:
        assert diff.max() == 0, (what, diff.max(), int((diff > 0).sum()))


SIZES = [(32, 32), (31, 45), (24, 17), (224, 224)]


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["imagenet", "cifar10", "svhn"])
def test_policy_tables_are_torchvisions_entry_by_entry(policy):
    expected = TORCHVISION_POLICIES[policy]
    got = ImageView(policy).subpolicies
    assert len(got) == len(expected) == 25
    for k, (mine, theirs) in enumerate(zip(got, expected)):
        assert len(mine) == 2
        for stage in range(2):
            assert tuple(mine[stage]) == theirs[stage], (policy, k, stage)
    assert POLICIES == ("imagenet", "cifar10", "svhn")


@pytest.mark.parametrize("h, w", [(32, 32), (31, 45), (224, 224)])
def test_magnitude_bins_are_torchvisions(h, w):
    for op in aa.OPS:
        assert aa.magnitude_bins(op, h, w) == torchvision_magnitudes(op, w, h), op
    # the same bins by hand, independently of torch.linspace
    approx = pytest.approx
    assert aa.magnitude_bins("ShearX", h, w) == approx([0.3 * i / 9 for i in range(10)], abs=1e-6)
    assert aa.magnitude_bins("TranslateX", h, w) == approx([150 / 331 * w * i / 9 for i in range(10)], 1e-5)
    assert aa.magnitude_bins("TranslateY", h, w) == approx([150 / 331 * h * i / 9 for i in range(10)], 1e-5)
    assert aa.magnitude_bins("Rotate", h, w) == approx([30 * i / 9 for i in range(10)], abs=1e-5)
    assert aa.magnitude_bins("Color", h, w) == approx([0.9 * i / 9 for i in range(10)], abs=1e-6)
    assert aa.magnitude_bins("Posterize", h, w) == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert aa.magnitude_bins("Solarize", h, w) == approx([255 * (1 - i / 9) for i in range(10)], abs=1e-4)


def test_audited_magnitudes():
    """The values the audit found kornia getting wrong, at torchvision's bins."""
    bins = aa.magnitude_bins
    assert 1 + bins("Color", 32, 32)[0] == 1.0  # identity, not near-grey
    assert bins("Posterize", 32, 32)[8] == 4  # bits kept
    assert bins("Solarize", 32, 32)[8] == pytest.approx(255 / 9)  # threshold falls with the bin
    assert int(bins("TranslateX", 224, 224)[9]) == 101


# ---------------------------------------------------------------------------------------------------
# Every op against PIL
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", aa.OPS)
@pytest.mark.parametrize("h, w", SIZES)
def test_op_matches_pil_at_every_bin_and_sign(op, h, w):
    arrays = sample_images(h, w, seed=h * w)
    batch = to_batch(arrays)
    signs = (1.0, -1.0) if op in SIGNED_OPS else (1.0,)
    levels = range(10) if op not in ("AutoContrast", "Equalize", "Invert") else [0]
    for level in levels:
        for sign in signs:
            magnitude = torchvision_magnitudes(op, w, h)[level] * sign
            mine = to_arrays(aa.apply_op(batch, op, magnitude))
            ref = np.stack([np.asarray(torchvision_apply_op(Image.fromarray(a), op, magnitude))
                            for a in arrays])
            assert_matches_pil(mine, ref, op, f"{op} bin {level} sign {sign} {h}x{w}")


@pytest.mark.parametrize("op", aa.OPS)
def test_op_with_a_different_magnitude_per_image(op):
    """One call, one magnitude per image (how a batch is run): each image as PIL would do it alone."""
    h, w = 29, 36
    arrays = sample_images(h, w, seed=5)
    mags = torchvision_magnitudes(op, w, h)
    sign = -1 if op in SIGNED_OPS else 1
    per_image = [mags[(3 * i + 1) % 10] * (sign if i % 2 else 1) for i in range(len(arrays))]
    mine = to_arrays(aa.apply_op(to_batch(arrays), op, per_image))
    ref = np.stack([np.asarray(torchvision_apply_op(Image.fromarray(a), op, m))
                    for a, m in zip(arrays, per_image)])
    assert_matches_pil(mine, ref, op, op)


def test_geometric_ops_move_pixels_the_right_way():
    """Constructed cases, independent of PIL: a positive TranslateX moves content right, a positive
    ShearX moves row y left by m (y + 0.5) (the inverse map reads x + m (y + 0.5)), a positive
    rotation turns counter-clockwise, and uncovered pixels are 0."""
    img = torch.zeros(1, 3, 9, 9, dtype=torch.uint8)
    img[0, :, 4, 4] = 200
    moved = aa.apply_op(img, "TranslateX", 2.7)  # int(2.7) = 2 px
    assert moved[0, 0, 4, 6] == 200 and moved.sum() == 600
    ramp = torch.arange(10, dtype=torch.uint8).mul(20).view(1, 1, 1, 10).expand(1, 3, 4, 10).contiguous()
    sheared = aa.apply_op(ramp, "ShearX", 1.0)  # reads input x = floor(x + 0.5 + (y + 0.5))
    for y in range(4):
        expected = [20 * (x + y + 1) if x + y + 1 < 10 else 0 for x in range(10)]
        assert sheared[0, 0, y].tolist() == expected
    dot = torch.zeros(1, 3, 11, 11, dtype=torch.uint8)
    dot[0, :, 5, 9] = 255  # right of the centre
    turned = aa.apply_op(dot, "Rotate", 90.0)  # counter-clockwise: ends above the centre
    ys, xs = torch.nonzero(turned[0, 0], as_tuple=True)
    assert (ys.tolist(), xs.tolist()) == ([1], [5])


def test_enhance_ops_at_factor_one_are_identities():
    arrays = sample_images(20, 23)
    batch = to_batch(arrays)
    for op in aa.ENHANCE:
        assert torch.equal(aa.apply_op(batch, op, 0.0), batch), op


# ---------------------------------------------------------------------------------------------------
# The whole view against torchvision's forward, per image
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["imagenet", "cifar10", "svhn"])
@pytest.mark.parametrize("h, w", [(32, 32), (27, 40)])
def test_view_equals_torchvisions_forward_on_each_pil_image(policy, h, w):
    view = ImageView(policy)
    arrays = np.concatenate([sample_images(h, w, seed=s) for s in range(12)])  # 72 images
    x = to_batch(arrays).float() / 255
    seed = 1234
    out = to_arrays((view(x, generator=seed) * 255).round().to(torch.uint8))
    draws = view.draw(len(arrays), seed)
    ops_seen = set()
    for i, a in enumerate(arrays):
        sub = int(draws.subpolicy[i])
        fired, negative = draws.fired[i].tolist(), draws.negative[i].tolist()
        ops_seen |= {e[0] for e, f in zip(TORCHVISION_POLICIES[policy][sub], fired) if f}
        ref = np.asarray(torchvision_forward(Image.fromarray(a), TORCHVISION_POLICIES[policy], sub, fired,
                                             negative))
        diff = np.abs(out[i].astype(int) - ref.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.005, (i, sub, fired, negative, diff.max())
    assert len(ops_seen) >= 5  # the batch exercised several ops


def test_untouched_images_are_returned_bit_for_bit():
    view = ImageView()
    x = to_batch(sample_images(16, 16)).float() / 255
    draws = view.draw(len(x), 3)
    y = view(x, 3)
    untouched = ~draws.fired.any(1)
    assert untouched.any()
    assert torch.equal(y[untouched], x[untouched])


# ---------------------------------------------------------------------------------------------------
# Random draws
# ---------------------------------------------------------------------------------------------------


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    if p in (0.0, 1.0):
        return count == n * p
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("policy", ["imagenet", "cifar10", "svhn"])
def test_draw_frequencies_over_20000_images(policy):
    view, n = ImageView(policy), 20_000
    d = view.draw(n, seed=99)
    table = TORCHVISION_POLICIES[policy]
    counts = torch.bincount(d.subpolicy, minlength=25)
    for k in range(25):  # each sub-policy 1/25
        assert within(int(counts[k]), n, 1 / 25), (k, int(counts[k]))
    for k, sub in enumerate(table):  # each entry fires with its probability (else: identity)
        rows = d.subpolicy == k
        for stage, (op, p, _) in enumerate(sub):
            assert within(int(d.fired[rows, stage].sum()), int(rows.sum()), p), (k, stage, op, p)
    # each op's share of fired entries, summed over the table
    fired_ops = [table[int(s)][stage][0]
                 for s, f in zip(d.subpolicy, d.fired) for stage in range(2) if f[stage]]
    for op in {e[0] for sub in table for e in sub}:
        p = sum(e[1] for sub in table for e in sub if e[0] == op) / 25
        assert within(fired_ops.count(op), n, p), (op, fired_ops.count(op), n * p)
    # signs: half of the fired signed entries are negated, per stage
    for stage in range(2):
        signed = torch.tensor([table[int(s)][stage][0] in SIGNED_OPS for s in d.subpolicy])
        signed &= d.fired[:, stage]
        assert signed.sum() > 500
        assert within(int(d.negative[signed, stage].sum()), int(signed.sum()), 0.5), stage
    assert within(int(d.negative.sum()), 2 * n, 0.5)


def test_the_view_uses_the_signs_it_draws():
    """Over many images, a Rotate entry turns either way about equally often (its output matches
    the drawn sign's PIL rotation)."""
    view = ImageView("imagenet")
    n, h, w = 400, 16, 16
    arrays = np.random.default_rng(0).integers(0, 256, (n, h, w, 3)).astype(np.uint8)
    y = to_arrays((view(to_batch(arrays).float() / 255, 7) * 255).round().to(torch.uint8))
    d = view.draw(n, 7)
    table = TORCHVISION_POLICIES["imagenet"]
    turned = {True: 0, False: 0}
    for i in range(n):
        sub = int(d.subpolicy[i])
        if table[sub][0][0] == "Rotate" and d.fired[i, 0] and not d.fired[i, 1]:
            angle = torchvision_magnitudes("Rotate", w, h)[table[sub][0][2]]
            negative = bool(d.negative[i, 0])
            ref = torchvision_apply_op(Image.fromarray(arrays[i]), "Rotate", -angle if negative else angle)
            assert np.array_equal(y[i], np.asarray(ref))
            turned[negative] += 1
    assert turned[True] >= 5 and turned[False] >= 5, turned


# ---------------------------------------------------------------------------------------------------
# Seeding, batches, devices
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def view():
    return ImageView("imagenet")


def structured(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """float [0, 1] images on the 8-bit grid, as the training loop passes them."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    base = (ramp.view(1, 1, size, 1) * ramp.view(1, 1, 1, size)) ** 0.5
    colour = torch.rand(n, 3, 1, 1, generator=g)
    x = colour * base + (1 - colour) * base.flip(-1) + 0.1 * torch.rand(n, 3, size, size, generator=g)
    x = 0.05 + 0.9 * (x - x.amin()) / (x.amax() - x.amin())
    return (x * 255).round() / 255


def test_seeded_calls_repeat_and_leave_global_rngs_alone(view):
    x = structured(16, 32)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    a, b, c = view(x, 7), view(x, 7), view(x, 8)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    d, e, f = view(x, g1), view(x, g2), view(x, g1)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert torch.equal(a, b) and torch.equal(d, e)
    assert not torch.equal(a, c) and not torch.equal(d, f)  # a generator advances: a fresh draw
    assert not torch.equal(view(x), view(x))  # no seed: fresh draws from the global RNG


def test_an_images_view_does_not_depend_on_the_rest_of_the_batch(view):
    x = structured(40, 24, seed=2)
    full = view(x, 11)
    assert torch.equal(view(x[:9], 11), full[:9])  # a shorter batch: same views
    other = x.clone()
    other[0] = structured(1, 24, seed=9)[0]  # a different first image: the others keep their views
    assert torch.equal(view(other, 11)[1:], full[1:])


def test_the_view_changes_images_on_average(view):
    """Per image and batch-wide: the share of images changed matches 1 - E[(1 - p1)(1 - p2)]."""
    table = TORCHVISION_POLICIES["imagenet"]
    untouched = sum((1 - a[1]) * (1 - b[1]) for a, b in table) / 25
    x = structured(500, 32, seed=1)
    y = view(x, 123)
    changed = ((y - x).abs().flatten(1).amax(1) > 0).float().mean().item()
    assert abs(changed - (1 - untouched)) < 0.07, (changed, 1 - untouched)  # sd 0.02
    batch_wide = ImageView(per_image=False)
    changed_calls = []
    for seed in range(150):
        yb = batch_wide(x[:8], seed)
        changed_calls.append(bool((yb != x[:8]).any()))
        d = batch_wide.draw(8, seed)
        assert (d.subpolicy == d.subpolicy[0]).all() and (d.fired == d.fired[0]).all()
    share = sum(changed_calls) / len(changed_calls)
    assert abs(share - (1 - untouched)) < 0.2, share  # sd 0.04
    assert (y - x).abs().mean() > 0.02


@pytest.mark.parametrize("shape", [(8, 3, 32, 32), (4, 3, 24, 40), (3, 32, 32)])
def test_output_keeps_shape_dtype_and_range(view, shape):
    x = torch.rand(*shape)
    y = view(x, 0)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert y.min() >= 0 and y.max() <= 1


def test_bad_input():
    listing = "unknown AutoAugment policy 'mnist'; choose one of imagenet, cifar10, svhn"
    with pytest.raises(UserError, match=listing):
        ImageView("mnist")
    with pytest.raises(ValueError, match="float"):
        ImageView()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("policy", ["imagenet", "cifar10", "svhn"])
def test_cuda_equals_cpu_and_leaves_rngs_alone(policy):
    view = ImageView(policy)
    x = structured(64, 32)
    states = torch.get_rng_state(), torch.cuda.get_rng_state()
    a, b = view(x.cuda(), 5), view(x.cuda(), 5)
    assert a.device.type == "cuda" and torch.equal(a, b)
    assert torch.equal(a.cpu(), view(x, 5))
    assert torch.equal(torch.get_rng_state(), states[0])
    assert torch.equal(torch.cuda.get_rng_state(), states[1])
