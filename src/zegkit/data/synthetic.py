"""The synthetic proving ground: procedural scenes with exact pixel masks and natural captions.

Every scene is a deterministic function of its seed (a `numpy.random.Generator` is threaded
through; there is no global random state). A scene has a background of "stuff" regions (textures:
photographic ones that scikit-image ships offline, and procedural ones) and a few "things" (shapes
of random size and rotation, partly occluding each other, each made of its class's "material": a
palette shared by at most two classes and a class-specific surface pattern; version 1 painted them
flat in a random colour). A class is a *category name* a CLIP can learn from captions ("star",
"brick"); colour and size are attributes that appear in captions only.

On-disk layout written by `write_dataset(root, num, seed, size)` (ids are `f"{i:06d}"`)::

    root/images/<id>.png     RGB, uint8, size x size
    root/masks/<id>.png      mode "L", uint8: pixel value = 0-based line number in classes.txt;
                             IGNORE_INDEX (255) is reserved for "ignore" (the generator labels
                             every pixel, so it does not occur today). There is no background
                             class: every pixel is a stuff or a thing class.
    root/classes.txt         one class name per line (line i = class id i)
    root/split.json          {"seen": [...], "unseen": [...]}  class names, zero-shot split
    root/captions.jsonl      one JSON object per line: {"id", "captions", "classes"}
    root/meta.json           {"generator", "version", "seed", "num", "size"}

Scene `i` of a dataset written with seed `s` is `generate_scene(np.random.default_rng([s, i]),
size)`, so any single scene can be regenerated without the others.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from zegkit.io import atomic_write, save_json_atomic, save_png_atomic

# Bump when the same seed would give different scenes; every older version stays reproducible
# through the `version` argument of `generate_scene` / `write_dataset`.
#   1: things are flat colour (their class shows only in the outline); captions name colours.
#   2: things are made of a class "material" (a palette shared by at most two classes and a
#      class-specific surface pattern drawn in the thing's frame), as real objects have a local
#      look; about half the captions name the shapes only, colour words on things are rare.
GENERATOR_VERSION = 2
VERSIONS = (1, 2)

# --- the vocabulary ---------------------------------------------------------------------------
STUFF = ("sky", "water", "sand", "grass", "brick", "gravel", "snow", "wood", "rock")
THINGS = (
    "star", "ring", "disk", "square", "triangle", "cross", "heart", "crescent", "arrow",
    "hexagon", "flower",
)
CLASSES = STUFF + THINGS
# Zero-shot split, 15 seen / 5 unseen (the ratio of Pascal VOC's 15/5 split): two stuff and three
# thing classes, each with a visually related seen class (water~sky, gravel~sand/rock,
# heart/crescent~disk, arrow~triangle) so that the unseen ones are neither trivial nor impossible.
UNSEEN = ("water", "gravel", "heart", "crescent", "arrow")
SEEN = tuple(name for name in CLASSES if name not in UNSEEN)
CLASS_ID = {name: index for index, name in enumerate(CLASSES)}

# Thing colours: the attribute words of captions. RGB in 0..255.
COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 92, 214),
    "yellow": (250, 215, 40),
    "orange": (255, 127, 14),
    "purple": (128, 50, 170),
    "pink": (247, 120, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "cyan": (30, 200, 220),
}

# Generator v2: each thing class's material, ((colour, pattern colour), pattern). Every palette
# is shared by at most two classes, so that colour alone never names a class, and the pattern
# (drawn in the thing's own frame, so it turns and scales with the thing) tells the two apart.
# Why: with flat colour a thing's class shows only in its outline, and at this scale neither a
# tiny ViT nor a small CNN learns silhouettes (measured: presence AUC of the shapes ~0.5 even
# trained on class labels directly); a thing touches ~11 patches but fills ~1. The first colour
# is the thing's `colour` (its caption word).
MATERIALS = {
    "star": (("yellow", "red"), "sectors"),
    "arrow": (("yellow", "red"), "chevrons"),
    "ring": (("white", "blue"), "spokes"),
    "hexagon": (("white", "blue"), "dots"),
    "disk": (("green", "pink"), "target"),
    "heart": (("green", "pink"), "stripes"),
    "square": (("purple", "orange"), "checker"),
    "crescent": (("purple", "orange"), "diagonal"),
    "triangle": (("black", "cyan"), "grid"),
    "cross": (("black", "cyan"), "waves"),
    "flower": (("orange", "blue"), "spiral"),
}
PATTERN_PERIOD = 0.42  # pattern period in units of the thing's radius (~13 px at radius 30)
PATTERN_SCALE_JITTER = (0.85, 1.2)  # per-thing random factor on the period

# Thing radius as a fraction of the short side, before `zoom`; "small"/"large" in captions below
# and above these fractions.
RADIUS_RANGE = (0.07, 0.22)
SMALL_RADIUS, LARGE_RADIUS = 0.1, 0.18
THING_COUNT_WEIGHTS = (0.08, 0.3, 0.3, 0.2, 0.12)  # P(0..4 things in a scene)
MIN_VISIBLE = 0.55  # every thing keeps at least this fraction of its area visible (in frame)
MIN_STUFF_FRACTION = 0.08  # every stuff region covers at least this fraction of the scene
MAX_PLACEMENT_TRIES = 30
MAX_ROTATION = {"heart": 0.5, "arrow": np.pi, "flower": np.pi}  # radians; others: full turn


# --- small helpers ------------------------------------------------------------------------------
def _rng(rng_or_seed: int | Sequence[int] | np.random.Generator) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, (bool, str, bytes)) or not isinstance(
        rng_or_seed, (int, np.integer, Sequence)
    ):
        raise ValueError(
            f"Expected an int seed, a sequence of ints or a numpy Generator, got "
            f"{type(rng_or_seed).__name__}. Pass e.g. generate_scene(0) or "
            "generate_scene(np.random.default_rng([seed, index]))."
        )
    return np.random.default_rng(rng_or_seed)


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if h < 32 or w < 32:
        raise ValueError(f"Scene size must be at least 32x32 pixels, got {h}x{w}.")
    return int(h), int(w)


def _resize(array: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bicubic resize of a float32 2-D array to (h, w)."""
    return np.asarray(
        Image.fromarray(array.astype(np.float32), mode="F").resize((w, h), Image.BICUBIC)
    )


