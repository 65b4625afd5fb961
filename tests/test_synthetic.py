"""The synthetic proving ground: determinism, exact masks, captions, on-disk layout."""

import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from zegkit.data import synthetic
from zegkit.data.base import IGNORE_INDEX
from zegkit.data.synthetic import (
    CLASS_ID,
    CLASSES,
    SEEN,
    STUFF,
    THINGS,
    UNSEEN,
    Thing,
    compose_scene,
    generate_scene,
    shape_mask,
    write_dataset,
)

SIZE = 64  # small scenes keep the tests fast
# sha256 of image, mask and captions of generate_scene([2024, 54], 448, version=1), recorded
# when version 2 was added (it was the shipped example then)
V1_SCENE_SHA256 = "d4602d949e8671f5136017e9e2eb9c68dd78b78c72900d8bd5d2f7b9752c2b06"


def _mentions(caption: str, name: str) -> bool:
    return re.search(rf"\b{name}(e?s)?\b", caption.lower()) is not None


def test_vocabulary_and_split():
    assert len(CLASSES) >= 16 and len(set(CLASSES)) == len(CLASSES)
    assert set(SEEN) | set(UNSEEN) == set(CLASSES) and not set(SEEN) & set(UNSEEN)
    assert len(SEEN) == 3 * len(UNSEEN)
    assert set(UNSEEN) & set(STUFF) and set(UNSEEN) & set(THINGS)
    assert len(CLASSES) < IGNORE_INDEX


def test_same_seed_same_scene_and_different_seeds_differ():
    a, b = generate_scene(3, SIZE), generate_scene(3, SIZE)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.captions == b.captions and a.present_classes == b.present_classes
    c = generate_scene(np.random.default_rng(3), SIZE)  # an int seed == default_rng(int)
    np.testing.assert_array_equal(a.image, c.image)
    assert not np.array_equal(a.image, generate_scene(4, SIZE).image)
    swapped = generate_scene([1, 0], SIZE).image
    assert not np.array_equal(generate_scene([0, 1], SIZE).image, swapped)


def test_scene_types_and_shapes():
    scene = generate_scene(0, (48, 80))
    assert scene.image.shape == (48, 80, 3) and scene.image.dtype == np.uint8
    assert scene.mask.shape == (48, 80) and scene.mask.dtype == np.uint8
    assert 2 <= len(scene.captions) <= 3


@pytest.mark.parametrize("shape", THINGS)
def test_mask_is_the_drawn_shape(shape):
    background = np.full((SIZE, SIZE), CLASS_ID["sand"], np.uint8)
    thing = Thing(shape, "red", center=(30.3, 33.7), radius=17.0, angle=0.4)
    scene = compose_scene(0, background, [thing], version=1)
    drawn = shape_mask(shape, thing.center, thing.radius, thing.angle, SIZE)
    expected = np.where(drawn, CLASS_ID[shape], CLASS_ID["sand"])
    np.testing.assert_array_equal(scene.mask, expected)
    assert scene.present_classes == ["sand", shape]
    # version 1: the red paint is exactly where the mask says
    red = scene.image[..., 0].astype(int) - scene.image[..., 2].astype(int)
    assert red[drawn].mean() > red[~drawn].mean() + 60


@pytest.mark.parametrize("shape", THINGS)
def test_version_2_paints_the_class_material(shape):
    background = np.full((SIZE, SIZE), CLASS_ID["snow"], np.uint8)
    thing = Thing(shape, "ignored", center=(31.0, 32.0), radius=22.0, angle=0.3)
    scene = compose_scene(0, background, [thing], version=2)
    drawn = shape_mask(shape, thing.center, thing.radius, thing.angle, SIZE)
    np.testing.assert_array_equal(scene.mask == CLASS_ID[shape], drawn)
    # every drawn pixel is nearest (in RGB) to one of the material's two colours, and both occur
    palette = synthetic.MATERIALS[shape][0]
    names = list(synthetic.COLOURS)
    rgb = np.array([synthetic.COLOURS[n] for n in names], float)
    pixels = scene.image[drawn].astype(float)
    nearest = np.argmin(((pixels[:, None] - rgb[None]) ** 2).sum(-1), 1)
    counts = {n: int((nearest == names.index(n)).sum()) for n in palette}
    assert sum(counts.values()) >= 0.9 * drawn.sum(), (shape, counts)
    assert min(counts.values()) >= 0.08 * drawn.sum(), (shape, counts)


