"""Colour palettes, palette label images, overlays with a legend, class pixel fractions.

Palette: class c gets entry c + 1 of the Pascal VOC colour map (the bit-interleaving palette of
the VOC 2012 devkit, `VOClabelcolormap.m`, also used by MMSegmentation and torchvision examples).
Skipping VOC entry 0 keeps black free for ignored/unlabelled pixels, so class 0 (the first class,
or the background when a threshold is used) gets a visible colour, (128, 0, 0). The interleaving
spreads the bits of the index over the high bits of R, G and B, so all 2**24 - 1 colours are
distinct and neighbouring classes differ strongly.

Label images are Pillow "P" images: pixel value = class index, palette = `palette(K)`,
index 255 (`IGNORE_INDEX`) black. `np.array(label_image(labels, K))` gives `labels` back.

Legend text is drawn character by character in the first installed font of `LEGEND_FONTS` that
has a glyph for it (Pillow's own font covers Latin only, so "猫" drew as an empty box), so "猫 cat"
mixes a CJK font and DejaVu on one baseline; a character no installed font covers is drawn as
"?", with a warning saying which font package adds it.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from zegkit.data.base import IGNORE_INDEX
from zegkit.io import ImageSource, load_image

# A "P" image has 256 entries; 255 is IGNORE_INDEX, so it can hold classes 0..254.
MAX_PALETTE_CLASSES = 255
# Beyond that, label PNGs are 16-bit greyscale: class indices 0..65534 (65535 kept free).
MAX_LABEL_PNG_CLASSES = 65535
# Three bits of the index go into R, G, B per round; 8 rounds fill 8 bits per channel.
_VOC_ROUNDS = 8
MAX_PALETTE_SIZE = 2 ** (3 * _VOC_ROUNDS) - 1  # distinct colours (black excluded)
IGNORE_COLOUR = (0, 0, 0)
# Pixels an overlay blends at once: its float64 working arrays stay small (1.5 MiB each).
BLEND_BAND_PIXELS = 2**16

# Legend layout, in multiples of the font size (chosen to read like a plot legend).
LEGEND_FONT_MIN, LEGEND_FONT_MAX = 12, 32  # pixels; grows with the image between these
LEGEND_LINES_PER_IMAGE = 30  # font size = image height / this, clamped to the range above
LEGEND_ROW_SPACING = 1.5  # row height / font size
LEGEND_PADDING = 0.75  # panel margin / font size
LEGEND_MAX_NAME_CHARS = 40  # longer class names are cut with "..."
LEGEND_BACKGROUND = (255, 255, 255)
LEGEND_TEXT_COLOUR = (0, 0, 0)
LEGEND_SWATCH_OUTLINE = (64, 64, 64)  # keeps light swatches visible on the white panel
# Legend fonts by file name, tried in order (Pillow searches the system's font folders): DejaVu
# Sans (Latin, Greek, Cyrillic; Debian fonts-dejavu-core, also on most Linux desktops), then fonts
# covering Chinese, Japanese and Korean (Debian fonts-noto-cjk, fonts-droid-fallback,
# fonts-wqy-microhei). Pillow's built-in font comes last.
LEGEND_FONTS = ("DejaVuSans.ttf", "NotoSansCJK-Regular.ttc", "DroidSansFallbackFull.ttf",
                "wqy-microhei.ttc")
LEGEND_MISSING_GLYPH = "?"  # drawn for a character no installed font covers
_NOTDEF_PROBE = "\U0010FFFF"  # a noncharacter: a font draws its missing-glyph box for it
LATIN_1_MAX = 255  # Pillow's bitmap font (without FreeType) encodes Latin-1 only


class LegendEntry(NamedTuple):
    """One legend row: a class present in the label map."""

    index: int  # class index (row of `palette`)
    name: str
    fraction: float  # of all pixels in the label map


def palette(k: int) -> np.ndarray:
    """Distinct, deterministic colours for `k` classes.

    Args:
        k: Number of classes, 0 <= k <= 2**24 - 1.

    Returns:
        Array of shape (k, 3), dtype uint8, row c = RGB colour of class c (VOC colour map entry
        c + 1; never black, which marks ignored pixels).

    Raises:
        ValueError: `k` is not an int in the allowed range.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"palette size must be an int; got {type(k).__name__}.")
    if not 0 <= k <= MAX_PALETTE_SIZE:
        raise ValueError(f"palette size must be in [0, {MAX_PALETTE_SIZE}]; got {k}.")
    voc_index = np.arange(1, k + 1, dtype=np.int64)  # skip VOC entry 0 (black)
    colours = np.zeros((k, 3), dtype=np.int64)
    for bit in range(_VOC_ROUNDS):  # bits 3*bit .. 3*bit+2 of the index -> bit (7 - bit) of R, G, B
        for channel in range(3):
            colours[:, channel] |= ((voc_index >> (3 * bit + channel)) & 1) << (7 - bit)
    return colours.astype(np.uint8)