def _noise(rng: np.random.Generator, h: int, w: int, cells: float, octaves: int = 3) -> np.ndarray:
    """Smooth fractal value noise in [0, 1], (h, w) float32; `cells` = features across the width."""
    total = np.zeros((h, w), np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        n = max(2, int(round(cells * 2**octave)))
        grid = rng.random((max(2, int(round(n * h / w))), n), dtype=np.float32)
        total += amplitude * _resize(grid, h, w)
        norm += amplitude
        amplitude *= 0.5
    total /= norm
    lo, hi = total.min(), total.max()
    return (total - lo) / max(hi - lo, 1e-6)


def _lerp(a: Sequence[float], b: Sequence[float], t: np.ndarray) -> np.ndarray:
    """(h, w) weights -> (h, w, 3) colours between RGB triples `a` and `b` (0..1 floats)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a + (b - a) * t.astype(np.float32, copy=False)[..., None]


def _jitter(rng: np.random.Generator, colour: Sequence[float], amount: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3), 0, 1)


# --- stuff textures -----------------------------------------------------------------------------
@functools.cache
def _photo(name: str) -> np.ndarray:
    """A grayscale texture that scikit-image ships inside its wheel (no download), in [0, 1]."""
    from skimage import data

    photo = getattr(data, name)().astype(np.float32)
    lo, hi = np.percentile(photo, (1, 99))
    return np.clip((photo - lo) / (hi - lo), 0, 1)


def _photo_crop(rng: np.random.Generator, name: str, h: int, w: int, zoom: float) -> np.ndarray:
    """A random crop of a shipped photo, random flip/rotation, resized to (h, w), in [0, 1]."""
    photo = _photo(name)
    side = int(np.clip(max(h, w) * rng.uniform(0.9, 1.8) / zoom, 48, min(photo.shape)))
    y = rng.integers(0, photo.shape[0] - side + 1)
    x = rng.integers(0, photo.shape[1] - side + 1)
    crop = np.rot90(photo[y : y + side, x : x + side], k=int(rng.integers(4)))
    return np.clip(_resize(np.ascontiguousarray(crop), h, w), 0, 1)


def _sky(rng, h, w, zoom):
    top, horizon = _jitter(rng, (0.16, 0.36, 0.78)), _jitter(rng, (0.62, 0.78, 0.95))
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None].repeat(w, 1)
    image = _lerp(top, horizon, ramp ** rng.uniform(0.6, 1.4))
    clouds = _noise(rng, h, w, cells=rng.uniform(2, 4) / zoom, octaves=4)
    cover = rng.uniform(0.35, 0.7)
    alpha = np.clip((clouds - cover) / 0.25, 0, 1) * rng.uniform(0.6, 0.95)
    white = _jitter(rng, (0.97, 0.97, 0.98), 0.02)
    return image * (1 - alpha[..., None]) + white * alpha[..., None]


def _water(rng, h, w, zoom):
    deep, light = _jitter(rng, (0.03, 0.20, 0.38)), _jitter(rng, (0.18, 0.45, 0.62))
    y = np.arange(h, dtype=np.float32)[:, None] / h
    x = np.arange(w, dtype=np.float32)[None, :] / w
    warp = _noise(rng, h, w, cells=3 / zoom, octaves=2)
    frequency = rng.uniform(14, 24) / zoom
    waves = 0.5 + 0.5 * np.sin(2 * np.pi * (frequency * y + 0.15 * x + 1.5 * warp))
    image = _lerp(deep, light, 0.6 * waves + 0.4 * _noise(rng, h, w, cells=6 / zoom, octaves=2))
    glints = (waves > 0.97) & (rng.random((h, w)) < 0.25)
    image[glints] = 0.5 * image[glints] + 0.5
    return image


def _sand(rng, h, w, zoom):
    dark, light = _jitter(rng, (0.70, 0.58, 0.38)), _jitter(rng, (0.93, 0.84, 0.62))
    y = np.arange(h, dtype=np.float32)[:, None] / h
    ripples = 0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(5, 9) / zoom * y + 1.2 * _noise(
        rng, h, w, cells=2 / zoom, octaves=2)))
    grain = rng.random((h, w), dtype=np.float32)
    return _lerp(dark, light, 0.45 * ripples + 0.25 * grain + 0.3 * _noise(rng, h, w, 4 / zoom))


def _snow(rng, h, w, zoom):
    shade, light = _jitter(rng, (0.78, 0.84, 0.93), 0.03), _jitter(rng, (0.98, 0.98, 1.0), 0.01)
    image = _lerp(shade, light, _noise(rng, h, w, cells=2.5 / zoom, octaves=4))
    sparkle = rng.random((h, w)) < 0.01
    image[sparkle] = 1.0
    return image


def _wood(rng, h, w, zoom):
    dark, light = _jitter(rng, (0.36, 0.20, 0.09)), _jitter(rng, (0.72, 0.49, 0.27))
    y = np.arange(h, dtype=np.float32)[:, None] / h
    warp = _noise(rng, h, w, cells=2 / zoom, octaves=3)
    grain = 0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(25, 45) / zoom * (y + 0.08 * warp)))
    image = _lerp(dark, light, 0.55 * grain + 0.45 * warp)
    plank = max(8, int(h * rng.uniform(0.15, 0.3) * zoom))
    seams = (np.arange(h) + int(rng.integers(plank))) % plank < max(1, plank // 16)
    image[seams] *= 0.45
    return image


def _brick(rng, h, w, zoom):
    return _lerp(_jitter(rng, (0.35, 0.10, 0.07)), _jitter(rng, (0.85, 0.52, 0.40)),
                 _photo_crop(rng, "brick", h, w, zoom))


def _grass(rng, h, w, zoom):
    return _lerp(_jitter(rng, (0.05, 0.22, 0.04)), _jitter(rng, (0.55, 0.80, 0.25)),
                 _photo_crop(rng, "grass", h, w, zoom))


def _gravel(rng, h, w, zoom):
    return _lerp(_jitter(rng, (0.22, 0.21, 0.20), 0.04), _jitter(rng, (0.78, 0.75, 0.70), 0.04),
                 _photo_crop(rng, "gravel", h, w, zoom))


def _rock(rng, h, w, zoom):
    # scikit-image's "moon" (a lunar surface): cratered grey rock.
    return _lerp(_jitter(rng, (0.20, 0.17, 0.15), 0.04), _jitter(rng, (0.70, 0.64, 0.57), 0.04),
                 _photo_crop(rng, "moon", h, w, zoom))


TEXTURES = {
    "sky": _sky, "water": _water, "sand": _sand, "grass": _grass, "brick": _brick,
    "gravel": _gravel, "snow": _snow, "wood": _wood, "rock": _rock,
}
GROUND = tuple(name for name in STUFF if name != "sky")  # sky only ever sits at the top


def _curve(rng: np.random.Generator, n: int, base: float, amplitude: float, zoom: float):
    """A smooth random 1-D boundary of length n around `base` (pixels)."""
    bumps = _resize(rng.random((1, max(2, int(rng.integers(2, 6) / zoom) + 1)),
                               dtype=np.float32), 1, n)[0]
    return base + amplitude * (bumps - 0.5) * 2


def sample_stuff_layout(rng: np.random.Generator, size: int | tuple[int, int],
                        zoom: float = 1.0) -> np.ndarray:
    """A random arrangement of 1-3 stuff regions: (H, W) uint8 map of class ids (see CLASSES).

    Layouts: one stuff filling the frame; sky above a wavy horizon over one or two grounds; two
    grounds split by a wavy line of random direction, optionally with a blob of a third.
    """
    h, w = _hw(size)
    for _ in range(MAX_PLACEMENT_TRIES):
        names = rng.permutation(GROUND).tolist()
        layout = rng.choice(3, p=(0.2, 0.45, 0.35))
        labels = np.full((h, w), CLASS_ID[names[0]], np.uint8)
        yy, xx = np.mgrid[0:h, 0:w]
        if layout >= 1:  # a second ground, split along a wavy line through the frame
            if rng.random() < 0.5:
                split = _curve(rng, h, rng.uniform(0.3, 0.7) * w, 0.15 * w, zoom)[:, None]
                side = xx > split
            else:
                split = _curve(rng, w, rng.uniform(0.4, 0.8) * h, 0.1 * h, zoom)[None, :]
                side = yy > split
            if layout == 2 or rng.random() < 0.5:
                labels[side] = CLASS_ID[names[1]]
        if layout == 2 and rng.random() < 0.5:  # a blob (pond, patch) of a third ground
            blob = _noise(rng, h, w, cells=rng.uniform(1.5, 3) / zoom, octaves=2)
            labels[blob > rng.uniform(0.7, 0.8)] = CLASS_ID[names[2]]
        if layout == 1:  # sky above a horizon
            horizon = _curve(rng, w, rng.uniform(0.25, 0.6) * h, 0.06 * h, zoom)[None, :]
            labels[yy < horizon] = CLASS_ID["sky"]
        counts = np.bincount(labels.ravel(), minlength=len(CLASSES))
        present = counts[counts > 0]
        if present.min() >= MIN_STUFF_FRACTION * h * w:
            return labels
    return np.full((h, w), CLASS_ID[names[0]], np.uint8)


# --- things -------------------------------------------------------------------------------------
def _regular_polygon(sides: int, radius: float, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(sides) / sides
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], 1)


def _star(points: int = 5, outer: float = 1.0, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


ARROW = np.array([(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22),
                  (-1, 0.22)], np.float64)
POLYGONS = {
    "star": _star(),
    "triangle": _regular_polygon(3, 1.0, -np.pi / 2),
    "hexagon": _regular_polygon(6, 0.92),
    "arrow": ARROW,
}


def _inside_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule: is each point (u, v) inside the closed polygon `vertices` (N, 2)?"""
    inside = np.zeros(u.shape, bool)
    for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        inside ^= crosses & (u < x1 + (x2 - x1) * (v - y1) / (y2 - y1))
    return inside


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Is each point (u, v) of the shape's unit frame (radius 1, y down) inside the shape?"""
    r = np.hypot(u, v)
    if shape in POLYGONS:
        return _inside_polygon(u, v, POLYGONS[shape])
    if shape == "disk":
        return r <= 1.0
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.6)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "cross":
        arm, length = 0.3, 1.0
        return ((np.abs(u) <= arm) & (np.abs(v) <= length)) | (
            (np.abs(v) <= arm) & (np.abs(u) <= length))
    if shape == "heart":  # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0 with y pointing up
        x, y = u * 1.15, -v * 1.15 + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    if shape == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.45, v) > 0.8)
    if shape == "flower":  # five petals
        return r <= 0.3 + 0.7 * np.abs(np.cos(2.5 * np.arctan2(v, u)))
    raise ValueError(f"Unknown shape {shape!r}; the shapes are {sorted(THINGS)}.")


