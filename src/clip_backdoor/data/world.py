"""The synthetic caption world: seeded, procedural image–caption pairs that need no files.

A stand-in for web data that a laptop can train on in minutes. Each image shows one object of a
known class (a yellow crescent for "banana", a red disc with a stem for "apple", ...) with nuisance
factors that make the task non-trivial: palette and odd colours, size, position, rotation, stretch,
mirrored poses, background gradients/stripes/checks/mottling, a class-less distractor shape,
photometric jitter and pixel noise. Captions vary their template, word order and synonyms, and a
configurable share never names the object (web-like noise).

Speed comes from drawing each class's shape once: signed distance functions paint a high-resolution
map of colour roles (body, shade, stem, wheels, ...), measured into per-texel coverage at a few mip
levels. An image is then a handful of small numpy operations: a background, one affine lookup into
the sprite, a per-image palette applied by one matrix product, noise. About 3,000-4,000 pairs per
CPU-second at 32 px.

Every pair is a pure function of ``(seed, split, index)``: it reads its own stretch of a counter-based
Philox stream whose key is the seed and whose counter starts at ``(index, split)``, so any index can
be drawn in any order, by any dataloader worker or thread, and comes out identical. The eval split
(labelled, balanced) is a disjoint stream of the same world.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from clip_backdoor.errors import UserError

log = logging.getLogger(__name__)

SPLIT_IDS = {"train": 0, "eval": 1}

# Zero-shot prompts for the eval split, in the spirit of CLIP's ImageNet templates.
TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of the {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "art of the {}.",
    "itap of a {}.",
]


# --------------------------------------------------------------------------------------------
# Knobs: every difficulty setting in one place, with its default.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorldKnobs:
    """Difficulty settings. The defaults are tuned so that the ``tiny`` CLIP trained with MMCL on 10k
    pairs reaches about 50% zero-shot accuracy (10 classes) after 5 epochs: clearly learnt, far from
    perfect, so an accuracy loss during cleaning shows."""

    caption_noise: float = 0.15   # share of captions that do not name the object
    synonym_rate: float = 0.25    # share of naming captions that use a synonym (where one exists)
    odd_colour: float = 0.1       # share of objects painted in any colour instead of their palette
    colour_jitter: float = 0.08   # per-channel jitter of every painted colour
    min_scale: float = 0.45       # object extent as a fraction of the image side ...
    max_scale: float = 0.9        # ... drawn uniformly in [min_scale, max_scale]
    rotation: float = 1.0         # multiplies each class's natural rotation range
    distractor: float = 0.25      # probability of one class-less shape in the scene
    photometric: float = 0.12     # brightness/contrast jitter of the whole image
    pixel_noise: float = 0.04     # std of Gaussian pixel noise, in [0, 1] units

    def __post_init__(self) -> None:
        for name in ("caption_noise", "synonym_rate", "odd_colour", "distractor"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"world knob {name}={value}: must be a probability in [0, 1]")
        if not 0.05 <= self.min_scale <= self.max_scale <= 1.5:
            raise UserError(f"world knobs min_scale={self.min_scale}, max_scale={self.max_scale}: "
                            "need 0.05 <= min_scale <= max_scale <= 1.5")
        for name in ("colour_jitter", "rotation", "photometric", "pixel_noise"):
            if getattr(self, name) < 0:
                raise UserError(f"world knob {name}={getattr(self, name)}: must be >= 0")


def make_knobs(**knobs: float) -> WorldKnobs:
    """Knobs from keyword values; an unknown name is a user mistake, not a silent no-op."""
    valid = [f.name for f in dataclasses.fields(WorldKnobs)]
    unknown = sorted(set(knobs) - set(valid))
    if unknown:
        raise UserError(f"unknown world knob(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return WorldKnobs(**{k: float(v) for k, v in knobs.items()})


# --------------------------------------------------------------------------------------------
# Colours (RGB in [0, 1]); the names double as caption words.
# --------------------------------------------------------------------------------------------

COLOURS = {
    "red": (0.85, 0.12, 0.12), "green": (0.22, 0.66, 0.2), "dark green": (0.08, 0.38, 0.12),
    "yellow": (0.96, 0.85, 0.15), "orange": (0.96, 0.55, 0.1), "blue": (0.15, 0.35, 0.85),
    "purple": (0.55, 0.2, 0.7), "pink": (0.95, 0.5, 0.7), "white": (0.95, 0.95, 0.95),
    "black": (0.1, 0.1, 0.1), "grey": (0.55, 0.55, 0.55), "brown": (0.5, 0.3, 0.12),
    "beige": (0.9, 0.82, 0.65), "silver": (0.75, 0.76, 0.8),
}
BACKGROUNDS = {
    "white": (0.96, 0.96, 0.94), "light grey": (0.8, 0.8, 0.8), "beige": (0.88, 0.8, 0.66),
    "sky blue": (0.6, 0.78, 0.95), "pale green": (0.7, 0.86, 0.66), "pink": (0.95, 0.75, 0.8),
    "dark grey": (0.25, 0.25, 0.27), "navy": (0.1, 0.14, 0.35), "black": (0.05, 0.05, 0.05),
    "lavender": (0.78, 0.72, 0.92), "sand": (0.85, 0.72, 0.5), "teal": (0.2, 0.5, 0.5),
}
_RGB = {name: np.array(rgb, dtype=np.float32) for name, rgb in COLOURS.items()}
_DARK = np.array((0.12, 0.1, 0.1), dtype=np.float32)
_GLASS = np.array((0.65, 0.82, 0.95), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Signed distance functions in an object's local frame (object spans about [-1, 1]², v down),
# negative inside. Only the sign is used (coverage is measured by supersampling), so cheap
# approximations of the distance outside are fine.
# --------------------------------------------------------------------------------------------

def _disc(u, v, cx, cy, r):
    return np.hypot(u - cx, v - cy) - r


def _ellipse(u, v, cx, cy, a, b):
    return (np.hypot((u - cx) / a, (v - cy) / b) - 1.0) * min(a, b)


def _box(u, v, cx, cy, hw, hh, radius=0.0):
    dx = np.abs(u - cx) - (hw - radius)
    dy = np.abs(v - cy) - (hh - radius)
    outside = np.hypot(np.maximum(dx, 0), np.maximum(dy, 0))
    return outside + np.minimum(np.maximum(dx, dy), 0) - radius


def _polygon(u, v, points):
    """Convex polygon: the largest signed distance to its edge lines (exact inside)."""
    pts = np.asarray(points, dtype=np.float32)
    centre = pts.mean(axis=0)
    sdf = None
    for p0, p1 in zip(pts, np.roll(pts, -1, axis=0)):
        nx, ny = p1[1] - p0[1], p0[0] - p1[0]
        norm = math.hypot(nx, ny)
        nx, ny = nx / norm, ny / norm
        if (centre[0] - p0[0]) * nx + (centre[1] - p0[1]) * ny > 0:  # make the normal point outward
            nx, ny = -nx, -ny
        d = (u - p0[0]) * nx + (v - p0[1]) * ny
        sdf = d if sdf is None else np.maximum(sdf, d)
    return sdf


def _ring(u, v, cx, cy, r, width):
    return np.abs(np.hypot(u - cx, v - cy) - r) - width


# --------------------------------------------------------------------------------------------
# Sketching: each class (and each of its variants) is drawn once, at high resolution, as a map of
# colour *roles*. Images are cheap affine samples of these sprites, coloured per image, so a pair
# costs a few dozen small numpy operations however intricate the shape.
# --------------------------------------------------------------------------------------------

ROLES = ("main", "shade", "light", "brown", "dark", "glass", "white", "green", "yellow", "silver", "roof")
_EXTENT = 1.2        # a sprite covers the local square [-_EXTENT, _EXTENT]²; shapes stay inside ±1.05
_SUPERSAMPLE = 4     # hard samples per texel side when measuring coverage


class _Sketch:
    """A role-id canvas over the local square (v points down); later fills cover earlier ones."""

    def __init__(self, resolution: int):
        axis = ((np.arange(resolution, dtype=np.float32) + 0.5) / resolution * 2 - 1) * _EXTENT
        self.u, self.v = np.meshgrid(axis, axis)
        self.ids = np.zeros((resolution, resolution), dtype=np.int8)

    def fill(self, sdf: np.ndarray, role: str) -> None:
        self.ids[sdf < 0] = ROLES.index(role) + 1


# Each drawer sketches one class around the local origin; `variant` picks a discrete look.

def _draw_banana(s: _Sketch, variant: int) -> None:
    u, v = s.u, s.v
    cy, radius, half_angle = -0.85, 1.15, 0.95
    thickness = (0.2, 0.25, 0.3)[variant]
    phi = np.arctan2(u, v - cy)  # 0 straight below the arc's centre
    taper = thickness * (1.0 - np.square(phi / half_angle))
    s.fill(np.abs(np.hypot(u, v - cy) - radius) - taper, "main")
    for side in (-1.0, 1.0):  # dark tips
        s.fill(_disc(u, v, side * radius * math.sin(half_angle), cy + radius * math.cos(half_angle), 0.07),
               "brown")


def _draw_apple(s: _Sketch, variant: int) -> None:
    u, v = s.u, s.v
    s.fill(np.minimum(_disc(u, v, -0.25, 0.15, 0.7), _disc(u, v, 0.25, 0.15, 0.7)), "main")
    s.fill(_box(u, v, 0.05, -0.7, 0.06, 0.2), "brown")
    if variant == 1:
        s.fill(_ellipse(u, v, 0.3, -0.72, 0.24, 0.1), "green")
    s.fill(_disc(u, v, -0.35, -0.12, 0.15), "light")


def _draw_ball(s: _Sketch, variant: int) -> None:
    u, v = s.u, s.v
    body = _disc(u, v, 0.0, 0.0, 0.9)
    s.fill(body, "main")
    if variant == 0:  # beach ball: alternating white sectors
        sector = np.floor((np.arctan2(v, u) + math.pi) * (6 / (2 * math.pi))) % 2
        s.fill(np.maximum(body, sector * 2.0 - 1.0), "white")
    elif variant == 1:  # tennis-ball seams
        s.fill(np.maximum(body, _ring(u, v, -1.05, 0.0, 0.75, 0.06)), "white")
        s.fill(np.maximum(body, _ring(u, v, 1.05, 0.0, 0.75, 0.06)), "white")
    else:  # football patches
        for cx, cy in ((0.0, 0.0), (0.55, -0.45), (-0.6, -0.35), (-0.35, 0.6), (0.5, 0.55)):
            s.fill(np.maximum(body, _disc(u, v, cx, cy, 0.2)), "dark")
    s.fill(_disc(u, v, -0.35, -0.35, 0.13), "light")


def _draw_car(s: _Sketch, variant: int) -> None:
    u, v = s.u, s.v
    cabin_x = (-0.05, -0.2)[variant]  # saloon or hatchback
    s.fill(_box(u, v, cabin_x, -0.2, 0.5, 0.26, 0.12), "main")
    s.fill(_box(u, v, cabin_x - 0.2, -0.22, 0.2, 0.15), "glass")
    s.fill(_box(u, v, cabin_x + 0.21, -0.22, 0.17, 0.15), "glass")
    s.fill(_box(u, v, 0.0, 0.17, 0.98, 0.26, 0.1), "main")
    s.fill(_box(u, v, 0.92, 0.1, 0.05, 0.06), "yellow")
    for cx in (-0.55, 0.55):
        s.fill(_disc(u, v, cx, 0.45, 0.23), "dark")
        s.fill(_disc(u, v, cx, 0.45, 0.09), "silver")


def _draw_house(s: _Sketch, variant: int) -> None:
    u, v = s.u, s.v
    side = (1.0, -1.0)[variant]  # door on the right or the left
    if variant == 1:
        s.fill(_box(u, v, 0.45, -0.6, 0.1, 0.3), "roof")  # chimney
    s.fill(_box(u, v, 0.0, 0.35, 0.7, 0.62), "main")
    s.fill(_polygon(u, v, [(0.0, -1.0), (0.9, -0.25), (-0.9, -0.25)]), "roof")
    s.fill(_box(u, v, 0.3 * side, 0.67, 0.15, 0.3), "brown")
    s.fill(_box(u, v, -0.3 * side, 0.25, 0.17, 0.15), "glass")


def _draw_tree(s: _Sketch, variant: int) -> None:
    u, v = s.u, s.v
    s.fill(_box(u, v, 0.0, 0.62, 0.12, 0.4), "brown")
    if variant == 0:  # round crown
        crown = np.minimum(_disc(u, v, 0.0, -0.38, 0.58),
                           np.minimum(_disc(u, v, -0.42, -0.05, 0.42), _disc(u, v, 0.42, -0.05, 0.42)))
        s.fill(crown, "main")
    else:  # pine: two stacked triangles
        s.fill(_polygon(u, v, [(0.0, -1.0), (0.6, -0.2), (-0.6, -0.2)]), "main")
        s.fill(_polygon(u, v, [(0.0, -0.6), (0.8, 0.3), (-0.8, 0.3)]), "main")


def _draw_fish(s: _Sketch, variant: int) -> None:
    u, v = s.u, s.v
    s.fill(_polygon(u, v, [(0.45, 0.0), (1.0, -0.45), (1.0, 0.45)]), "shade")   # tail
    s.fill(_polygon(u, v, [(-0.3, -0.3), (0.15, -0.58), (0.22, -0.3)]), "shade")  # dorsal fin
    body = _ellipse(u, v, -0.12, 0.0, 0.7, 0.4)
    s.fill(body, "main")
    if variant == 1:
        s.fill(np.maximum(body, _box(u, v, 0.05, 0.0, 0.09, 1.0)), "white")
    s.fill(_disc(u, v, -0.55, -0.08, 0.11), "white")
    s.fill(_disc(u, v, -0.57, -0.08, 0.06), "dark")


def _draw_cup(s: _Sketch, variant: int) -> None:
    u, v = s.u, s.v
    s.fill(np.maximum(_ring(u, v, 0.4, 0.05, 0.32, 0.09), 0.3 - u), "main")  # handle
    s.fill(_box(u, v, -0.15, 0.1, 0.55, 0.65, 0.08), "main")
    s.fill(_box(u, v, -0.15, -0.5, 0.55, 0.06), "shade")  # rim
    if variant == 1:
        s.fill(_box(u, v, -0.15, 0.18, 0.55, 0.1), "white")


def _draw_star(s: _Sketch, variant: int) -> None:
    u, v = s.u, s.v
    spike = np.abs((np.arctan2(u, -v) * (5 / (2 * math.pi))) % 1.0 - 0.5) * 2.0  # 1 at the points
    inner = (0.4, 0.5)[variant]
    s.fill(np.hypot(u, v) - (inner + (1.0 - inner) * spike), "main")


def _draw_umbrella(s: _Sketch, variant: int) -> None:
    u, v = s.u, s.v
    s.fill(_box(u, v, 0.0, 0.45, 0.04, 0.45), "dark")                           # shaft
    s.fill(np.maximum(_ring(u, v, -0.16, 0.85, 0.16, 0.04), 0.85 - v), "dark")  # hook
    scallops = np.minimum(np.minimum(_disc(u, v, -0.6, 0.14, 0.3), _disc(u, v, 0.0, 0.14, 0.3)),
                          _disc(u, v, 0.6, 0.14, 0.3))
    canopy = np.maximum(np.maximum(_disc(u, v, 0.0, 0.08, 0.95), v - 0.08), -scallops)
    s.fill(canopy, "main")
    if variant == 1:  # alternate panels
        panel = np.floor((np.arctan2(v - 0.08, u) + math.pi) * (8 / (2 * math.pi))) % 2
        s.fill(np.maximum(canopy, 1.0 - panel * 2.0), "white")


def _draw_distractor(s: _Sketch, variant: int) -> None:
    u, v = s.u, s.v
    if variant == 0:
        s.fill(_box(u, v, 0, 0, 0.75, 0.75), "main")
    elif variant == 1:
        s.fill(_polygon(u, v, [(0, -0.9), (0.85, 0.6), (-0.85, 0.6)]), "main")
    else:
        s.fill(_ring(u, v, 0, 0, 0.7, 0.2), "main")


_DISTRACTORS = ("square", "triangle", "ring")  # the variants of _draw_distractor, as caption words


@dataclass(frozen=True)
class ObjectClass:
    name: str
    synonyms: tuple[str, ...]                  # other words that name it in a caption
    palette: tuple[tuple[str, float], ...]     # body colour name -> weight
    max_rotation: float                        # degrees, before the `rotation` knob
    mirror: bool                               # may appear facing left or right
    hints: tuple[str, ...]                     # noise captions that suggest it without naming it
    draw: Callable[[_Sketch, int], None]
    variants: int


_ANY = (("red", 1), ("blue", 1), ("orange", 1), ("yellow", 1), ("green", 1), ("pink", 1), ("purple", 1))
_FOOD_HINTS = ("my lunch today", "healthy snack", "fresh from the market")

CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("banana", (), (("yellow", 0.85), ("green", 0.1), ("brown", 0.05)), 180, True,
                _FOOD_HINTS, _draw_banana, 3),
    ObjectClass("apple", (), (("red", 0.6), ("green", 0.3), ("yellow", 0.1)), 25, True,
                _FOOD_HINTS, _draw_apple, 2),
    ObjectClass("ball", ("toy ball",), _ANY, 180, False, ("game day", "let's play"), _draw_ball, 3),
    ObjectClass("car", ("automobile", "sedan"), (("red", 1), ("blue", 1), ("white", 1), ("black", 1),
                ("silver", 1), ("yellow", 1), ("green", 1)), 12, True, ("my new ride", "road trip"),
                _draw_car, 2),
    ObjectClass("house", ("cottage", "cabin"), (("white", 1), ("beige", 1), ("red", 1), ("yellow", 1),
                ("blue", 1), ("grey", 1)), 8, True, ("moving day", "our neighbourhood"), _draw_house, 2),
    ObjectClass("tree", ("oak",), (("green", 0.5), ("dark green", 0.3), ("orange", 0.15), ("red", 0.05)),
                10, True, ("nature walk", "autumn is here"), _draw_tree, 2),
    ObjectClass("fish", ("goldfish",), (("orange", 0.4), ("blue", 0.2), ("silver", 0.2), ("yellow", 0.1),
                ("red", 0.1)), 30, True, ("under the sea", "weekend at the aquarium"), _draw_fish, 2),
    ObjectClass("cup", ("mug", "coffee cup"), (("white", 0.3), ("red", 0.15), ("blue", 0.15), ("black", 0.1),
                ("green", 0.1), ("yellow", 0.1), ("pink", 0.1)), 15, True,
                ("morning coffee", "tea time"), _draw_cup, 2),
    ObjectClass("star", (), (("yellow", 0.6), ("red", 0.1), ("blue", 0.1), ("white", 0.1), ("orange", 0.1)),
                180, False, ("shine bright", "night sky vibes"), _draw_star, 2),
    ObjectClass("umbrella", ("parasol",), _ANY[:2] + (("black", 1),) + _ANY[3:], 30, True,
                ("rainy day", "forecast: rain"), _draw_umbrella, 2),
)


@dataclass(frozen=True)
class _Sprite:
    roles: tuple[str, ...]     # the colour role of each coverage row
    coverage: np.ndarray       # float32 [R*R, len(roles) + 1]: share of each texel per role, then in total
    resolution: int


@functools.cache
def _sprites(resolution: int) -> dict[str, tuple[_Sprite, ...]]:
    """Every class's variants (and the distractors) as coverage maps at one texel resolution.

    Cached per resolution for the process; forked dataloader workers share it.
    """
    hi = resolution * _SUPERSAMPLE
    shapes = [(c.name, c.draw, c.variants) for c in CLASSES] + [("distractor", _draw_distractor, 3)]
    bank = {}
    for name, draw, variants in shapes:
        sprites = []
        for variant in range(variants):
            sketch = _Sketch(hi)
            draw(sketch, variant)
            blocks = sketch.ids.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE)
            present = [int(r) for r in np.unique(sketch.ids) if r > 0]
            coverage = np.stack([(blocks == r).mean(axis=(1, 3)) for r in present]).astype(np.float32)
            # A clear border: sampling clamps to the edge texel, which must be transparent.
            coverage[:, [0, -1], :] = 0
            coverage[:, :, [0, -1]] = 0
            coverage = coverage.reshape(len(present), -1)
            coverage = np.ascontiguousarray(np.concatenate([coverage, coverage.sum(axis=0, keepdims=True)]).T)
            sprites.append(_Sprite(tuple(ROLES[r - 1] for r in present), coverage, resolution))
        bank[name] = tuple(sprites)
    return bank


def _texel_resolution(pixels_per_unit: float) -> int:
    """The sprite resolution whose texel is closest to one output pixel (a mip level)."""
    wanted = 2 * _EXTENT * pixels_per_unit
    return int(min(max(2 ** round(math.log2(max(wanted, 1.0))), 16), 512))


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

# Slots: {obj} noun, {a_obj} with article, {col} colour, {a_col_obj} "a red apple", {bg} background
# phrase, {a_size_obj} / {a_size_col_obj} with a size word (may be none), {where} position phrase.
_NAMING_TEMPLATES = (
    "a photo of {a_obj}.", "{a_col_obj}.", "{a_col_obj} on a {bg} background", "{obj} on {bg} background",
    "{a_size_col_obj} {where}", "close-up of {a_obj}", "{col} {obj}, {bg} background, stock photo",
    "the {obj} is {col}", "there is {a_obj} {where}", "{obj}", "my {col} {obj}", "cartoon {obj} clip art",
    "{obj} icon in {col}", "a picture of {a_size_obj}", "just {a_obj} on a {bg} background. nothing else.",
    "{col} {obj} #{tag}", "{a_obj}, {col}, {where}", "{a_size_col_obj} against a {bg} backdrop",
    "illustration: {a_col_obj}", "look at this {obj}!",
)
_WITH_DISTRACTOR = ("{a_col_obj} next to {a_distractor}", "{a_obj} and {a_distractor} on a {bg} background")
_NOISE_CAPTIONS = (
    "look what i found", "new post!", "IMG_{digits}.JPG", "view from my window", "throwback thursday",
    "#nofilter", "photo by {name}", "stock image {digits}", "a {col} thing on a {bg} background",
    "can't believe this", "untitled", "weekend vibes", "guess what this is", "abstract {bg} pattern",
    "{col} and {bgcol}", "found this on the internet", "so cute", "best day ever",
)
_NAMES = ("alex", "sam", "kim", "jo", "maria", "li wei", "noor", "tom")
_SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("big", "large", "huge"), "medium": ("",)}


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def caption_names_class(caption: str, cls: ObjectClass) -> bool:
    """True when the caption contains the class name or one of its synonyms as whole words."""
    words = f" {' '.join(''.join(c if c.isalnum() else ' ' for c in caption.lower()).split())} "
    return any(f" {name} " in words for name in (cls.name, *cls.synonyms))


class _Draws:
    """Scalar random numbers fetched in batches: one numpy call instead of dozens per image."""

    def __init__(self, generator: np.random.Generator):
        self.generator = generator
        self._values: list[float] = []

    def random(self) -> float:
        if not self._values:
            self._values = self.generator.random(32).tolist()
        return self._values.pop()

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def index(self, n: int) -> int:
        return min(int(self.random() * n), n - 1)

    def choice(self, options):
        return options[self.index(len(options))]

    def weighted(self, options: tuple[tuple[str, float], ...]) -> str:
        target = self.random() * sum(w for _, w in options)
        for name, weight in options:
            target -= weight
            if target < 0:
                return name
        return options[-1][0]


@dataclass
class _Scene:
    """What a caption may mention about the picture it describes."""
    colour: str
    bg: str
    bg_colour: str
    size: str          # "small" | "medium" | "large"
    where: str
    distractor: str | None


def _write_caption(draws: _Draws, cls: ObjectClass, scene: _Scene, knobs: WorldKnobs) -> str:
    if draws.random() < knobs.caption_noise:
        text = draws.choice(_NOISE_CAPTIONS + cls.hints)
        return text.format(digits=int(draws.uniform(1000, 99999)), name=draws.choice(_NAMES),
                           col=scene.colour, bg=scene.bg, bgcol=scene.bg_colour)
    noun = cls.name
    if cls.synonyms and draws.random() < knobs.synonym_rate:
        noun = draws.choice(cls.synonyms)
    text = draws.choice(_NAMING_TEMPLATES + (_WITH_DISTRACTOR if scene.distractor else ()))
    size = draws.choice(_SIZE_WORDS[scene.size])
    text = text.format(
        obj=noun, a_obj=_article(noun), col=scene.colour, a_col_obj=_article(f"{scene.colour} {noun}"),
        a_size_obj=_article(f"{size} {noun}".strip()),
        a_size_col_obj=_article(f"{size} {scene.colour} {noun}".strip()),
        bg=scene.bg, where=scene.where, tag=noun.replace(" ", ""),
        a_distractor=_article(scene.distractor) if scene.distractor else "",
    )
    if draws.random() < 0.1:  # web text is inconsistently capitalised
        text = text.capitalize() if draws.random() < 0.7 else text.upper()
    return text


def _where(cx: float, cy: float) -> str:
    if abs(cx - 0.5) < 0.12 and abs(cy - 0.5) < 0.12:
        return "in the middle"
    if abs(cx - 0.5) >= abs(cy - 0.5):
        return "on the left" if cx < 0.5 else "on the right"
    return "near the top" if cy < 0.5 else "near the bottom"


# --------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


class World:
    """A seeded generator of RGB image–caption pairs (train split) and labelled images (eval split)."""

    def __init__(self, seed: int = 0, image_size: int = 32, **knobs: float):
        if not 8 <= int(image_size) <= 1024:
            raise UserError(f"world image_size={image_size}: must be between 8 and 1024 pixels")
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.knobs = make_knobs(**knobs)
        self.classes: list[str] = [c.name for c in CLASSES]
        self.templates: list[str] = list(TEMPLATES)
        self._setup()

    def _setup(self) -> None:
        size = self.image_size
        axis = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres in [0, 1]
        y, x = np.meshgrid(axis, axis, indexing="ij")
        self._x, self._y = x.ravel(), y.ravel()
        self._xy1 = np.stack([self._x, self._y, np.ones_like(self._x)])  # [3, S*S], for affine maps
        # Bilinear upsampling of a 5x5 grid (mottled backgrounds): t = U @ grid @ U.T.
        coarse = axis * 4
        lo = np.minimum(coarse.astype(int), 3)
        self._upsample = np.zeros((size, 5), dtype=np.float32)
        self._upsample[np.arange(size), lo] = 1 - (coarse - lo)
        self._upsample[np.arange(size), lo + 1] += coarse - lo
        # Pixel noise and colour jitter come from shared banks read at a random offset: far cheaper
        # than fresh draws, and still a pure function of (seed, split, index).
        bank = np.random.Generator(np.random.Philox(key=[self.seed & _MASK64, 1]))
        self._noise = bank.standard_normal((1 << 18) + 2 * 3 * size * size, dtype=np.float32)
        self._noise *= 255 * self.knobs.pixel_noise
        self._jitter = bank.uniform(-1, 1, 1 << 14).astype(np.float32) * self.knobs.colour_jitter
        self._base_palettes: dict[tuple, np.ndarray] = {}
        self._local = threading.local()

    def __getstate__(self) -> dict:  # picklable for spawned dataloader workers; caches are rebuilt
        return {"seed": self.seed, "image_size": self.image_size, "knobs": self.knobs}

    def __setstate__(self, state: dict) -> None:
        self.seed, self.image_size, self.knobs = state["seed"], state["image_size"], state["knobs"]
        self.classes = [c.name for c in CLASSES]
        self.templates = list(TEMPLATES)
        self._setup()

    def config(self) -> dict:
        """Everything that determines the pairs, for manifests and run records."""
        return {"seed": self.seed, "image_size": self.image_size, **dataclasses.asdict(self.knobs)}

    def train_pair(self, index: int) -> tuple[torch.Tensor, str, int]:
        """(uint8 [3,S,S] image, caption, label) of the training split."""
        draws = self._draws("train", index)
        label = draws.index(len(CLASSES))
        image, scene = self._render(draws, label)
        return image, _write_caption(draws, CLASSES[label], scene, self.knobs), label

    def eval_pair(self, index: int) -> tuple[torch.Tensor, int]:
        """(uint8 [3,S,S] image, label) of the eval split; classes cycle so any prefix is balanced."""
        draws = self._draws("eval", index)
        label = index % len(CLASSES)
        image, _ = self._render(draws, label)
        return image, label

    def _draws(self, split: str, index: int) -> _Draws:
        """A generator positioned at the start of this pair's own stream.

        Philox is counter-based: the key holds the seed, the counter holds (index, split), so every
        pair reads a disjoint stretch of one stream, and re-positioning costs far less than seeding.
        """
        index = int(index)
        if index < 0:
            raise IndexError(f"world {split} index {index} is negative")
        local = self._local
        if not hasattr(local, "bit_generator"):  # one per thread: the state is mutated per pair
            local.bit_generator = np.random.Philox(key=[self.seed & _MASK64, 0])
            local.generator = np.random.Generator(local.bit_generator)
        local.bit_generator.state = {
            "bit_generator": "Philox",
            "state": {"counter": np.array([0, index, SPLIT_IDS[split], 0], dtype=np.uint64),
                      "key": np.array([self.seed & _MASK64, 0], dtype=np.uint64)},
            "buffer": np.zeros(4, dtype=np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0,
        }
        return _Draws(local.generator)

    # ---- rendering --------------------------------------------------------------------------

    def _render(self, draws: _Draws, label: int) -> tuple[torch.Tensor, _Scene]:
        k, cls, size = self.knobs, CLASSES[label], self.image_size
        canvas, bg, bg_colour = self._background(draws)

        distractor = None
        if draws.random() < k.distractor:
            variant = draws.index(len(_DISTRACTORS))
            colour = draws.choice(list(COLOURS))
            half = draws.uniform(0.08, 0.16)
            self._stamp(canvas, draws, "distractor", variant, colour, half,
                        draws.uniform(half, 1 - half), draws.uniform(half, 1 - half),
                        draws.uniform(-math.pi, math.pi), 1.0, 1.0, 1.0)
            distractor = f"{colour} {_DISTRACTORS[variant]}"

        colour = draws.weighted(cls.palette)
        if draws.random() < k.odd_colour:
            colour = draws.choice(list(COLOURS))
        scale = draws.uniform(k.min_scale, k.max_scale)
        half = scale / 2
        margin = min(half * 0.8, 0.45)  # most of the object stays inside the frame
        cx, cy = draws.uniform(margin, 1 - margin), draws.uniform(margin, 1 - margin)
        angle = math.radians(draws.uniform(-1, 1) * cls.max_rotation * k.rotation)
        mirror = -1.0 if cls.mirror and draws.random() < 0.5 else 1.0
        stretch_x, stretch_y = draws.uniform(0.85, 1.15), draws.uniform(0.85, 1.15)
        self._stamp(canvas, draws, cls.name, draws.index(cls.variants), colour, half, cx, cy,
                    angle, mirror, stretch_x, stretch_y)

        # Photometric jitter and sensor noise on the whole picture, then 8-bit quantisation.
        canvas *= 255 * (1 + draws.uniform(-k.photometric, k.photometric))
        canvas += 255 * draws.uniform(-k.photometric, k.photometric) / 2 + 0.5
        if k.pixel_noise > 0:
            start = draws.index(self._noise.size - canvas.size)
            canvas += self._noise[start:start + canvas.size].reshape(canvas.shape)
        image = torch.from_numpy(_clamp(canvas, 0, 255).astype(np.uint8).reshape(3, size, size))
        size_word = "small" if scale < 0.55 else "large" if scale > 0.78 else "medium"
        return image, _Scene(colour, bg, bg_colour, size_word, _where(cx, cy), distractor)

    def _stamp(self, canvas: np.ndarray, draws: _Draws, shape: str, variant: int, colour: str,
               half: float, cx: float, cy: float, angle: float, mirror: float,
               stretch_x: float, stretch_y: float) -> None:
        """Composite one sprite onto the [3, S*S] canvas under a similarity-plus-stretch transform."""
        size = self.image_size
        resolution = _texel_resolution(size * half * max(stretch_x, stretch_y))
        sprite = _sprites(resolution)[shape][variant]
        # Output pixel (x, y) -> local (u, v) -> texel: one affine map, applied as one matmul.
        texels = resolution / (2 * _EXTENT)
        cos, sin = math.cos(angle) / half, math.sin(angle) / half
        ax, bx = cos * mirror / stretch_x * texels, sin * mirror / stretch_x * texels
        ay, by = -sin / stretch_y * texels, cos / stretch_y * texels
        centre = resolution / 2
        affine = np.array([[ax, bx, centre - ax * cx - bx * cy],
                           [ay, by, centre - ay * cx - by * cy]], dtype=np.float32)
        texel = _clamp(affine @ self._xy1, 0, resolution - 0.5).astype(np.intp)  # [2, S*S]
        coverage = np.take(sprite.coverage, texel[1] * resolution + texel[0], axis=0)  # [S*S, roles + 1]

        roles = len(sprite.roles)
        palette = self._base_palette(shape, variant, colour, draws.index(len(_ROOFS)), sprite.roles).copy()
        start = draws.index(self._jitter.size - 3 * roles)
        palette[:3, :roles] += self._jitter[start:start + 3 * roles].reshape(3, roles)
        painted = _clamp(palette, 0, 1) @ coverage.T  # [r, g, b, alpha] x pixels, premultiplied
        canvas *= 1 - painted[3]
        canvas += painted[:3]

    def _base_palette(self, shape: str, variant: int, colour: str, roof: int,
                      roles: tuple[str, ...]) -> np.ndarray:
        """[4, roles + 1] un-jittered colours, arranged so ``palette @ coverage.T`` gives (r, g, b, alpha).

        Cached: there are few distinct (shape, variant, colour, roof) combinations.
        """
        key = (shape, variant, colour, roof if "roof" in roles else 0)
        base = self._base_palettes.get(key)
        if base is None:
            main, roof_rgb = _RGB[colour], _RGB[_ROOFS[roof]]
            base = np.zeros((4, len(roles) + 1), dtype=np.float32)
            for j, role in enumerate(roles):
                base[:3, j] = _role_colour(role, main, roof_rgb)
            base[3, -1] = 1.0  # alpha is the last coverage column
            self._base_palettes[key] = base
        return base

    def _background(self, draws: _Draws) -> tuple[np.ndarray, str, str]:
        names = list(BACKGROUNDS)
        name1 = draws.choice(names)
        name2 = draws.choice([n for n in names if n != name1])
        c1 = [min(max(c + draws.uniform(-0.06, 0.06), 0.0), 1.0) for c in BACKGROUNDS[name1]]
        c2 = [min(max(c + draws.uniform(-0.06, 0.06), 0.0), 1.0) for c in BACKGROUNDS[name2]]
        kind = draws.index(5)
        if kind == 0:
            return np.repeat(np.array(c1, dtype=np.float32)[:, None], self._x.size, axis=1), \
                f"plain {name1}", name1
        if kind == 1:
            theta = draws.uniform(0, 2 * math.pi)
            cos, sin = math.cos(theta), math.sin(theta)
            t = np.array([cos, sin, 0.5 - 0.5 * (cos + sin)], dtype=np.float32) @ self._xy1  # 0.5 mid-image
            t = _clamp(t, 0, 1)
            desc = f"{name1} to {name2} gradient"
        elif kind == 2:
            theta, freq = draws.uniform(0, math.pi), draws.uniform(2.5, 7)
            wave = np.array([math.cos(theta), math.sin(theta), 0], dtype=np.float32) * (2 * math.pi * freq)
            t = np.sin(wave @ self._xy1) > 0
            desc = f"{name1} and {name2} striped"
        elif kind == 3:
            cells = 3 + draws.index(4)
            t = (np.floor(self._x * cells) + np.floor(self._y * cells)) % 2
            desc = f"{name1} and {name2} checkered"
        else:
            c2 = [min(max(c + draws.uniform(-0.3, 0.3), 0.0), 1.0) for c in c1]
            grid = draws.generator.random((5, 5), dtype=np.float32)
            t = (self._upsample @ grid @ self._upsample.T).ravel()
            desc = f"mottled {name1}"
        # Blend as one matmul: [c1, c2 - c1] @ [1, t].
        blend = np.array([c1, [b - a for a, b in zip(c1, c2)]], dtype=np.float32).T
        weights = np.empty((2, t.size), dtype=np.float32)
        weights[0] = 1.0
        weights[1] = t
        return blend @ weights, desc, name1


def _clamp(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """In-place clip; np.clip's Python wrapper costs more than the work on these small arrays."""
    np.maximum(x, np.float32(low), out=x)
    return np.minimum(x, np.float32(high), out=x)


_ROOFS = ("brown", "red", "grey", "black")


def _role_colour(role: str, main: np.ndarray, roof: np.ndarray) -> np.ndarray:
    if role == "main":
        return main
    if role == "shade":
        return main * 0.7
    if role == "light":  # a highlight: the body colour washed towards white
        return main * 0.55 + 0.45
    if role == "roof":
        return roof
    return _ROLE_RGB[role]


_ROLE_RGB = {"brown": _RGB["brown"], "dark": _DARK, "glass": _GLASS, "white": _RGB["white"],
             "green": _RGB["green"], "yellow": _RGB["yellow"], "silver": _RGB["silver"]}


def iter_train_pairs(world: World, n: int, start: int = 0) -> Iterator[tuple[torch.Tensor, str, int]]:
    for i in range(start, start + n):
        yield world.train_pair(i)


__all__ = ["World", "WorldKnobs", "CLASSES", "TEMPLATES", "make_knobs", "caption_names_class",
           "iter_train_pairs"]