def label_image(labels: np.ndarray, num_classes: int) -> Image.Image:
    """Encode a label map as a palette ("P") image.

    Args:
        labels: (H, W) integer class indices in [0, num_classes), or IGNORE_INDEX (255).
        num_classes: Number of classes K, at most 255.

    Returns:
        PIL "P" image whose pixel values are the labels, coloured by `palette(K)`; ignored
        pixels are black.

    Raises:
        ValueError: `labels` is not an (H, W) integer array with values in range, or
            `num_classes` is not in [1, 255].
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an int; got {type(num_classes).__name__}.")
    if not 1 <= num_classes <= MAX_PALETTE_CLASSES:
        raise ValueError(
            f"A palette image holds 1..{MAX_PALETTE_CLASSES} classes (index {IGNORE_INDEX} marks "
            f"ignored pixels); got num_classes={num_classes}. For more classes save the labels "
            f"as a 16-bit PNG: Image.fromarray(labels.astype(np.uint16))."
        )
    labels = _check_labels(labels, num_classes, IGNORE_INDEX)
    table = np.zeros((MAX_PALETTE_CLASSES + 1, 3), dtype=np.uint8)  # unused entries black
    table[:num_classes] = palette(num_classes)
    table[IGNORE_INDEX] = IGNORE_COLOUR
    image = Image.fromarray(labels.astype(np.uint8))  # mode "L"
    image.putpalette(table.ravel().tolist())  # "L" -> "P", pixel values unchanged
    return image


def label_png(labels: np.ndarray, class_names: Sequence[str]) -> Image.Image:
    """The label map as an image to save as PNG: `label_image` (palette) for up to 255 classes;
    beyond, a 16-bit greyscale image whose pixel value is the class index (no palette: a "P"
    image has 256 entries).

    Raises:
        ValueError: bad labels or names, or more than 65535 classes.
    """
    names = _check_names(class_names)
    if len(names) <= MAX_PALETTE_CLASSES:
        return label_image(labels, len(names))
    if len(names) > MAX_LABEL_PNG_CLASSES:
        raise ValueError(
            f"A 16-bit label PNG holds at most {MAX_LABEL_PNG_CLASSES} classes; got {len(names)}."
        )
    labels = _check_labels(labels, len(names), None)
    return Image.fromarray(labels.astype(np.uint16))  # mode "I;16"


def class_fractions(
    labels: np.ndarray, class_names: Sequence[str], *, ignore_index: int | None = IGNORE_INDEX
) -> dict[str, float]:
    """Fraction of the label map's pixels that each class covers.

    Args:
        labels: (H, W) integer class indices in [0, K) or `ignore_index`.
        class_names: The K class names, in label order; must be distinct.
        ignore_index: Label of unlabelled pixels (counted in the total, given to no class).
            Values below K are always classes, so with more than 255 classes 255 is a class.

    Returns:
        {name: fraction} for every class in label order (0.0 when absent). Sums to 1 unless
        some pixels are ignored.

    Raises:
        ValueError: Bad labels (shape, dtype, values out of range) or duplicate class names.
    """
    names = _check_names(class_names)
    labels = _check_labels(labels, len(names), ignore_index)
    counts = _class_counts(labels, len(names))
    return {name: int(count) / labels.size for name, count in zip(names, counts, strict=True)}


def legend_entries(
    labels: np.ndarray, class_names: Sequence[str], *, ignore_index: int | None = IGNORE_INDEX
) -> list[LegendEntry]:
    """The classes present in a label map, largest area first (ties: lower class index first).

    Args:
        labels: (H, W) integer class indices in [0, K) or `ignore_index`.
        class_names: The K class names, in label order; must be distinct.
        ignore_index: Label of unlabelled pixels, as in `class_fractions`.

    Returns:
        One `LegendEntry(index, name, fraction)` per class with at least one pixel.

    Raises:
        ValueError: As for `class_fractions`.
    """
    names = _check_names(class_names)
    return _legend_entries(_check_labels(labels, len(names), ignore_index), names)


def overlay(
    image: ImageSource,
    labels: np.ndarray,
    class_names: Sequence[str],
    alpha: float = 0.5,
    legend: bool = True,
    *,
    ignore_index: int | None = IGNORE_INDEX,
) -> Image.Image:
    """Blend a label map's colours over an image, with a legend panel to its right.

    Args:
        image: The image the labels belong to: a PIL image, path or array (anything
            `zegkit.io.load_image` accepts); its size must match `labels`.
        labels: (H, W) integer class indices in [0, K) or `ignore_index`.
        class_names: The K class names, in label order.
        alpha: Weight of the class colour, in [0, 1] (0: image only, 1: colours only).
        legend: Add a legend panel (swatch, name, percentage of pixels) for the classes present,
            largest first. It sits beside the image, never on it.
        ignore_index: Label of unlabelled pixels; they show the image unblended.

    Returns:
        RGB image: W x H without a legend; (W + panel width) x max(H, panel height) with one.

    Raises:
        ValueError: Bad labels, label/image size mismatch, duplicate class names, or `alpha`
            outside [0, 1].
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1]; got {alpha!r}.")
    names = _check_names(class_names)
    rgb = load_image(image)
    labels = _check_labels(labels, len(names), ignore_index)
    if labels.shape != (rgb.height, rgb.width):
        raise ValueError(
            f"labels have shape {labels.shape} but the image is {rgb.height} x {rgb.width} "
            f"(H x W); they must match. Resize the labels with nearest-neighbour interpolation "
            f"or pass the image they were computed on."
        )
    colours = palette(len(names))
    blended = _blend(np.asarray(rgb), labels, colours, alpha)
    if not legend:
        return blended
    return _attach_legend(blended, _legend_entries(labels, names), colours)