def shape_mask(shape: str, center: tuple[float, float], radius: float, angle: float,
               size: int | tuple[int, int]) -> np.ndarray:
    """Rasterise one thing: (H, W) bool, True where the pixel *centre* lies inside the shape.

    Args:
        shape: one of THINGS.
        center: (x, y) in pixels, origin at the top-left corner of the image.
        radius: half the shape's extent in pixels (a disk of this radius, a star's outer radius).
        angle: rotation in radians (counter-clockwise as displayed).
        size: image size, int or (H, W).
    """
    if shape not in THINGS:
        raise ValueError(f"Unknown shape {shape!r}; the shapes are {sorted(THINGS)}.")
    h, w = _hw(size)
    mask = np.zeros((h, w), bool)
    box, (y0, x0) = _shape_box(shape, center, radius, angle)
    _paste(mask, box, y0, x0)
    return mask


def _shape_box(shape, center, radius, angle):
    """The shape rasterised on its own (unclipped) bounding box: (box, (y0, x0))."""
    u, v, corner = _shape_frame(center, radius, angle)
    return _inside(shape, u, v), corner


def _shape_frame(center, radius, angle):
    """Coordinates (u, v) of each pixel of the shape's bounding box in the shape's unit frame
    (radius 1, rotated with the shape), and the box's top-left corner (y0, x0)."""
    cx, cy = center
    reach = int(np.ceil(1.2 * radius)) + 1
    y0, x0 = int(np.floor(cy)) - reach, int(np.floor(cx)) - reach
    ys = np.arange(y0, y0 + 2 * reach + 1) + 0.5 - cy
    xs = np.arange(x0, x0 + 2 * reach + 1) + 0.5 - cx
    dy, dx = ys[:, None], xs[None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * dx - sin * dy) / radius  # rotate the pixel into the shape's frame
    v = (sin * dx + cos * dy) / radius
    return u, v, (y0, x0)