def test_materials_share_a_palette_by_at_most_two_classes():
    assert set(synthetic.MATERIALS) == set(THINGS)
    palettes: dict = {}
    for palette, pattern in synthetic.MATERIALS.values():
        assert set(palette) <= set(synthetic.COLOURS) and len(set(palette)) == 2
        palettes.setdefault(tuple(sorted(palette)), []).append(pattern)
    assert all(len(patterns) <= 2 for patterns in palettes.values())
    patterns = [pattern for _, pattern in synthetic.MATERIALS.values()]
    assert len(set(patterns)) == len(patterns)  # classes sharing a palette differ in pattern
    # every pattern is two-toned over the thing: neither tone is rare
    u, v = np.meshgrid(np.linspace(-1, 1, 101), np.linspace(-1, 1, 101))
    inside = np.hypot(u, v) <= 1
    for pattern in patterns:
        tone = synthetic._pattern(pattern, u, v, synthetic.PATTERN_PERIOD, 0.3)[inside]
        assert 0.15 < tone.mean() < 0.85, pattern


@pytest.mark.parametrize("version", [1, 2])
def test_scene_mask_is_the_rendered_scenes_mask(version):
    for seed in range(30):
        for size, zoom in ((224, 1.0), ((96, 160), 2.0)):
            expected = generate_scene([seed, 7], size, zoom, version=version).mask
            got = synthetic.scene_mask([seed, 7], size, zoom, version=version)
            assert got.dtype == expected.dtype and np.array_equal(got, expected), (seed, size)


def test_version_1_stays_reproducible():
    """Golden hash of a version-1 scene (the README's example before version 2)."""
    scene = generate_scene([2024, 54], 448, version=1)
    digest = hashlib.sha256(scene.image.tobytes() + scene.mask.tobytes()
                            + "|".join(scene.captions).encode()).hexdigest()
    assert digest == V1_SCENE_SHA256


def test_later_things_occlude_earlier_ones():
    background = np.full((SIZE, SIZE), CLASS_ID["snow"], np.uint8)
    below = Thing("square", "blue", (30, 30), 20, 0.0)
    above = Thing("disk", "red", (40, 40), 12, 0.0)
    scene = compose_scene(1, background, [below, above])
    disk = shape_mask("disk", above.center, above.radius, 0.0, SIZE)
    square = shape_mask("square", below.center, below.radius, 0.0, SIZE)
    assert (scene.mask[disk] == CLASS_ID["disk"]).all()
    assert (scene.mask[square & ~disk] == CLASS_ID["square"]).all()
    assert (scene.mask[~square & ~disk] == CLASS_ID["snow"]).all()


def test_shape_areas_are_geometric():
    radius = 20.0
    disk = shape_mask("disk", (50, 50), radius, 0.0, 100).sum()
    assert abs(disk - np.pi * radius**2) < 0.02 * np.pi * radius**2
    square = shape_mask("square", (50, 50), radius, 0.0, 100).sum()
    assert abs(square - (1.6 * radius) ** 2) < 0.05 * (1.6 * radius) ** 2
    half_out = shape_mask("disk", (0, 50), radius, 0.0, 100).sum()  # clipped by the frame
    assert abs(half_out - disk / 2) < 0.05 * disk


@pytest.mark.parametrize("version", synthetic.VERSIONS)
def test_masks_present_classes_and_captions_agree(version):
    for seed in range(25):
        scene = generate_scene([11, seed], SIZE, version=version)
        in_mask = {CLASSES[i] for i in np.unique(scene.mask)}
        assert in_mask == set(scene.present_classes)
        assert scene.present_classes == sorted(scene.present_classes, key=CLASSES.index)
        assert set(scene.present_classes) & set(STUFF)
        for caption in scene.captions:
            shapes_only = not any(_mentions(caption, name) for name in STUFF)
            assert not shapes_only or (version >= 2 and in_mask & set(THINGS)), caption
            for name in scene.present_classes:
                assert _mentions(caption, name) or (shapes_only and name in STUFF), (caption, name)
            for name in set(CLASSES) - in_mask:
                assert not _mentions(caption, name), (caption, name)