# --------------------------------------------------------------------------------------------
# Helpers


def _check_names(class_names: Sequence[str]) -> list[str]:
    if isinstance(class_names, str):
        raise ValueError(
            f"class_names must be a sequence of names, not one string ({class_names!r}); "
            f"wrap it in a list."
        )
    names = [str(name) for name in class_names]
    if not names:
        raise ValueError("class_names is empty; pass at least one class name.")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"class_names must be distinct; repeated: {duplicates}.")
    return names


def _check_labels(labels: np.ndarray, num_classes: int, ignore_index: int | None) -> np.ndarray:
    """Return labels as an (H, W) int64 array (`labels` itself when it is one: callers only
    read it), checking shape, dtype and value range."""
    array = np.asarray(labels)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(
            f"labels must be a non-empty (H, W) array of class indices; got shape {array.shape}."
        )
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"labels must hold integer class indices; got dtype {array.dtype}. For logits of "
            f"shape (K, H, W) use logits.argmax(0)."
        )
    array = array.astype(np.int64, copy=False)  # no copy of int64 labels (13000 x 13000: 1.4 GB)
    valid = (array >= 0) & (array < num_classes)
    if ignore_index is not None:
        valid |= array == ignore_index
    if not valid.all():
        bad = np.unique(array[~valid])[:5].tolist()
        allowed = f"[0, {num_classes})"
        if ignore_index is not None:
            allowed += f" or the ignore label {ignore_index}"
        raise ValueError(
            f"labels hold values {bad} outside {allowed}. Check that class_names matches the "
            f"vocabulary the labels were predicted with."
        )
    return array