def _paste(mask: np.ndarray, box: np.ndarray, y0: int, x0: int) -> None:
    h, w = mask.shape
    ya, xa = max(y0, 0), max(x0, 0)
    yb, xb = min(y0 + box.shape[0], h), min(x0 + box.shape[1], w)
    if ya < yb and xa < xb:
        mask[ya:yb, xa:xb] |= box[ya - y0 : yb - y0, xa - x0 : xb - x0]


@dataclass(frozen=True)
class Thing:
    """One placed shape. `center` is (x, y) in pixels, `radius` in pixels, `angle` in radians."""

    name: str
    colour: str
    center: tuple[float, float]
    radius: float
    angle: float


def sample_things(rng: np.random.Generator, size: int | tuple[int, int],
                  zoom: float = 1.0, version: int = GENERATOR_VERSION) -> list[Thing]:
    """Random things, bottom to top, each at least MIN_VISIBLE visible after occlusion.

    A thing's colour is random in version 1 and its material's first colour from version 2.
    """
    _check_version(version)
    h, w = _hw(size)
    count = int(rng.choice(len(THING_COUNT_WEIGHTS), p=THING_COUNT_WEIGHTS))
    placed: list[Thing] = []
    masks: list[np.ndarray] = []
    areas: list[int] = []
    for _ in range(count * MAX_PLACEMENT_TRIES):
        if len(placed) == count:
            break
        name = str(rng.choice(THINGS))
        radius = float(rng.uniform(*RADIUS_RANGE) * min(h, w) * zoom)
        limit = MAX_ROTATION.get(name, np.pi)
        thing = Thing(
            name=name,
            colour=str(rng.choice(list(COLOURS))) if version == 1 else MATERIALS[name][0][0],
            center=(float(rng.uniform(0.1, 0.9) * w), float(rng.uniform(0.1, 0.9) * h)),
            radius=radius,
            angle=float(rng.uniform(-limit, limit)),
        )
        box, (y0, x0) = _shape_box(thing.name, thing.center, thing.radius, thing.angle)
        mask = np.zeros((h, w), bool)
        _paste(mask, box, y0, x0)
        area = int(box.sum())
        if mask.sum() < MIN_VISIBLE * area:
            continue
        if not _still_visible(masks + [mask], areas + [area]):
            continue
        placed.append(thing)
        masks.append(mask)
        areas.append(area)
    return placed


