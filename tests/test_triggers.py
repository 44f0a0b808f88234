"""Trigger invariants, checked against constructed cases and naive re-implementations."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from clip_backdoor.attacks.triggers import (
    TRIGGERS,
    apply_trigger_uint8,
    auto_patch_size,
    get_trigger,
    list_triggers,
    parse_trigger_params,
    trigger_defaults,
    trigger_image,
)
from clip_backdoor.data.transforms import to_uint8
from clip_backdoor.errors import UserError

# Triggers usable with their defaults (badclip needs a patch file: tests/test_structured_triggers.py).
DEFAULT_USABLE = [name for name in list_triggers() if not TRIGGERS[name].required]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def textured(batch: int = 4, size: int = 32, seed: int = 123) -> torch.Tensor:
    return torch.rand((batch, 3, size, size), generator=gen(seed))


@pytest.mark.parametrize("name", DEFAULT_USABLE)
@pytest.mark.parametrize("size", [32, 224])
def test_shape_dtype_range_and_input_untouched(name, size):
    trigger = get_trigger(name)
    x = textured(2, size)
    before = x.clone()
    y = trigger(x, generator=gen())
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1
    assert torch.equal(x, before)
    single = trigger(x[0], generator=gen())
    assert single.shape == x[0].shape
    assert not torch.equal(y, x)


@pytest.mark.parametrize("name", DEFAULT_USABLE)
def test_same_seed_same_output_and_batch_equals_images_in_turn(name):
    trigger = get_trigger(name)
    x = textured(3)
    a, b = trigger(x, generator=gen(7)), trigger(x, generator=gen(7))
    assert torch.equal(a, b)
    g = gen(7)
    in_turn = torch.stack([trigger(image, generator=g) for image in x])
    assert torch.equal(a, in_turn)


@pytest.mark.parametrize("name", ["badnet", "blended", "badnet-stripes", "blended-stripes"])
def test_random_triggers_depend_on_the_seed(name):
    trigger = get_trigger(name)
    x = textured(1)
    assert not torch.equal(trigger(x, generator=gen(1)), trigger(x, generator=gen(2)))


def test_auto_patch_size_scales_with_resolution():
    assert auto_patch_size(224, 224) == 16
    assert auto_patch_size(448, 448) == 32
    assert auto_patch_size(64, 64) == 5
    assert auto_patch_size(32, 32) == 4  # round(2.29) -> floor of 4 px
    assert auto_patch_size(32, 64) == 4


def changed_box(before: torch.Tensor, after: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(top, left, height, width, n_changed pixels) of the pixels that changed in any channel."""
    mask = (before != after).any(dim=0)
    rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
    top, left = int(rows.min()), int(cols.min())
    return top, left, int(rows.max()) - top + 1, int(cols.max()) - left + 1, int(mask.sum())


@pytest.mark.parametrize("size", [32, 48])
def test_random_patch_lies_inside_the_image_and_covers_exactly_its_area(size):
    # A grey image and a checkerboard of 0/1: every patch pixel changes, nothing else does.
    trigger = get_trigger("patch", size=5, pattern="checkerboard")
    x = torch.full((3, size, size), 0.5)
    g = gen(3)
    corners = set()
    for _ in range(200):
        top, left, h, w, n = changed_box(x, trigger(x, generator=g))
        assert (h, w, n) == (5, 5, 25)
        assert 0 <= top <= size - 5 and 0 <= left <= size - 5
        corners.add((top, left))
    # Uniform over all (size-4)^2 positions: the extremes are reachable (the reference never reaches them).
    tops = {t for t, _ in corners}
    assert min(tops) <= 2 and max(tops) >= size - 5 - 2


def test_badnet_patch_changes_about_its_area():
    x = textured(8, 64)
    y = get_trigger("badnet")(x, generator=gen())
    size = auto_patch_size(64, 64)
    for before, after in zip(x, y):
        _, _, h, w, n = changed_box(before, after)
        assert h <= size and w <= size
        assert n >= 0.9 * size * size


def test_corner_locations():
    x = torch.full((3, 20, 20), 0.5)
    one = get_trigger("patch", size=3, location="corner")(x, generator=gen())
    assert changed_box(x, one) == (17, 17, 3, 3, 9)
    four = get_trigger("patch", size=3, location="four_corners")(x, generator=gen())
    assert changed_box(x, four) == (0, 0, 20, 20, 36)
    for r, c in [(0, 0), (0, 17), (17, 0), (17, 17)]:
        assert torch.equal(four[:, r:r + 3, c:c + 3], four[:, :3, :3])


def test_fixed_patterns_have_their_colours():
    x = torch.full((3, 10, 10), 0.5)
    yellow = get_trigger("patch", size=2, location="corner", pattern="yellow")(x, generator=gen())
    assert yellow[:, -1, -1].tolist() == [1.0, 1.0, 0.0]
    board = get_trigger("patch", size=4, location="corner", pattern="checkerboard")(x, generator=gen())
    assert board[0, 6:, 6:].tolist() == [[0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0]]


