"""zegkit.io: image loading rules (modes, dtypes, EXIF), bad inputs, atomic writes, listing."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from zegkit.io import (
    atomic_write,
    list_images,
    load_image,
    save_json_atomic,
    save_png_atomic,
    to_tensor,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
EXIF_ORIENTATION_TAG = 0x0112  # EXIF "Orientation"
ROTATE_90_CW = 6  # EXIF orientation value: stored image must be turned 90 degrees clockwise


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# ---------------------------------------------------------------------------------------------
# Files: EXIF and modes


def test_exif_orientation_6_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), RED)  # W x H = 40 x 20: left half red, right half blue
    stored.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = ROTATE_90_CW
    path = tmp_path / "rotated.jpg"
    stored.save(path, quality=95, exif=exif)

    image = load_image(path)

    assert image.size == (20, 40)  # turned upright: now 20 wide, 40 tall
    top, bottom = pixels(image)[5, 10], pixels(image)[35, 10]  # left half went to the top
    np.testing.assert_allclose(top, RED, atol=40)
    np.testing.assert_allclose(bottom, BLUE, atol=40)


def test_exif_orientation_applied_to_pil_input(tmp_path):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = ROTATE_90_CW
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (30, 10), RED).save(path, exif=exif)
    with Image.open(path) as opened:
        assert load_image(opened).size == (10, 30)


def test_16bit_png_scales_by_bit_depth(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 1000, 32768]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as saved:
        assert saved.mode.startswith("I;16")  # the file really is 16-bit

    image = load_image(path)

    expected = [0, 100, 255, round(1000 / 257), round(32768 / 257)]
    assert pixels(image)[0, :, 0].tolist() == expected  # scaled, not clipped to 255
    assert (pixels(image)[..., 0] == pixels(image)[..., 2]).all()  # grey stays grey


def test_mode_i_in_16bit_range_is_scaled():
    image = Image.fromarray(np.array([[0, 65535, 257 * 7]], dtype=np.int32))
    assert image.mode == "I"
    assert pixels(load_image(image))[0, :, 1].tolist() == [0, 255, 7]


def test_mode_i_outside_16bit_range_is_rejected():
    image = Image.fromarray(np.array([[0, 70000]], dtype=np.int32))
    with pytest.raises(ValueError, match="32-bit integer image"):
        load_image(image)


def test_rgba_file_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)  # transparent black
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 128)  # half-transparent black
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba).save(path)

    out = pixels(load_image(path))

    assert out[0, 0].tolist() == list(RED)
    np.testing.assert_allclose(out[0, 1], [127, 127, 127], atol=1)
    assert out[1, 1].tolist() == list(WHITE)  # not the black hidden under alpha 0


def test_la_and_premultiplied_la_are_composited_on_white():
    alpha = Image.fromarray(np.array([[0, 255]], np.uint8))  # clear, opaque
    la = Image.merge("LA", [Image.new("L", (2, 1), 0), alpha])  # black under both
    assert pixels(load_image(la))[0].tolist() == [list(WHITE), [0, 0, 0]]
    assert pixels(load_image(la.convert("La")))[0].tolist() == [list(WHITE), [0, 0, 0]]


def test_palette_image_maps_through_palette(tmp_path):
    image = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    path = tmp_path / "palette.png"
    image.save(path)
    with Image.open(path) as saved:
        assert saved.mode == "P"

    out = pixels(load_image(path))

    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [0, 255, 0]
    assert out[1, 0].tolist() == [0, 0, 255]


def test_palette_transparency_is_composited_on_white(tmp_path):
    image = Image.fromarray(np.array([[0, 1]], dtype=np.uint8))
    image.putpalette([255, 0, 0, 0, 255, 0])
    path = tmp_path / "transparent.png"
    image.save(path, transparency=1)

    out = pixels(load_image(path))

    assert out[0].tolist() == [[255, 0, 0], list(WHITE)]


def test_grayscale_file_replicates_channels(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.array([[0, 17, 255]], dtype=np.uint8)).save(path)
    out = pixels(load_image(path))
    assert out[0].tolist() == [[0, 0, 0], [17, 17, 17], [255, 255, 255]]


def test_bilevel_cmyk_and_float_modes():
    bilevel = Image.fromarray(np.array([[True, False]]))
    assert bilevel.mode == "1"
    assert pixels(load_image(bilevel))[0].tolist() == [list(WHITE), [0, 0, 0]]

    cmyk = Image.new("CMYK", (1, 1), (0, 0, 0, 0))
    assert pixels(load_image(cmyk))[0, 0].tolist() == list(WHITE)

    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert floats.mode == "F"
    assert pixels(load_image(floats))[0, :, 0].tolist() == [0, 128, 255]


def test_float_mode_outside_unit_range_is_rejected():
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        load_image(Image.fromarray(np.array([[0.0, 200.0]], dtype=np.float32)))


def test_multiframe_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), colour) for colour in (RED, BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    np.testing.assert_allclose(pixels(load_image(path))[0, 0], RED, atol=8)


def test_rgb_result_is_independent_of_file_and_input(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (3, 2), BLUE).save(path)
    image = load_image(path)
    os.remove(path)  # the returned image must not need the file any more
    assert image.size == (3, 2) and pixels(image)[1, 2].tolist() == list(BLUE)

    source = Image.new("RGB", (2, 2), RED)
    assert load_image(source) is not source


# ---------------------------------------------------------------------------------------------
# numpy arrays


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((2, 3), 40, np.uint8), [40, 40, 40]),
        (np.full((2, 3, 1), 40, np.uint8), [40, 40, 40]),
        (np.tile(np.array([1, 2, 3], np.uint8), (2, 3, 1)), [1, 2, 3]),
        (np.tile(np.array([10, 20, 30, 255], np.uint8), (2, 3, 1)), [10, 20, 30]),
        (np.tile(np.array([10, 20, 30, 0], np.uint8), (2, 3, 1)), [255, 255, 255]),
        (np.full((2, 3), 257 * 9, np.uint16), [9, 9, 9]),
        (np.full((2, 3, 3), 65535, np.uint16), [255, 255, 255]),
        (np.ones((2, 3), bool), [255, 255, 255]),
        (np.full((2, 3, 3), 0.2, np.float32), [51, 51, 51]),
        (np.full((2, 3), 1.0, np.float64), [255, 255, 255]),
    ],
    ids=["hw", "hw1", "hw3", "hw4-opaque", "hw4-clear", "u16", "u16-rgb", "bool", "f32", "f64"],
)
def test_arrays(array, expected):
    image = load_image(array)
    assert image.mode == "RGB" and image.size == (3, 2)
    assert (pixels(image) == expected).all()


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.zeros((3, 8, 8), np.uint8), "channels-first"),
        (np.zeros((8, 8, 2), np.uint8), "accepted shapes are"),
        (np.zeros((1, 8, 8, 3), np.uint8), "accepted shapes are"),
        (np.zeros(8, np.uint8), "accepted shapes are"),
        (np.zeros((0, 8), np.uint8), "no pixels"),
        (np.full((2, 2), 1.5, np.float32), r"must lie in \[0, 1\]"),
        (np.full((2, 2), -0.1, np.float64), r"must lie in \[0, 1\]"),
        (np.full((2, 2), np.nan, np.float32), "NaN"),
        (np.zeros((2, 2), np.int64), "accepted dtypes are"),
        (np.zeros((2, 2), np.int8), "astype"),
    ],
)
def test_bad_arrays(array, fragment):
    with pytest.raises(ValueError, match=fragment):
        load_image(array)


# ---------------------------------------------------------------------------------------------
# Bad inputs


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(str(path))


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, I am text")
    with pytest.raises(ValueError, match="not a readable image") as info:
        load_image(path)
    assert "notes.png" in str(info.value) and "PNG, JPEG" in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    with pytest.raises(ValueError, match="empty"):
        load_image(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file(tmp_path, suffix):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = tmp_path / f"full{suffix}"
    Image.fromarray(noise).save(full)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_image(cut)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        load_image(tmp_path)


def test_unsupported_type():
    with pytest.raises(TypeError, match="expects a path"):
        load_image(42)
    with pytest.raises(TypeError, match="permute"):
        load_image(torch.zeros(3, 4, 4))


# ---------------------------------------------------------------------------------------------
# to_tensor


def test_to_tensor_layout_and_range():
    array = np.zeros((2, 3, 3), np.uint8)
    array[1, 2] = (255, 51, 0)
    tensor = to_tensor(load_image(array))
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert tensor.is_contiguous()
    assert tensor[:, 1, 2].tolist() == pytest.approx([1.0, 0.2, 0.0])
    assert float(tensor.min()) == 0.0 and float(tensor.max()) == 1.0


def test_to_tensor_rejects_non_rgb():
    with pytest.raises(ValueError, match="load_image"):
        to_tensor(Image.new("L", (2, 2)))
    with pytest.raises(TypeError, match="PIL"):
        to_tensor(np.zeros((2, 2, 3), np.uint8))


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_write_creates_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_write(target) as handle:
        handle.write(b"\x00\x01")
        assert not target.exists()  # invisible until the block succeeds
    assert target.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target, "w") as handle:
            handle.write("new, half written")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_atomic_write_failure_creates_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(tmp_path / "new.bin") as handle:
            handle.write(b"partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_atomic_write_failed_replace_removes_temp(tmp_path):
    (tmp_path / "taken").mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(OSError):
        with atomic_write(tmp_path / "taken") as handle:
            handle.write(b"data")
    assert os.listdir(tmp_path) == ["taken"] and os.listdir(tmp_path / "taken") == []


def test_atomic_write_text_is_utf8_and_keeps_permissions(tmp_path):
    target = tmp_path / "names.txt"
    target.write_text("x")
    os.chmod(target, 0o640)
    with atomic_write(target, "w") as handle:
        handle.write("café ☕")
    assert target.read_bytes() == "café ☕".encode()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_atomic_write_bad_mode_and_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        with atomic_write(tmp_path / "x", "a"):
            pass
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with atomic_write(tmp_path / "missing" / "x"):
            pass


def test_save_png_atomic_keeps_palette(tmp_path):
    image = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8))
    image.putpalette([10, 20, 30, 40, 50, 60])
    path = tmp_path / "labels.png"
    save_png_atomic(image, path)
    with Image.open(path) as back:
        assert back.mode == "P"
        assert np.array(back).tolist() == [[0, 1], [1, 0]]
        assert back.getpalette()[:6] == [10, 20, 30, 40, 50, 60]
    with pytest.raises(TypeError, match="PIL"):
        save_png_atomic(np.zeros((2, 2)), path)


def test_save_json_atomic(tmp_path):
    path = tmp_path / "result.json"
    save_json_atomic({"miou": 0.5, "classes": ["cat", "café"]}, path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"miou": 0.5, "classes": ["cat", "café"]}
    assert path.read_text(encoding="utf-8").endswith("\n")

    with pytest.raises(ValueError, match="NaN"):
        save_json_atomic({"miou": float("nan")}, path)
    with pytest.raises(TypeError, match="tolist"):
        save_json_atomic({"labels": np.zeros(2)}, path)
    assert json.loads(path.read_text(encoding="utf-8"))["miou"] == 0.5  # untouched
    assert os.listdir(tmp_path) == ["result.json"]


# ---------------------------------------------------------------------------------------------
# list_images


def test_list_images_sorted_and_filtered(tmp_path):
    for name in ["b.JPG", "a.png", "c.webp", "d.tiff", "notes.txt", "._a.png", "e.bmp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.jpeg").write_bytes(b"x")

    assert [p.name for p in list_images(tmp_path)] == [
        "a.png",
        "b.JPG",
        "c.webp",
        "d.tiff",
        "e.bmp",
    ]
    assert list_images(tmp_path, recursive=True)[-1] == tmp_path / "sub" / "f.jpeg"


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list_images(tmp_path / "missing")
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(FileNotFoundError, match="No image files found"):
        list_images(tmp_path)
    with pytest.raises(NotADirectoryError, match="not a folder"):
        list_images(tmp_path / "readme.md")


def _unit_files(tmp_path):
    """Three existing outputs and their bytes, to check a failed unit write leaves them."""
    paths = [tmp_path / name for name in ("a_labels.png", "a_overlay.png", "a.json")]
    for index, path in enumerate(paths):
        path.write_bytes(f"old {index}".encode())
    return paths, {path: path.read_bytes() for path in paths}


def test_write_files_atomic_replaces_all(tmp_path):
    from zegkit.io import write_files_atomic

    paths, _ = _unit_files(tmp_path)
    write_files_atomic({path: b"new" for path in paths})
    assert all(path.read_bytes() == b"new" for path in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def _fail_on_call(number, real, error):
    """`real`, except that its `number`-th call raises `error` (a fault injected mid-write)."""
    calls = 0

    def wrapper(*args):
        nonlocal calls
        calls += 1
        if calls == number:
            raise error
        return real(*args)

    return wrapper


@pytest.mark.parametrize("where, name, number, error", [
    ("zegkit.io", "_write_synced", 3, OSError(28, "No space left on device")),  # staging file 3
    ("os", "replace", 4, KeyboardInterrupt()),  # after the first target is placed
])
def test_write_files_atomic_failure_changes_nothing(tmp_path, monkeypatch, where, name, number,
                                                     error):
    import importlib

    from zegkit.io import write_files_atomic

    paths, before = _unit_files(tmp_path)
    module = importlib.import_module(where)
    monkeypatch.setattr(module, name, _fail_on_call(number, getattr(module, name), error))
    with pytest.raises(type(error)):
        write_files_atomic({path: b"new" for path in paths})
    assert {path: path.read_bytes() for path in paths} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_write_files_atomic_refuses_duplicate_target(tmp_path):
    from zegkit.io import write_files_atomic

    with pytest.raises(ValueError, match="same target twice"):
        write_files_atomic({tmp_path / "x": b"1", str(tmp_path / "x"): b"2"})


def test_check_image_file_reads_header_and_refuses_bad_files(tmp_path):
    from zegkit.io import check_image_file

    good = tmp_path / "good.png"
    Image.new("RGB", (5, 3)).save(good)
    assert check_image_file(good) == (3, 5)
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable image"):
        check_image_file(tmp_path / "text.png")
    with pytest.raises(ValueError, match="empty file"):
        check_image_file(tmp_path / "empty.png")
    with pytest.raises(FileNotFoundError):
        check_image_file(tmp_path / "missing.png")


def test_decompression_bomb_is_value_error(tmp_path, monkeypatch):
    from zegkit.io import check_image_file

    path = tmp_path / "big.png"
    Image.new("L", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64*64 > 2x the limit: a bomb
    with pytest.raises(ValueError, match="decompression-bomb"):
        check_image_file(path)
    with pytest.raises(ValueError, match="decompression-bomb"):
        load_image(path)


@pytest.mark.parametrize("suffix", [".bmp", ".webp"])
def test_damaged_header(tmp_path, suffix):
    """Pillow raises a bare OSError opening these (found by tests/test_properties.py)."""
    full = tmp_path / f"full{suffix}"
    Image.new("1", (1, 1)).save(full)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        load_image(cut)
    assert str(cut) in str(info.value)
