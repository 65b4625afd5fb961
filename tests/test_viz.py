"""zegkit.viz: palette, palette label images, class fractions, overlays with a legend."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from zegkit.io import save_png_atomic
from zegkit.viz import (
    IGNORE_INDEX,
    class_fractions,
    label_image,
    label_png,
    legend_entries,
    overlay,
    palette,
)

# First entries of the Pascal VOC colour map (devkit VOClabelcolormap.m), entries 1..8.
VOC_ENTRIES_1_TO_8 = [
    [128, 0, 0],
    [0, 128, 0],
    [128, 128, 0],
    [0, 0, 128],
    [128, 0, 128],
    [0, 128, 128],
    [128, 128, 128],
    [64, 0, 0],
]


def colours_in(image: Image.Image, box: tuple[int, int, int, int]) -> set[tuple[int, int, int]]:
    region = np.asarray(image.crop(box)).reshape(-1, 3)
    return {tuple(int(v) for v in colour) for colour in np.unique(region, axis=0)}


# ---------------------------------------------------------------------------------------------
# palette


def test_palette_is_voc_shifted_by_one():
    colours = palette(8)
    assert colours.shape == (8, 3) and colours.dtype == np.uint8
    assert colours.tolist() == VOC_ENTRIES_1_TO_8  # class 0 gets (128, 0, 0), not black


@pytest.mark.parametrize("k", [1, 21, 255, 1000, 5000])
def test_palette_distinct_deterministic_never_black(k):
    colours = palette(k)
    assert len(np.unique(colours, axis=0)) == k
    assert not (colours == 0).all(axis=1).any()  # black is reserved for ignored pixels
    np.testing.assert_array_equal(colours, palette(k))
    np.testing.assert_array_equal(palette(k)[: min(k, 21)], palette(21)[: min(k, 21)])


def test_palette_bad_sizes():
    assert palette(0).shape == (0, 3)
    with pytest.raises(ValueError, match="must be in"):
        palette(-1)
    with pytest.raises(ValueError, match="must be an int"):
        palette(2.5)


# ---------------------------------------------------------------------------------------------
# label_image


def test_label_image_round_trip_in_memory_and_png(tmp_path):
    labels = np.random.default_rng(0).integers(0, 21, (17, 23))
    labels[0, :5] = IGNORE_INDEX

    image = label_image(labels, 21)

    assert image.mode == "P" and image.size == (23, 17)
    np.testing.assert_array_equal(np.array(image), labels)
    path = tmp_path / "labels.png"
    save_png_atomic(image, path)
    with Image.open(path) as back:
        assert back.mode == "P"
        np.testing.assert_array_equal(np.array(back), labels)


def test_label_image_colours():
    labels = np.array([[0, 1], [2, IGNORE_INDEX]])
    rgb = np.asarray(label_image(labels, 3).convert("RGB"))
    assert rgb[0, 0].tolist() == palette(3)[0].tolist()
    assert rgb[1, 0].tolist() == palette(3)[2].tolist()
    assert rgb[1, 1].tolist() == [0, 0, 0]  # ignore is black


def test_label_png_counts_names():
    labels = np.array([[0, 1]])
    np.testing.assert_array_equal(np.array(label_png(labels, ["cat", "dog"])), labels)


@pytest.mark.parametrize(
    ("labels", "num_classes", "fragment"),
    [
        (np.array([[0, 3]]), 3, "outside"),
        (np.array([[0, -1]]), 3, "outside"),
        (np.zeros((2, 2), np.float32), 3, "integer"),
        (np.zeros((2, 2), bool), 3, "integer"),
        (np.zeros((1, 2, 2), np.int64), 3, r"\(H, W\)"),
        (np.zeros((0, 2), np.int64), 3, "non-empty"),
        (np.zeros((2, 2), np.int64), 256, "16-bit PNG"),
        (np.zeros((2, 2), np.int64), 0, "1..255"),
    ],
)
def test_label_image_bad_inputs(labels, num_classes, fragment):
    with pytest.raises(ValueError, match=fragment):
        label_image(labels, num_classes)


# ---------------------------------------------------------------------------------------------
# class_fractions / legend_entries


def test_class_fractions_counts_every_class_and_ignored_pixels():
    labels = np.array([[0, 0, 2, IGNORE_INDEX]])
    assert class_fractions(labels, ["sky", "cat", "road"]) == {"sky": 0.5, "cat": 0.0, "road": 0.25}


def test_class_fractions_with_more_than_255_classes_treats_255_as_a_class():
    names = [f"c{i}" for i in range(300)]
    labels = np.array([[255, 299]])
    fractions = class_fractions(labels, names)
    assert fractions["c255"] == 0.5 and fractions["c299"] == 0.5


def test_class_fractions_bad_names():
    with pytest.raises(ValueError, match="repeated"):
        class_fractions(np.zeros((2, 2), np.int64), ["cat", "cat"])
    with pytest.raises(ValueError, match="not one string"):
        class_fractions(np.zeros((2, 2), np.int64), "cat")
    with pytest.raises(ValueError, match="outside"):
        class_fractions(np.array([[5]]), ["cat"])


def test_legend_entries_present_classes_by_area():
    labels = np.array([[2, 2, 2, 0, 3, IGNORE_INDEX]])
    entries = legend_entries(labels, ["a", "b", "c", "d"])
    assert [(e.index, e.name) for e in entries] == [(2, "c"), (0, "a"), (3, "d")]
    assert entries[0].fraction == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# overlay


@pytest.fixture
def scene() -> tuple[Image.Image, np.ndarray, list[str]]:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    labels = np.zeros((60, 80), np.int64)  # class 0 ("sky") everywhere ...
    labels[30:, :] = 2  # ... except the bottom half: class 2 ("road")
    labels[:, 70:] = IGNORE_INDEX
    return image, labels, ["sky", "cat", "road", "tree"]


def test_overlay_without_legend_blends_in_place(scene):
    image, labels, names = scene
    out = overlay(image, labels, names, alpha=0.5, legend=False)
    assert out.mode == "RGB" and out.size == image.size
    source, blended = np.asarray(image).astype(int), np.asarray(out).astype(int)
    expected = np.rint(0.5 * source[5, 5] + 0.5 * palette(4)[0].astype(int))
    np.testing.assert_allclose(blended[5, 5], expected, atol=1)
    np.testing.assert_array_equal(blended[:, 70:], source[:, 70:])  # ignored pixels unchanged


def test_overlay_of_a_large_image_makes_no_float_copy_of_it():
    import tracemalloc

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (1500, 1400, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (1500, 1400))
    labels[::7] = IGNORE_INDEX
    tracemalloc.start()
    out = overlay(pixels, labels, ["a", "b", "c", "d"], alpha=0.3, legend=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 12 * labels.size  # a float64 (H, W, 3) copy alone is 24 bytes per pixel
    labelled = labels != IGNORE_INDEX
    expected = pixels.copy()
    expected[labelled] = np.rint(0.7 * pixels[labelled] + 0.3 * palette(4)[labels[labelled]])
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_overlay_alpha_extremes(scene):
    image, labels, names = scene
    unchanged = overlay(image, labels, names, alpha=0.0, legend=False)
    np.testing.assert_array_equal(np.asarray(unchanged), np.asarray(image))
    solid = np.asarray(overlay(image, labels, names, alpha=1.0, legend=False))
    assert solid[40, 10].tolist() == palette(4)[2].tolist()


def test_overlay_legend_panel_beside_image_lists_present_classes(scene):
    image, labels, names = scene
    out = overlay(image, labels, names)

    assert out.width > image.width and out.height >= image.height
    without = overlay(image, labels, names, legend=False)
    np.testing.assert_array_equal(  # the legend never covers the image
        np.asarray(out)[: image.height, : image.width], np.asarray(without)
    )
    panel = colours_in(out, (image.width, 0, out.width, out.height))
    colours = [tuple(int(v) for v in c) for c in palette(4)]
    assert colours[0] in panel and colours[2] in panel  # swatches of the present classes
    assert colours[1] not in panel and colours[3] not in panel  # absent classes: none
    assert (255, 255, 255) in panel and (0, 0, 0) in panel  # white panel, black text


def test_overlay_tall_legend_grows_canvas(scene):
    image, _, _ = scene
    names = [f"class {i}" for i in range(40)]
    labels = np.arange(60 * 80).reshape(60, 80) % 40
    out = overlay(image, labels, names)
    assert out.height > image.height  # 40 rows do not fit beside a 60-pixel image
    np.testing.assert_array_equal(
        np.asarray(out)[: image.height, : image.width],
        np.asarray(overlay(image, labels, names, legend=False)),
    )


def test_overlay_accepts_paths_arrays_and_odd_names(scene, tmp_path):
    image, labels, _ = scene
    path = tmp_path / "scene.png"
    image.save(path)
    names = ["天空", "cat", "a " + "very " * 20 + "long name", "tree"]
    from_path = overlay(path, labels, names)
    from_array = overlay(np.asarray(image), labels, names)
    np.testing.assert_array_equal(np.asarray(from_path), np.asarray(from_array))


def test_overlay_everything_ignored_still_draws_a_panel(scene):
    image, _, names = scene
    labels = np.full((60, 80), IGNORE_INDEX)
    assert overlay(image, labels, names).width > image.width


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"labels": np.zeros((59, 80), np.int64)}, "must match"),
        ({"alpha": 1.5}, r"alpha must be a number in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha must be a number in \[0, 1\]"),
        ({"labels": np.full((60, 80), 7)}, "outside"),
        ({"class_names": []}, "empty"),
    ],
)
def test_overlay_bad_inputs(scene, kwargs, fragment):
    image, labels, names = scene
    arguments = {"image": image, "labels": labels, "class_names": names, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        overlay(**arguments)


def test_label_png_is_16_bit_beyond_255_classes(tmp_path):
    from zegkit.viz import label_png

    names = [f"class {index}" for index in range(300)]
    labels = np.array([[0, 299], [255, 17]])
    save_png_atomic(label_png(labels, names), tmp_path / "l.png")
    with Image.open(tmp_path / "l.png") as image:
        assert image.mode.startswith("I")
        assert np.array(image).tolist() == labels.tolist()


# --------------------------------------------------------------------------------------------
# legend fonts: names in any script
def _legend(name: str) -> np.ndarray:
    """The legend panel of a one-class overlay of a 60 x 80 image."""
    image = Image.new("RGB", (80, 60), "white")
    out = overlay(image, np.zeros((60, 80), np.int64), [name])
    return np.asarray(out)[:, 80:]


def _covered(char: str) -> bool:
    from zegkit.viz import _candidate_fonts, has_glyph

    return any(has_glyph(font, char) for font in _candidate_fonts(LEGEND_TEST_FONT_SIZE))


LEGEND_TEST_FONT_SIZE = 12


@pytest.mark.parametrize("first, second", [("猫", "犬"), ("é", "è"), ("Ж", "Щ")])
def test_legend_draws_each_script_with_real_glyphs(first, second):
    if not (_covered(first) and _covered(second)):
        pytest.skip(f"no installed font covers {first!r} (e.g. apt-get install fonts-noto-cjk)")
    one, other = _legend(first), _legend(second)
    assert (one < 128).any()  # ink
    assert not np.array_equal(one, other)  # two glyphs, not two empty boxes


def test_a_character_no_font_has_is_drawn_as_a_question_mark_with_a_warning():
    melting_face = "\U0001fae0"  # Unicode 14: in few fonts
    if _covered(melting_face):
        pytest.skip("an installed font covers U+1FAE0")
    with pytest.warns(UserWarning, match="No installed font has glyphs"):
        drawn = _legend(melting_face)
    np.testing.assert_array_equal(drawn, _legend("?"))