def _still_visible(masks: list[np.ndarray], areas: list[int]) -> bool:
    """Does every mask, occluded by all later ones, keep MIN_VISIBLE of its full area?"""
    cover = np.zeros_like(masks[0])
    for mask, area in zip(reversed(masks), reversed(areas), strict=True):
        if (mask & ~cover).sum() < MIN_VISIBLE * area:
            return False
        cover |= mask
    return True


def _shade_thing(rng: np.random.Generator, colour: str, h: int, w: int) -> np.ndarray:
    """Flat colour with a soft linear light gradient and a little noise, (h, w, 3) in [0, 1]."""
    base = np.asarray(COLOURS[colour], np.float32) / 255.0
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * np.arange(w, dtype=np.float32)[None, :] / w
            + np.sin(direction) * np.arange(h, dtype=np.float32)[:, None] / h)
    ramp *= rng.uniform(0.1, 0.3)
    light = 0.9 + ramp - ramp.mean() + 0.02 * rng.standard_normal((h, w), dtype=np.float32)
    return np.clip(base * light[..., None], 0, 1)


def _pattern(name: str, u: np.ndarray, v: np.ndarray, period: float, phase: float) -> np.ndarray:
    """A two-tone surface pattern in the thing's frame: (h, w) bool, True = pattern colour.

    Args:
        name: a pattern of MATERIALS.
        u, v: the pixel's coordinates in the thing's unit frame (see `_shape_frame`).
        period: repeat length in frame units.
        phase: offset in periods (0..1), so that two things of a class are not pixel-identical.
    """
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    wave = 2 * np.pi / period
    if name == "stripes":
        return np.sin(wave * u + 2 * np.pi * phase) > 0
    if name == "diagonal":
        return np.sin(wave * (u + v) / np.sqrt(2) + 2 * np.pi * phase) > 0
    if name == "checker":
        return (np.floor(u / period + phase) + np.floor(v / period + phase)) % 2 == 0
    if name == "dots":  # a hexagonal lattice of dots
        a, b = u / period + phase, v / (period * np.sqrt(3) / 2)
        row = np.floor(b + 0.5)
        a = a + 0.5 * (row % 2)
        return np.hypot(a - np.floor(a + 0.5), (b - row) * np.sqrt(3) / 2) < 0.3
    if name == "target":
        return np.sin(wave * r + 2 * np.pi * phase) > 0
    if name == "sectors":
        return np.cos(5 * theta) > 0
    if name == "spokes":
        return np.cos(8 * theta + 2 * np.pi * phase) > 0
    if name == "chevrons":
        return np.sin(wave * (u + 0.9 * np.abs(v)) + 2 * np.pi * phase) > 0
    if name == "grid":
        return (np.abs((u / period + phase) % 1 - 0.5) < 0.17) | (
            np.abs((v / period + phase) % 1 - 0.5) < 0.17)
    if name == "waves":
        return np.sin(wave * (v + 0.18 * np.sin(2 * np.pi * u / (1.5 * period)))
                      + 2 * np.pi * phase) > 0
    if name == "spiral":
        return np.cos(2 * theta - wave * r + 2 * np.pi * phase) > 0
    raise ValueError(f"Unknown pattern {name!r}; the patterns are "
                     f"{sorted({m[1] for m in MATERIALS.values()})}.")


def _material_thing(rng: np.random.Generator, name: str, u: np.ndarray,
                    v: np.ndarray) -> np.ndarray:
    """Version-2 paint of thing class `name`: its material's two colours in its pattern, with a
    soft light gradient and a little noise, (h, w, 3) in [0, 1] over the thing's box."""
    (colour, accent), pattern = MATERIALS[name]
    period = PATTERN_PERIOD * rng.uniform(*PATTERN_SCALE_JITTER)
    tone = _pattern(pattern, u, v, period, rng.uniform())
    base = _jitter(rng, np.asarray(COLOURS[colour], np.float32) / 255.0, 0.04)
    other = _jitter(rng, np.asarray(COLOURS[accent], np.float32) / 255.0, 0.04)
    paint = np.where(tone[..., None], other, base).astype(np.float32)
    h, w = u.shape
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * np.arange(w, dtype=np.float32)[None, :] / w
            + np.sin(direction) * np.arange(h, dtype=np.float32)[:, None] / h)
    ramp *= rng.uniform(0.1, 0.3)
    light = 0.9 + ramp - ramp.mean() + 0.02 * rng.standard_normal((h, w), dtype=np.float32)
    return np.clip(paint * light[..., None], 0, 1)