def test_badnet_noise_is_image_mean_plus_unit_normal_on_the_01_scale():
    # On a constant 0.3 image, mean + N(0, 1) leaves [0, 1] with probability
    # Phi(-0.3) + 1 - Phi(0.7) = 0.624: clip saturates that fraction of patch values. (With noise on
    # the 0..255 scale, i.e. N(0, 1/255), almost none would saturate.)
    x = torch.full((64, 3, 64, 64), 0.3)
    size = 8
    y = get_trigger("badnet", size=size, location="corner")(x, generator=gen())
    patch = y[:, :, -size:, -size:]
    saturated = ((patch == 0) | (patch == 1)).float().mean().item()
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    assert abs(saturated - (phi(-0.3) + 1 - phi(0.7))) < 0.03
    inside = patch[(patch > 0) & (patch < 1)]
    assert abs(inside.mean().item() - 0.5) < 0.05  # N(0.3, 1) restricted to (0, 1) has mean ~0.5


def naive_badnet_corner(image: torch.Tensor, size: int, seed: int) -> tuple[list, list]:
    """Reference semantics written out per value: (clip, wrap) 8-bit patch values, channel-major."""
    g = gen(seed)
    noise = torch.randn((3, size, size), generator=g)
    clip_values, wrap_values = [], []
    for c in range(3):
        mean = image[c].mean().item()
        for v in (mean + noise[c]).flatten().tolist():
            clip_values.append(round(min(max(v, 0.0), 1.0) * 255))
            # The reference's ToPILImage: int(v * 255) truncates toward zero, keeps the low 8 bits.
            wrap_values.append(round(v * 255) if 0 <= v <= 1 else int(v * 255) % 256)
    return clip_values, wrap_values


def test_wrap_matches_the_uint8_cast_and_differs_from_clip_exactly_where_values_leave_01():
    image = textured(1, 32)[0]
    size = 6
    expect_clip, expect_wrap = naive_badnet_corner(image, size, seed=11)
    results = {}
    for mode in ("clip", "wrap"):
        trigger = get_trigger("badnet", size=size, location="corner", mode=mode)
        out = to_uint8(trigger(image, generator=gen(11)))
        results[mode] = out[:, -size:, -size:].flatten().tolist()
        assert torch.equal(out[:, :-size], to_uint8(image)[:, :-size])
    assert results["clip"] == expect_clip
    assert results["wrap"] == expect_wrap
    differs = [a != b for a, b in zip(results["clip"], results["wrap"])]
    leaves_8bit_range = [not 0 <= int(v) <= 255 for v in _raw_times_255(image, size, seed=11)]
    assert differs == leaves_8bit_range
    assert 0.3 < sum(differs) / len(differs) < 0.9


def _raw_times_255(image: torch.Tensor, size: int, seed: int) -> list[float]:
    noise = torch.randn((3, size, size), generator=gen(seed))
    return [(image[c].mean().item() + v) * 255 for c in range(3) for v in noise[c].flatten().tolist()]


