"""PAR's structured triggers and the optimised-patch (badclip) trigger, with known pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

from clip_backdoor.attacks.triggers import (
    TEXT_BOX,
    get_trigger,
    load_patch,
    save_patch,
    text_pattern,
    trigger_image,
)
from clip_backdoor.errors import UserError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def flat(value=0.5, size=32):
    return torch.full((3, size, size), value)


# --------------------------------------------------------------------------------------------
# BadNet-Stripes
# --------------------------------------------------------------------------------------------
def test_badnet_stripes_corner_patch_is_vertical_01_stripes():
    x = flat(0.5)
    y = get_trigger("badnet-stripes", size=8, location="corner")(x, gen(3))
    patch = y[:, 24:, 24:]
    assert torch.equal(torch.isin(patch, torch.tensor([0.0, 1.0])), torch.ones_like(patch, dtype=torch.bool))
    assert torch.equal(patch, patch[:, :1, :].expand_as(patch))     # constant down each column
    assert len({tuple(patch[:, 0, c].tolist()) for c in range(8)}) > 1  # columns differ
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[24:, 24:] = False
    assert (y[:, outside] == 0.5).all()
    # the bits are the generator's first draw: randint(0, 2, (3, 1, 8)) per image
    bits = torch.randint(0, 2, (3, 1, 8), generator=gen(3)).float()
    assert torch.equal(patch, bits.expand(3, 8, 8))


def test_badnet_stripes_width_and_fixed_pattern():
    y = get_trigger("badnet-stripes", size=8, location="corner", width=2)(flat(), gen(0))[:, 24:, 24:]
    assert torch.equal(y[:, :, 0::2], y[:, :, 1::2])                # stripes 2 px wide
    t = get_trigger("badnet-stripes", size=8, stripes="fixed", pattern_seed=4, location="corner")
    a, b = t(flat(), gen(0)), t(flat(0.2), gen(9))
    assert torch.equal(a[:, 24:, 24:], b[:, 24:, 24:])               # same pattern whatever the image/seed


# --------------------------------------------------------------------------------------------
# Blended-Stripes, Blended-Triangles
# --------------------------------------------------------------------------------------------
def test_blended_stripes_is_097_x_plus_003_signs():
    x = flat(0.5)
    y = get_trigger("blended-stripes")(x, gen(2))
    signs = 2 * torch.randint(0, 2, (3, 1, 32), generator=gen(2)).float() - 1
    torch.testing.assert_close(y, 0.97 * x + 0.03 * signs.expand(3, 32, 32))
    assert sorted(round(v, 6) for v in torch.unique(y).tolist()) == [0.455, 0.515]
    # values stay clipped to [0, 1]
    assert get_trigger("blended-stripes", alpha=0.5)(flat(0.0), gen(2)).min() == 0


def test_triangle_pattern_known_pixels_and_reference_cell():
    t = get_trigger("blended-triangles")
    assert t.cell_size(224, 224) == 14 and t.cell_size(32, 32) == 2
    y = t(flat(0.0, 224), gen())
    # 0.15 · T with T = 0.4 on/below the diagonal of each 14 px cell, 0.8 above
    assert y[0, 0, 0] == pytest.approx(0.06) and y[0, 0, 1] == pytest.approx(0.12)
    assert y[0, 13, 0] == pytest.approx(0.06) and y[0, 0, 13] == pytest.approx(0.12)
    assert y[0, 14, 14] == pytest.approx(0.06) and y[0, 14, 15] == pytest.approx(0.12)
    assert torch.equal(y[0], y[1]) and torch.equal(y[0], y[2])       # grey
    x = torch.rand((3, 224, 224), generator=gen(1))
    assert torch.equal(t(x, gen(0)), t(x, gen(1)))                    # no randomness


def test_triangles_match_the_reference_tiling_loop():
    """The reference's create_triangle_pattern(224, 14), written out as its loops."""
    ref = torch.zeros(224, 224)
    for i in range(16):
        for j in range(16):
            for r in range(14):
                for c in range(14):
                    ref[i * 14 + r, j * 14 + c] = 0.4 if r >= c else 0.8
    y = get_trigger("blended-triangles", alpha=1.0)(flat(0.0, 224), gen())
    assert torch.equal(y[0], ref)