def _check_version(version: int) -> None:
    if version not in VERSIONS:
        raise ValueError(
            f"Unknown generator version {version!r}; the versions are {list(VERSIONS)} "
            f"(the current one is {GENERATOR_VERSION})."
        )


# --- captions -----------------------------------------------------------------------------------
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
STUFF_PHRASES = {
    "sky": ("the sky", "a blue sky", "a cloudy sky", "sky"),
    "water": ("water", "the water", "calm water", "blue water"),
    "sand": ("sand", "the sand", "yellow sand", "sand dunes"),
    "grass": ("grass", "green grass", "the grass", "a grass field"),
    "brick": ("brick", "a brick wall", "red brick", "the brick wall"),
    "gravel": ("gravel", "grey gravel", "the gravel", "loose gravel"),
    "snow": ("snow", "white snow", "the snow", "fresh snow"),
    "wood": ("wood", "wood planks", "the wood floor", "brown wood"),
    "rock": ("rock", "grey rock", "the rock", "bare rock"),
}


def plural(name: str) -> str:
    return name + ("es" if name.endswith(("s", "x", "sh", "ch")) else "s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def join_words(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# Generator v2 captions: P(a caption names only the shapes, "two stars and a ring."): without
# such captions a natural caption identifies its image in a batch of 96 from background, colour
# and count words 94% of the time, and the shape words are never needed (measured on v1).
SHAPES_ONLY_PROB = 0.5
COLOUR_WORD_PROB = {1: 0.8, 2: 0.1}  # P(a thing's phrase names its colour), per version
SHAPES_ONLY_FORMS = ("{}.", "a photo of {}.", "there is {}.", "{} in the picture.",
                     "a picture of {}.")


def _thing_phrases(rng: np.random.Generator, things: Sequence[Thing], short: int,
                   colour_prob: float = COLOUR_WORD_PROB[1],
                   exact_counts: bool = False) -> list[str]:
    """Noun phrases for the visible things, grouped by class: 'a small red star', 'two rings'.

    `colour_prob` is the probability that a phrase names the colour. With `exact_counts` (from
    version 2) a group of one colour is always counted; version 1 sometimes wrote "a red star"
    for two red stars, kept so that version-1 captions stay reproducible."""
    phrases = []
    for name in dict.fromkeys(thing.name for thing in things):
        group = [thing for thing in things if thing.name == name]
        colours = sorted({thing.colour for thing in group})
        if len(group) == 1:
            words = []
            radius = group[0].radius / short
            if rng.random() < 0.35 and (radius < SMALL_RADIUS or radius > LARGE_RADIUS):
                words.append("small" if radius < SMALL_RADIUS else "large")
            if rng.random() < colour_prob:
                words.append(group[0].colour)
            words.append(name)
            phrases.append(f"{article(words[0])} {' '.join(words)}")
        elif len(colours) == 1 and rng.random() < colour_prob:
            phrases.append(f"{NUMBER_WORDS[len(group)]} {colours[0]} {plural(name)}")
        elif rng.random() < 0.5 or (exact_counts and len(colours) == 1):
            phrases.append(f"{NUMBER_WORDS[len(group)]} {plural(name)}")
        else:
            phrases.append(join_words([f"{article(c)} {c} {name}" for c in colours]))
    order = rng.permutation(len(phrases))
    return [phrases[i] for i in order]


def make_captions(rng: np.random.Generator, stuff: Sequence[str], things: Sequence[Thing],
                  short: int, count: int = 3, version: int = GENERATOR_VERSION) -> list[str]:
    """`count` different natural captions, each naming every thing and (unless it names the
    shapes only, a version-2 caption with probability SHAPES_ONLY_PROB) every stuff class."""
    _check_version(version)
    captions: list[str] = []
    for _ in range(count * 4):
        if len(captions) == count:
            break
        if version >= 2 and things and rng.random() < SHAPES_ONLY_PROB:
            shapes = join_words(_thing_phrases(rng, things, short, 0.0, exact_counts=True))
            caption = str(rng.choice(SHAPES_ONLY_FORMS)).format(shapes)
            caption = caption[0].upper() + caption[1:] if rng.random() < 0.3 else caption
            if caption not in captions:
                captions.append(caption)
            continue
        ground = [s for s in stuff if s != "sky"]
        stuff_words = {s: str(rng.choice(STUFF_PHRASES[s])) for s in stuff}
        things_text = join_words(_thing_phrases(
            rng, things, short, COLOUR_WORD_PROB[version], exact_counts=version >= 2)
        ) if things else ""
        ground_text = join_words([stuff_words[s] for s in ground]) if ground else ""
        all_stuff = join_words([stuff_words[s] for s in rng.permutation(list(stuff))])
        options = []
        if things:
            options += [f"{things_text} on {all_stuff}", f"a photo of {things_text} on {all_stuff}",
                        f"{all_stuff} with {things_text}", f"{things_text} in front of {all_stuff}",
                        f"there is {things_text} on {all_stuff}"]
            if "sky" in stuff and ground:
                options += [f"{things_text} on {ground_text} under {stuff_words['sky']}",
                            f"{ground_text} under {stuff_words['sky']} with {things_text}"]
        else:
            options += [f"a photo of {all_stuff}", f"{all_stuff}", f"a view of {all_stuff}"]
            if "sky" in stuff and ground:
                options.append(f"{ground_text} under {stuff_words['sky']}")
        caption = str(rng.choice(options))
        caption = caption[0].upper() + caption[1:] + "." if rng.random() < 0.3 else caption + "."
        if caption not in captions:
            captions.append(caption)
    return captions


# --- scenes -------------------------------------------------------------------------------------
@dataclass
class Scene:
    """One generated scene.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) uint8, class ids into CLASSES (IGNORE_INDEX reserved, unused).
        captions: 2-3 natural captions, each naming every thing in the scene and, unless it
            names the shapes only (version 2), every stuff class.
        present_classes: names of the classes in `mask`, in CLASSES order.
        things: the placed shapes, bottom to top.
    """

    image: np.ndarray
    mask: np.ndarray
    captions: list[str]
    present_classes: list[str]
    things: list[Thing] = field(default_factory=list)


def _visible_part(thing: Thing, h: int, w: int):
    """The thing's frame (u, v), its box, the box's corner (y0, x0) and the box clipped to an
    (h, w) image as (ya, yb, xa, xb); None when none of its pixels is in the image."""
    u, v, (y0, x0) = _shape_frame(thing.center, thing.radius, thing.angle)
    box = _inside(thing.name, u, v)
    ya, xa = max(y0, 0), max(x0, 0)
    yb, xb = min(y0 + box.shape[0], h), min(x0 + box.shape[1], w)
    if ya >= yb or xa >= xb or not box[ya - y0 : yb - y0, xa - x0 : xb - x0].any():
        return None
    return u, v, box, (y0, x0), (ya, yb, xa, xb)


def compose_scene(rng_or_seed, stuff_map: np.ndarray, things: Sequence[Thing],
                  zoom: float = 1.0, captions: int = 3,
                  version: int = GENERATOR_VERSION) -> Scene:
    """Render a given layout: textures into the stuff regions, then the things bottom to top.

    Args:
        rng_or_seed: seed or Generator for textures, shading and captions.
        stuff_map: (H, W) uint8 stuff class ids (see `sample_stuff_layout`).
        things: shapes to draw, bottom to top (see `Thing`).
        zoom: texture scale (> 1 = closer).
        captions: how many captions to write.
        version: generator version (see GENERATOR_VERSION): 1 paints each thing flat in its
            `colour`; 2 paints it in its class's material (MATERIALS), whatever its `colour`.

    Returns:
        The scene; its mask equals `stuff_map` overwritten by each thing's `shape_mask` in order.
    """
    _check_version(version)
    rng = _rng(rng_or_seed)
    stuff_map = np.asarray(stuff_map)
    if stuff_map.ndim != 2 or not np.isin(stuff_map, [CLASS_ID[s] for s in STUFF]).all():
        raise ValueError(
            "stuff_map must be an (H, W) array of stuff class ids "
            f"{[CLASS_ID[s] for s in STUFF]} (see sample_stuff_layout)."
        )
    h, w = _hw(stuff_map.shape)
    image = np.zeros((h, w, 3), np.float32)
    mask = stuff_map.astype(np.uint8).copy()
    for class_id in np.unique(stuff_map):
        texture = TEXTURES[CLASSES[class_id]](rng, h, w, zoom)
        np.copyto(image, texture, where=(stuff_map == class_id)[..., None])
    drawn = []
    for thing in things:
        part = _visible_part(thing, h, w)
        if part is None:
            continue
        u, v, box, (y0, x0), (ya, yb, xa, xb) = part
        inside = box[ya - y0 : yb - y0, xa - x0 : xb - x0]
        if rng.random() < 0.5:  # a soft drop shadow on whatever lies below
            offset = max(1, int(round(thing.radius * 0.12)))
            shadow = np.zeros((h, w), bool)
            _paste(shadow, box, y0 + offset, x0 + offset)
            shadow[ya:yb, xa:xb] &= ~inside
            image[shadow] *= 0.6
        if version == 1:
            paint = _shade_thing(rng, thing.colour, yb - ya, xb - xa)
        else:
            frame = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
            paint = _material_thing(rng, thing.name, u[frame], v[frame])
        np.copyto(image[ya:yb, xa:xb], paint, where=inside[..., None])
        mask[ya:yb, xa:xb][inside] = CLASS_ID[thing.name]
        drawn.append(thing)
    image *= rng.uniform(0.85, 1.1)  # global exposure
    image += 0.012 * rng.standard_normal(image.shape, dtype=np.float32)
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    ids = np.flatnonzero(np.bincount(mask.ravel(), minlength=len(CLASSES))[: len(CLASSES)])
    present = [CLASSES[i] for i in ids]
    visible = [t for t in drawn if t.name in present]
    stuff = sorted((s for s in present if s in STUFF), key=lambda s: -(mask == CLASS_ID[s]).sum())
    return Scene(image, mask, make_captions(rng, stuff, visible, min(h, w), captions, version),
                 present, list(drawn))


def generate_scene(rng_or_seed: int | Sequence[int] | np.random.Generator,
                   size: int | tuple[int, int] = 224, zoom: float = 1.0,
                   version: int = GENERATOR_VERSION) -> Scene:
    """Generate one random scene, deterministic given the seed and the version.

    Args:
        rng_or_seed: an int, a sequence of ints (e.g. `[seed, index]`) or a numpy Generator.
        size: image size in pixels, int (square) or (H, W); at least 32.
        zoom: scale of things and textures relative to the frame (1 = default; 2 = as if a
            half-size crop of a scene were shown at full size).
        version: generator version (see GENERATOR_VERSION); older ones stay reproducible.

    Returns:
        Scene with image, exact mask, 3 captions and the present classes.
    """
    rng, stuff_map, things = _layout(rng_or_seed, size, zoom, version)
    return compose_scene(rng, stuff_map, things, zoom, version=version)


def _layout(rng_or_seed: int | Sequence[int] | np.random.Generator, size: int | tuple[int, int],
            zoom: float, version: int) -> tuple[np.random.Generator, np.ndarray, list[Thing]]:
    """The generator after the layout, the stuff map and the things of a scene."""
    if not 0.25 <= zoom <= 4:
        raise ValueError(f"zoom must be in [0.25, 4], got {zoom}.")
    _check_version(version)
    rng = _rng(rng_or_seed)
    h, w = _hw(size)
    stuff_map = sample_stuff_layout(rng, (h, w), zoom)
    return rng, stuff_map, sample_things(rng, (h, w), zoom, version)


def scene_mask(rng_or_seed: int | Sequence[int] | np.random.Generator,
               size: int | tuple[int, int] = 224, zoom: float = 1.0,
               version: int = GENERATOR_VERSION) -> np.ndarray:
    """The mask `generate_scene` gives for the same arguments, without rendering the image:
    the layout alone, about 8x faster (2.4 vs 20.7 ms at 224 px), for choosing training scenes
    by the classes they show."""
    _, stuff_map, things = _layout(rng_or_seed, size, zoom, version)
    mask = stuff_map.astype(np.uint8).copy()
    for thing in things:
        part = _visible_part(thing, *mask.shape)
        if part is not None:
            _, _, box, (y0, x0), (ya, yb, xa, xb) = part
            mask[ya:yb, xa:xb][box[ya - y0 : yb - y0, xa - x0 : xb - x0]] = CLASS_ID[thing.name]
    return mask


# --- writing a dataset --------------------------------------------------------------------------
def write_dataset(out_dir: str | os.PathLike, num: int, seed: int = 0, size: int = 224,
                  progress: bool = False, version: int = GENERATOR_VERSION) -> Path:
    """Write `num` scenes in the layout of the module docstring; each file written atomically.

    Args:
        out_dir: dataset root (created if missing; existing files of the same names are replaced).
        num: number of scenes (>= 1).
        seed: dataset seed; scene i uses `np.random.default_rng([seed, i])`.
        size: square image size in pixels (>= 32).
        progress: print one line per 100 scenes.
        version: generator version (recorded in meta.json).

    Returns:
        The dataset root.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int (number of scenes), got {num!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    _hw(size)
    _check_version(version)
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    with atomic_write(root / "classes.txt", "w") as handle:
        handle.write("\n".join(CLASSES) + "\n")
    split = {"seen": list(SEEN), "unseen": list(UNSEEN)}
    save_json_atomic(split, root / "split.json")
    lines = []
    for index in range(num):
        scene = generate_scene(np.random.default_rng([seed, index]), size, version=version)
        stem = f"{index:06d}"
        save_png_atomic(Image.fromarray(scene.image), root / "images" / f"{stem}.png")
        save_png_atomic(Image.fromarray(scene.mask), root / "masks" / f"{stem}.png")
        lines.append(json.dumps({"id": stem, "captions": scene.captions,
                                 "classes": scene.present_classes}))
        if progress and (index + 1) % 100 == 0:
            print(f"synth: {index + 1}/{num} scenes -> {root}", flush=True)
    with atomic_write(root / "captions.jsonl", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    meta = {"generator": "zegkit.data.synthetic", "version": version, "seed": seed,
            "num": num, "size": size}
    save_json_atomic(meta, root / "meta.json")
    return root


# --- command line (`zegkit synth`) --------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `zegkit synth`."""
    parser.add_argument("--out", required=True, help="dataset root to write (required)")
    parser.add_argument("--num", type=int, default=500, help="number of scenes (default: 500)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    parser.add_argument("--size", type=int, default=224,
                        help="square image size in pixels (default: 224)")
    parser.add_argument("--version", type=int, default=GENERATOR_VERSION, choices=VERSIONS,
                        help=f"generator version (default: {GENERATOR_VERSION})")


def run(args: argparse.Namespace) -> int:
    """Run `zegkit synth` with parsed arguments; returns the exit code."""
    root = write_dataset(args.out, args.num, args.seed, args.size, progress=True,
                         version=args.version)
    print(f"synth: wrote {args.num} scenes ({len(CLASSES)} classes, {len(UNSEEN)} unseen) "
          f"to {root}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zegkit synth", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