def _class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel count per class of checked labels; ignored pixels (values >= K) are not counted.
    Counting every value and dropping the bins >= K needs no masked copy of the labels."""
    return np.bincount(labels.ravel(), minlength=num_classes)[:num_classes]


def _legend_entries(labels: np.ndarray, names: list[str]) -> list[LegendEntry]:
    """Legend rows for checked int64 labels: present classes, largest first."""
    counts = _class_counts(labels, len(names))
    present = [
        LegendEntry(index, names[index], int(counts[index]) / labels.size)
        for index in np.flatnonzero(counts).tolist()
    ]
    return sorted(present, key=lambda entry: (-entry.fraction, entry.index))


def _blend(
    pixels: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float
) -> Image.Image:
    """Mix class colours into labelled pixels; ignored pixels keep the image's colour.

    The mix is computed a band of rows at a time (BLEND_BAND_PIXELS) into a uint8 copy of the
    image, so its float working memory stays a few MiB whatever the image's size (a 13000 x
    13000 image would need 4 GB per float64 copy).
    """
    out = np.array(pixels, dtype=np.uint8)  # (H, W, 3)
    rows = max(1, BLEND_BAND_PIXELS // labels.shape[1])
    for top in range(0, labels.shape[0], rows):
        band, band_labels = out[top : top + rows], labels[top : top + rows]  # views
        labelled = band_labels < len(colours)  # (n, W); ignored pixels are >= K
        class_rgb = colours[band_labels[labelled]].astype(np.float64)  # (N, 3)
        mixed = (1.0 - alpha) * band[labelled] + alpha * class_rgb
        band[labelled] = np.rint(mixed).astype(np.uint8)
    return Image.fromarray(out)


@functools.cache
def _installed_font(name: str, size: int) -> ImageFont.FreeTypeFont | None:
    """Font file `name` at `size` px from the system's font folders, or None if not installed."""
    try:
        return ImageFont.truetype(name, size)
    except OSError:
        return None


def _candidate_fonts(size: int) -> list[ImageFont.ImageFont | ImageFont.FreeTypeFont]:
    """The installed fonts of LEGEND_FONTS, then Pillow's own (its bitmap font without FreeType)."""
    fonts = [font for font in (_installed_font(name, size) for name in LEGEND_FONTS) if font]
    try:
        fonts.append(ImageFont.load_default(size=size))
    except (ImportError, OSError):  # Pillow built without FreeType
        fonts.append(ImageFont.load_default())
    return fonts


def has_glyph(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, char: str) -> bool:
    """Whether `font` draws `char` with a glyph of its own, not its missing-glyph box.

    A FreeType font's missing glyph is recognised by drawing like the glyph of a noncharacter.
    """
    if char.isspace():
        return True
    if not isinstance(font, ImageFont.FreeTypeFont):
        return ord(char) <= LATIN_1_MAX
    return _glyph_mask(font, char) != _glyph_mask(font, _NOTDEF_PROBE)


@functools.cache
def _glyph_mask(font: ImageFont.FreeTypeFont, char: str) -> tuple[tuple[int, int], bytes]:
    mask = font.getmask(char)
    return mask.size, bytes(mask)


FontRun = tuple[str, ImageFont.ImageFont | ImageFont.FreeTypeFont]


def font_runs(line: str, fonts: Sequence[ImageFont.ImageFont | ImageFont.FreeTypeFont],
              ) -> tuple[list[FontRun], set[str]]:
    """`line` cut into runs of characters drawn with one font each (the first of `fonts` with a
    glyph), and the characters no font has (drawn as LEGEND_MISSING_GLYPH in `fonts[0]`)."""
    runs: list[FontRun] = []
    missing: set[str] = set()
    for char in line:
        font = next((font for font in fonts if has_glyph(font, char)), None)
        if font is None:
            missing.add(char)
            char, font = LEGEND_MISSING_GLYPH, fonts[0]
        if runs and runs[-1][1] is font:
            runs[-1] = (runs[-1][0] + char, font)
        else:
            runs.append((char, font))
    return runs, missing