# --------------------------------------------------------------------------------------------
# Blended-Text
# --------------------------------------------------------------------------------------------
def test_text_pattern_is_red_inside_its_box():
    p = text_pattern("Watermarked", "red", 224, 224)
    assert (p[1:] == 0).all()                                         # red only
    ink = (p[0] > 0).nonzero()
    top, left = ink.min(0).values.tolist()
    bottom, right = ink.max(0).values.tolist()
    assert (top, left) == (round(TEXT_BOX["top"] * 224), round(TEXT_BOX["left"] * 224)) == (103, 13)
    assert (bottom, right) == (125, 208)                              # the reference's box
    assert 0.2 < (p[0, 103:126, 13:209] > 0).float().mean() < 0.8     # text, not a filled box


def test_blended_text_blends_only_where_the_text_has_ink():
    x = torch.rand((3, 32, 32), generator=gen(5))
    y = get_trigger("blended-text")(x, gen())
    p = text_pattern("Watermarked", "red", 32, 32)
    ink = p[0] > 0
    torch.testing.assert_close(y[0][ink], 0.5 * p[0][ink] + 0.5 * x[0][ink])
    assert torch.equal(y[0][~ink], x[0][~ink]) and torch.equal(y[1:], x[1:])
    white = get_trigger("blended-text", colour="white", alpha=1.0)(x, gen())
    assert (white[:, ink] > 0).all()


def test_bad_structured_parameters():
    with pytest.raises(UserError, match="colour='blue' is not one of red"):
        get_trigger("blended-text", colour="blue")
    with pytest.raises(UserError, match="alpha=2.0 must lie in"):
        get_trigger("blended-stripes", alpha=2)
    with pytest.raises(UserError, match="unknown trigger 'stripes'"):
        get_trigger("stripes")


# --------------------------------------------------------------------------------------------
# badclip: an optimised patch from a file
# --------------------------------------------------------------------------------------------
def checker(size=6):
    p = torch.zeros(3, size, size)
    p[0] = 1.0
    p[1, ::2] = 0.2
    return p


def test_badclip_png_round_trip_is_pasted_at_the_centre(tmp_path):
    path = save_patch(checker(), tmp_path / "p.png", image_size=32)
    patch, optimised_at = load_patch(path)
    assert optimised_at == 32 and patch.shape == (3, 6, 6)
    torch.testing.assert_close(patch, torch.round(checker() * 255) / 255)
    y = get_trigger("badclip", patch=str(path))(flat(0.5), gen())
    top = int(32 // 2 - 6 / 2)
    assert top == 13
    assert torch.equal(y[:, 13:19, 13:19], patch)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[13:19, 13:19] = False
    assert (y[:, outside] == 0.5).all()
    corner = get_trigger("badclip", patch=str(path), location="corner")(flat(0.5), gen())
    assert torch.equal(corner[:, 26:, 26:], patch)


def test_badclip_pt_file_and_relative_path_becomes_absolute(tmp_path, monkeypatch):
    torch.save({"patch": checker(4), "image_size": 32}, tmp_path / "p.pt")
    monkeypatch.chdir(tmp_path)
    t = get_trigger("badclip", patch="p.pt")
    assert t.patch == str(tmp_path / "p.pt")
    out = trigger_image(torch.full((3, 32, 32), 128, dtype=torch.uint8), t, 32, gen())
    assert out[0, 14, 14] == 255 and out[2, 14, 14] == 0


@pytest.mark.parametrize("content, message", [
    (torch.rand(3, 4, 5), "expected a square RGB patch"),
    (torch.rand(1, 4, 4), "expected a square RGB patch"),
    (torch.full((3, 4, 4), 1.5), r"values must lie in \[0, 1\]"),
    ({"nothing": 1}, "expected a tensor"),
])
def test_badclip_bad_patch_files(tmp_path, content, message):
    torch.save(content, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=message):
        get_trigger("badclip", patch=str(tmp_path / "bad.pt"))


def test_badclip_refuses_other_resolutions_and_a_missing_patch(tmp_path):
    path = save_patch(checker(4), tmp_path / "p.png", image_size=64)
    t = get_trigger("badclip", patch=str(path))
    with pytest.raises(UserError, match="optimised for 64 px images, these are 32x32"):
        t.check_image_size(32, 32)
    t.check_image_size(64, 64)
    with pytest.raises(UserError, match="needs patch=PATH"):
        get_trigger("badclip")(flat(), gen())
    with pytest.raises(UserError, match="not found"):
        get_trigger("badclip", patch=str(tmp_path / "missing.png"))
    with pytest.raises(UserError, match="size=5 differs from the 4 px patch"):
        get_trigger("badclip", patch=str(path), size=5)
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "grey.png")  # grey is made RGB
    assert load_patch(tmp_path / "grey.png")[0].shape == (3, 4, 4)