def test_version_2_captions_make_the_shape_words_necessary():
    colour_words = "|".join(synthetic.COLOURS)
    thing_words = "|".join(THINGS)
    coloured = re.compile(rf"\b({colour_words}) ({thing_words})(e?s)?\b")
    captions = {1: [], 2: []}
    for version in synthetic.VERSIONS:
        for seed in range(150):
            scene = generate_scene([12, seed], 48, version=version)
            if set(scene.present_classes) & set(THINGS):
                captions[version] += scene.captions

    def shapes_only(caption):
        return not any(_mentions(caption, name) for name in STUFF)

    def share(version, test):
        return np.mean([bool(test(c)) for c in captions[version]])

    assert share(1, shapes_only) == 0 and 0.35 < share(2, shapes_only) < 0.65
    assert share(1, coloured.search) > 0.5 and share(2, coloured.search) < 0.15


def test_write_dataset_layout(tmp_path):
    root = write_dataset(tmp_path / "synth", num=3, seed=5, size=48)
    assert (root / "classes.txt").read_text().splitlines() == list(CLASSES)
    assert json.loads((root / "split.json").read_text()) == {"seen": list(SEEN),
                                                              "unseen": list(UNSEEN)}
    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == ["000000", "000001", "000002"]
    assert json.loads((root / "meta.json").read_text())["num"] == 3
    for row in rows:
        image = Image.open(root / "images" / f"{row['id']}.png")
        mask = Image.open(root / "masks" / f"{row['id']}.png")
        assert image.mode == "RGB" and image.size == (48, 48) and mask.mode == "L"
        scene = generate_scene(np.random.default_rng([5, int(row["id"])]), 48)
        np.testing.assert_array_equal(np.asarray(mask), scene.mask)
        np.testing.assert_array_equal(np.asarray(image), scene.image)
        assert row["captions"] == scene.captions and row["classes"] == scene.present_classes
    leftovers = [p.name for p in root.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_cli_writes_dataset(tmp_path, capsys):
    assert synthetic.main(["--out", str(tmp_path / "d"), "--num", "2", "--size", "40"]) == 0
    assert len(list((tmp_path / "d" / "images").glob("*.png"))) == 2
    assert "wrote 2 scenes" in capsys.readouterr().out


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: generate_scene(0, 16), "at least 32"),
        (lambda: generate_scene("seed"), "numpy Generator"),
        (lambda: generate_scene(0, 64, zoom=10), "zoom"),
        (lambda: generate_scene(0, 64, version=7), "Unknown generator version"),
        (lambda: shape_mask("blob", (5, 5), 3, 0, 64), "Unknown shape"),
        (lambda: write_dataset("/tmp/never", num=0), "num must be"),
        (lambda: compose_scene(0, np.full((40, 40), CLASS_ID["star"], np.uint8), []),
         "stuff class ids"),
    ],
)
def test_bad_input_fails_clearly(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


def test_shipped_example_is_regenerated_exactly():
    """Golden output: the README's example scene; a failure means the generator's output changed
    (bump GENERATOR_VERSION, regenerate the examples and retrain the shipped tiny CLIP)."""
    from importlib.resources import files

    examples = files("zegkit") / "assets" / "examples"
    meta = json.loads((examples / "scene.json").read_text())
    assert meta["generator_version"] == synthetic.GENERATOR_VERSION
    scene = generate_scene([2024, 54], 448)
    np.testing.assert_array_equal(np.asarray(Image.open(examples / "scene_mask.png")), scene.mask)
    np.testing.assert_array_equal(np.asarray(Image.open(examples / "scene.png")), scene.image)
    assert meta["classes"] == scene.present_classes
    assert (examples / "classes.txt").read_text().splitlines() == list(CLASSES)