def _legend_runs(image_height: int, lines: list[str],
                 ) -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, list[list[FontRun]]]:
    """The legend's main font (sized to the image) and each line's font runs; warns once about
    characters no installed font draws."""
    size = int(np.clip(image_height // LEGEND_LINES_PER_IMAGE, LEGEND_FONT_MIN, LEGEND_FONT_MAX))
    fonts = _candidate_fonts(size)
    cut = [font_runs(line, fonts) for line in lines]
    missing = set().union(*(gaps for _, gaps in cut))
    if missing:
        warnings.warn(
            f"No installed font has glyphs for {''.join(sorted(missing))!r}; the legend draws "
            f"{LEGEND_MISSING_GLYPH!r} for them (the JSON keeps the names). Install a font that "
            f"covers them (e.g. Debian/Ubuntu: apt-get install fonts-noto-cjk); tried "
            f"{', '.join(LEGEND_FONTS)} and Pillow's own.",
            stacklevel=4,
        )
    return fonts[0], [runs for runs, _ in cut]


def _legend_text(entry: LegendEntry) -> str:
    name = entry.name
    if len(name) > LEGEND_MAX_NAME_CHARS:
        name = name[: LEGEND_MAX_NAME_CHARS - 3] + "..."
    percent = 100.0 * entry.fraction
    share = "<0.1%" if percent < 0.05 else f"{percent:.1f}%"
    return f"{name}  {share}"


def _attach_legend(
    image: Image.Image, entries: list[LegendEntry], colours: np.ndarray
) -> Image.Image:
    """Return `image` with a legend panel for `entries` appended on its right."""
    lines = [_legend_text(entry) for entry in entries] or ["no labelled pixels"]
    font, runs = _legend_runs(image.height, lines)
    font_size = getattr(font, "size", LEGEND_FONT_MIN)  # the bitmap fallback has no .size
    row = int(round(font_size * LEGEND_ROW_SPACING))
    pad = int(round(font_size * LEGEND_PADDING))
    swatch = font_size
    draw = ImageDraw.Draw(image)  # used only to measure text
    text_width = max(int(np.ceil(_runs_length(draw, line))) for line in runs)
    panel_width = pad + swatch + pad + text_width + pad
    panel_height = pad + row * len(lines) + pad
    size = (image.width + panel_width, max(image.height, panel_height))
    canvas = Image.new("RGB", size, LEGEND_BACKGROUND)
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    left = image.width + pad
    for i in range(len(lines)):
        centre = pad + i * row + row // 2  # vertical centre of row i
        if i < len(entries):
            top = centre - swatch // 2
            colour = tuple(int(c) for c in colours[entries[i].index])
            draw.rectangle(
                (left, top, left + swatch - 1, top + swatch - 1),
                fill=colour,
                outline=LEGEND_SWATCH_OUTLINE,
            )
        _draw_runs(draw, (left + swatch + pad, centre), runs[i], font)
    return canvas


def _runs_length(draw: ImageDraw.ImageDraw, runs: list[FontRun]) -> float:
    return sum(draw.textlength(text, font=font) for text, font in runs)


def _draw_runs(draw: ImageDraw.ImageDraw, start: tuple[int, int], runs: list[FontRun],
               font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> None:
    """Draw font runs left to right from `start` (x, vertical centre): FreeType runs on one
    baseline placed by the main `font`'s metrics; Pillow's bitmap font has a single run."""
    x, centre = start
    if not isinstance(font, ImageFont.FreeTypeFont):
        text = "".join(text for text, _ in runs)
        _, top, _, bottom = draw.textbbox((0, 0), text, font=font)
        draw.text((x, centre - (top + bottom) // 2), text, fill=LEGEND_TEXT_COLOUR, font=font)
        return
    ascent, descent = font.getmetrics()
    baseline = centre + (ascent - descent) // 2
    for text, run_font in runs:
        draw.text((x, baseline), text, fill=LEGEND_TEXT_COLOUR, font=run_font, anchor="ls")
        x += draw.textlength(text, font=run_font)