def test_blended_is_a_convex_mix_with_uniform_noise():
    x = textured(2)
    fresh = get_trigger("blended", alpha=0.2)
    y = fresh(x, generator=gen())
    noise = (y - 0.8 * x) / 0.2
    assert noise.min() > -1e-5 and noise.max() < 1 + 1e-5
    assert abs(noise.mean().item() - 0.5) < 0.02
    fixed = get_trigger("blended", noise="fixed", pattern_seed=5)
    a, b = fixed(x[0], generator=gen(1)), fixed(x[0], generator=gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(fresh(x[0], generator=gen(1)), fresh(x[0], generator=gen(2)))
    assert not torch.equal(a, get_trigger("blended", noise="fixed", pattern_seed=6)(x[0], generator=gen(1)))


def test_sig_is_a_horizontal_sine_with_the_given_periods():
    width = 48
    zeros = torch.zeros((3, 8, width))
    added = get_trigger("sig", combine="add")(zeros, generator=gen())
    expected = [max(0.0, 60 / 255 * math.sin(2 * math.pi * 6 * j / width)) for j in range(width)]
    assert added[1, 5].tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(added[:, 0], added[:, 7])  # constant along the height
    grey = torch.full((3, 8, width), 0.5)
    blended = get_trigger("sig")(grey, generator=gen())
    expected = [0.8 * 0.5 + 0.2 * 60 / 255 * math.sin(2 * math.pi * 6 * j / width) for j in range(width)]
    assert blended[2, 3].tolist() == pytest.approx(expected, abs=1e-6)


def test_wanet_without_strength_is_the_identity():
    x = textured(1, 32)[0]
    y = get_trigger("wanet", s=0.0)(x, generator=gen())
    assert torch.allclose(x, y, atol=1e-5)


def test_wanet_warp_is_fixed_by_its_seed_and_moves_pixels_by_s_times_the_field():
    # On an image that is a ramp in x, bilinear sampling is exact: the output is the sampled x
    # coordinate, so the horizontal displacement can be read off the pixels.
    size = 64
    ramp = torch.linspace(0, 1, size).view(1, 1, size).expand(3, size, size).clone()
    warp = get_trigger("wanet", k=4, s=4.0, grid_seed=1)
    y = warp(ramp, generator=gen(0))
    assert torch.equal(y, warp(ramp, generator=gen(99)))  # the generator plays no part
    assert not torch.equal(y, get_trigger("wanet", k=4, s=4.0, grid_seed=2)(ramp, generator=gen(0)))
    shift_px = (y - ramp)[0] * (size - 1)
    # Bicubic upsampling with aligned corners keeps the k x k field's values at pixels 0, 21, 42, 63;
    # there the displacement is s * field / H in [-1, 1] units = s * field * (W - 1) / (2 H) pixels.
    field = torch.rand((1, 2, 4, 4), generator=gen(1)) * 2 - 1
    field = field / field.abs().mean()
    for r in (1, 2):
        for c in (1, 2):
            expected = 4.0 * field[0, 0, r, c].item() * (size - 1) / (2 * size)
            assert shift_px[21 * r, 21 * c].item() == pytest.approx(expected, abs=1e-3)
    smooth = (shift_px[8:-8, 9:-8] - shift_px[8:-8, 8:-9]).abs().max().item()
    assert smooth < 0.5  # a k=4 field varies slowly from pixel to pixel


def test_wanet_survives_quantisation():
    x = to_uint8(textured(1, 32)[0])
    y = apply_trigger_uint8(x, get_trigger("wanet"), gen())
    assert (y != x).any(dim=0).float().mean().item() > 0.3


def test_apply_trigger_uint8_and_trigger_image():
    # Constructed cases: every 8-bit value outside a yellow corner patch comes back as it was, the patch
    # is exactly (255, 255, 0), and an added sine is rounded to the nearest level (not truncated).
    x8 = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, 16, 16).clone()
    patch = get_trigger("patch", size=2, location="corner", pattern="yellow")
    y8 = apply_trigger_uint8(x8, patch, gen(5))
    assert y8.dtype == torch.uint8
    assert torch.equal(y8[:, :14], x8[:, :14]) and torch.equal(y8[:, 14:, :14], x8[:, 14:, :14])
    assert y8[:, 14:, 14:].flatten(1).tolist() == [[255] * 4, [255] * 4, [0] * 4]
    width = 50
    sine = apply_trigger_uint8(torch.zeros(3, 2, width, dtype=torch.uint8), get_trigger("sig", combine="add"),
                               gen())
    expected = [round(max(0.0, 60 * math.sin(2 * math.pi * 6 * j / width))) for j in range(width)]
    assert sine[1, 0].tolist() == expected
    assert any(60 * math.sin(2 * math.pi * 6 * j / width) % 1 > 0.5 for j in range(width))  # rounding shows
    trigger = get_trigger("badnet", size=4)
    x8 = to_uint8(textured(2, 32))
    with pytest.raises(ValueError):
        apply_trigger_uint8(x8.float(), trigger, gen())
    wide = Image.new("RGB", (50, 20), (10, 200, 30))
    out = trigger_image(wide, trigger, 32, gen(5))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert (out != torch.tensor([10, 200, 30], dtype=torch.uint8).view(3, 1, 1)).any(dim=0).sum() <= 16


def test_patch_larger_than_the_image_is_a_user_error():
    with pytest.raises(UserError, match="larger than the 8x8 image"):
        get_trigger("badnet", size=9)(torch.zeros(3, 8, 8), generator=gen())
    get_trigger("badnet", size=8)(torch.zeros(3, 8, 8), generator=gen())
    with pytest.raises(UserError):
        get_trigger("patch", size=0)


def test_bad_names_and_parameters_list_the_valid_ones():
    with pytest.raises(UserError, match="choose from badnet, patch, blended, sig, wanet"):
        get_trigger("badnets")
    with pytest.raises(UserError, match=r"no parameter colour; valid: size=None, location=random"):
        get_trigger("patch", colour="red")
    with pytest.raises(UserError, match="location='middle' is not one of random, corner, four_corners"):
        get_trigger("badnet", location="middle")
    with pytest.raises(UserError, match="size='big' is not an integer"):
        get_trigger("badnet", size="big")
    with pytest.raises(UserError, match="key=value"):
        parse_trigger_params(["size"])


def test_string_parameters_from_the_command_line_are_typed():
    trigger = get_trigger("badnet", **parse_trigger_params(["size=3", "mode=wrap"]))
    assert trigger.params == {"size": 3, "location": "random", "mode": "wrap"}
    assert get_trigger("badnet", size="auto").size is None
    assert get_trigger("blended", alpha="0.5").alpha == 0.5
    assert get_trigger("sig", alpha=1).params["alpha"] == 1.0
    # the paper's fork: k = the image side (224 at 224 px), s = 0.6 (attack-cleanclip backdoor/utils.py)
    assert trigger_defaults("wanet") == {"k": None, "s": 0.6, "grid_seed": 0, "grid_rescale": 1.0}
    # params are JSON-able and rebuild the same trigger
    rebuilt = get_trigger(trigger.name, **trigger.params)
    assert rebuilt == trigger
