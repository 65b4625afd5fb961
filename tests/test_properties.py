"""Property sweep over the public entry points (issue 16): every generated case ends in a correct
result or a clear error (ValueError / TypeError / FileNotFoundError with a message), never in
another exception, a wrong-shaped or non-finite result, or a partial or damaged output.

Cases per run are each test's `max_examples` (hypothesis stops earlier only when a strategy has
fewer distinct cases). Tiny random-weight backbones keep the whole file well under a minute.
"""

import hashlib
import io as stdio
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_clip
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from zegkit.backbone import ClipBackbone
from zegkit.cli import parse_class_list, positive_finite
from zegkit.inference import InferenceConfig
from zegkit.io import load_image
from zegkit.methods import create_method
from zegkit.segmenter import Segmentation, Segmenter
from zegkit.text import parse_classes, read_class_file

CLEAR_ERRORS = (ValueError, TypeError, FileNotFoundError)
SWEEP = settings(deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])
CLASSES = ["cat", "dog", "background"]


def _clear(error: BaseException) -> bool:
    """A clear error: one of the user-error types, with a message of some length (counted in
    hypothesis' statistics: `pytest --hypothesis-show-statistics`)."""
    event(f"refused: {type(error).__name__}")
    return isinstance(error, CLEAR_ERRORS) and len(str(error)) > 15


@pytest.fixture(scope="module")
def segmenters(tiny_tokenizer):
    """A whole-image and a sliding-window segmenter on one tiny random CLIP (patch 16)."""
    backbone = ClipBackbone(make_tiny_clip(16), tiny_tokenizer, "tiny")
    made = []
    for config in (InferenceConfig(short_side=None, mode="whole"),
                   InferenceConfig(short_side=None, crop=32, stride=16)):
        segmenter = Segmenter(backbone, create_method("maskclip"), config, templates="single")
        segmenter.set_vocabulary(CLASSES)
        made.append(segmenter)
    return made


# ---- Segmenter.probabilities / predict -------------------------------------------------------
SIDES = st.one_of(st.integers(1, 40), st.sampled_from([1, 2, 15, 16, 17, 160]))
VALID_DTYPES = ["unit_float", "uint8", "float64"]
INVALID_DTYPES = ["0..255_float", "nan", "int64", "bool", "negative"]


def _batch(dtype: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    unit = torch.rand(shape, generator=generator)
    if dtype == "uint8":
        return (unit * 255).to(torch.uint8)
    if dtype == "float64":
        return unit.double()
    if dtype == "0..255_float":
        return unit * 255 + 1  # max > 1 for sure
    if dtype == "nan":
        return unit.masked_fill(unit < 0.3, float("nan"))
    if dtype == "int64":
        return (unit * 255).long()
    if dtype == "bool":
        return unit > 0.5
    if dtype == "negative":
        return unit - 2
    return unit


@settings(SWEEP, max_examples=60)
@given(batch=st.integers(1, 2), height=SIDES, width=SIDES, dtype=st.sampled_from(VALID_DTYPES),
       which=st.integers(0, 1), seed=st.integers(0, 2**16))
def test_probabilities_and_predict_of_valid_batches(segmenters, batch, height, width, dtype, which,
                                                    seed):
    segmenter = segmenters[which]
    probabilities = segmenter.probabilities(_batch(dtype, (batch, 3, height, width), seed))
    event(f"accepted: {'whole' if which == 0 else 'slide'}")
    assert probabilities.shape == (batch, len(CLASSES), height, width)
    assert torch.isfinite(probabilities).all()
    assert torch.allclose(probabilities.sum(1), torch.ones(()), atol=1e-4)
    labels = segmenter.decide(probabilities)
    assert labels.shape == (batch, height, width)
    assert int(labels.min()) >= 0 and int(labels.max()) < len(CLASSES)


@settings(SWEEP, max_examples=40)
@given(batch=st.integers(0, 2), channels=st.sampled_from([3, 1, 4]), height=SIDES, width=SIDES,
       dtype=st.sampled_from(VALID_DTYPES + INVALID_DTYPES), seed=st.integers(0, 2**16))
def test_probabilities_of_invalid_batches_are_refused(segmenters, batch, channels, height, width,
                                                      dtype, seed):
    if batch > 0 and channels == 3 and dtype in VALID_DTYPES:
        channels = 2  # make the case invalid
    images = _batch(dtype, (batch, channels, height, width), seed)
    for call in (segmenters[0].probabilities, segmenters[0].predict):
        with pytest.raises(ValueError) as caught:
            call(images)
        assert _clear(caught.value)


def test_non_tensor_inputs_get_a_clear_error(segmenters):
    for value in (None, np.zeros((1, 3, 8, 8), np.float32), [[0.5]], "photo.png"):
        with pytest.raises(TypeError, match="torch.Tensor"):
            segmenters[0].probabilities(value)


# ---- io.load_image: files ----------------------------------------------------------------------
MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I", "I;16", "F", "CMYK", "YCbCr", "PA"]
FORMATS = {"PNG": ".png", "TIFF": ".tif", "JPEG": ".jpg", "BMP": ".bmp", "WEBP": ".webp",
           "GIF": ".gif"}


def _encoded(mode: str, size: tuple[int, int], fmt: str, seed: int) -> bytes | None:
    """An image of `mode` and `size` (W, H) encoded as `fmt`, or None where Pillow cannot."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = stdio.BytesIO()
    try:
        if mode == "F":
            image = Image.fromarray(rng.random((size[1], size[0])).astype(np.float32), "F")
        elif mode != "RGB":
            image = image.convert(mode)
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return buffer.getvalue()


@settings(SWEEP, max_examples=120)
@given(mode=st.sampled_from(MODES), fmt=st.sampled_from(sorted(FORMATS)),
       width=st.sampled_from([1, 2, 7, 33, 300]), height=st.sampled_from([1, 3, 40, 257]),
       damage=st.sampled_from(["none", "none", "truncate", "flip_bytes", "empty", "garbage"]),
       cut=st.floats(0.0, 0.99), seed=st.integers(0, 2**16))
def test_load_image_files(tmp_path_factory, mode, fmt, width, height, damage, cut, seed):
    data = _encoded(mode, (width, height), fmt, seed)
    if data is None:  # Pillow cannot write this mode in this format: nothing to load
        event("not encodable")
        return
    if damage == "truncate":
        data = data[: int(len(data) * cut)]
    elif damage == "flip_bytes":
        position = int(len(data) * cut)
        data = data[:position] + bytes(b ^ 0xFF for b in data[position:position + 8]) + \
            data[position + 8:]
    elif damage == "empty":
        data = b""
    elif damage == "garbage":
        data = np.random.default_rng(seed).bytes(64)
    path = tmp_path_factory.mktemp("img") / f"x{FORMATS[fmt]}"
    path.write_bytes(data)
    try:
        image = load_image(path)
    except Exception as error:  # noqa: BLE001
        assert _clear(error), repr(error)
        assert not (damage == "none" and _pillow_decodes(data)), \
            f"an intact {mode} {fmt} {width}x{height} was refused: {error}"
        return
    event("accepted")
    assert image.mode == "RGB" and min(image.size) >= 1
    if damage == "none":
        assert image.size == (width, height)  # a damaged file may decode to another size


def _pillow_decodes(data: bytes) -> bool:
    """Whether Pillow itself decodes `data` (it writes some files it cannot read back, e.g. a
    1x1 YCbCr TIFF): zegkit must load every file Pillow decodes."""
    try:
        with Image.open(stdio.BytesIO(data)) as image:
            image.load()
    except (OSError, ValueError, SyntaxError, EOFError):
        return False
    return True


# ---- io.load_image: arrays ---------------------------------------------------------------------
ARRAY_DTYPES = st.sampled_from([np.uint8, np.uint16, np.bool_, np.float32, np.float64, np.int32,
                                np.int64, np.complex64])


@settings(SWEEP, max_examples=120)
@given(shape=st.one_of(st.lists(st.integers(0, 6), max_size=4).map(tuple),
                      st.tuples(st.integers(1, 9), st.integers(1, 300)),
                      st.tuples(st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 3, 4]))),
       dtype=ARRAY_DTYPES, scale=st.sampled_from([1.0, 1.0, 255.0, -1.0, float("nan"),
                                                  float("inf")]),
       seed=st.integers(0, 2**16))
def test_load_image_arrays(shape, dtype, scale, seed):
    values = np.random.default_rng(seed).random(shape) * scale
    with np.errstate(invalid="ignore"):
        array = values.astype(dtype)
    try:
        image = load_image(array)
    except Exception as error:  # noqa: BLE001
        assert _clear(error), repr(error)
        return
    event("accepted")
    assert image.mode == "RGB" and image.size == (array.shape[1], array.shape[0])
    assert array.ndim in (2, 3) and array.shape[0] > 0 and array.shape[1] > 0


# ---- class lists -------------------------------------------------------------------------------
NAME_TEXT = st.text(alphabet=st.sampled_from(list("ab é猫🐱 ,;\t\n#-_")) | st.characters(),
                    max_size=40)


@settings(SWEEP, max_examples=300)
@given(text=NAME_TEXT)
def test_class_list_parsing(text):
    classes = parse_class_list(text)
    try:
        parsed = parse_classes(classes)
    except Exception as error:  # noqa: BLE001
        assert _clear(error), repr(error)
        return
    event("accepted")
    names = [name for synonyms in parsed for name in synonyms]
    assert len(parsed) == len(classes) and all(name.strip() for name in names)
    assert len({name.casefold() for name in names}) == len(names)


@settings(SWEEP, max_examples=150)
@given(data=st.binary(max_size=200)
       | NAME_TEXT.map(lambda text: text.encode("utf-8", "surrogatepass")))
def test_class_files(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("classes") / "classes.txt"
    path.write_bytes(data)
    try:
        classes = read_class_file(path)
    except Exception as error:  # noqa: BLE001
        assert _clear(error), repr(error)
        assert str(path) in str(error) or "classes.txt" in str(error), str(error)
        return
    event("accepted")
    assert classes and all(entry.strip() for entry in classes)


# ---- numeric options ---------------------------------------------------------------------------
NUMBERS = st.one_of(st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 0.0, -0.0, True, "3", None]))


@settings(SWEEP, max_examples=300)
@given(field=st.sampled_from(["short_side", "crop", "stride", "crop_batch",
                              "background_threshold"]), value=NUMBERS)
def test_inference_settings(field, value):
    from zegkit.config import check_setting_types

    try:
        settings = {} if value is None else {field: value}  # None: unset, as load_segmenter
        check_setting_types(InferenceConfig, settings, "The inference")
        config = InferenceConfig(**settings)
    except Exception as error:  # noqa: BLE001
        assert _clear(error), repr(error)
        return
    event("accepted")
    got = getattr(config, field)
    if field == "background_threshold":
        assert got is None or 0.0 <= got <= 1.0
    elif got is not None:
        assert isinstance(got, int) and got >= 1


@settings(SWEEP, max_examples=200)
@given(value=NUMBERS, method=st.sampled_from(["naive", "sclip", "naclip", "clearclip"]))
def test_logit_scale(value, method):
    try:
        created = create_method(method, logit_scale=value)
    except Exception as error:  # noqa: BLE001
        assert _clear(error), repr(error)
        return
    event("accepted")
    scale = created.config.logit_scale
    assert math.isfinite(scale) and scale > 0 and not isinstance(scale, (bool, str))


@settings(SWEEP, max_examples=100)
@given(text=st.one_of(st.floats(allow_nan=True).map(repr), st.text(max_size=8)))
def test_positive_finite_flag(text):
    import argparse

    try:
        value = positive_finite(text)
    except argparse.ArgumentTypeError as error:
        assert "positive finite number" in str(error)
        event("refused")
        return
    event("accepted")
    assert math.isfinite(value) and value > 0


# ---- Segmentation.save: a failing writer never leaves a partial or damaged unit ---------------
def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


FAULTS = st.sampled_from([OSError(28, "No space left on device"),
                          PermissionError(13, "Permission denied"), KeyboardInterrupt()])


@settings(SWEEP, max_examples=60)
@given(fail_at=st.integers(1, 9), where=st.sampled_from(["_write_synced", "replace"]),
       fault=FAULTS, classes=st.integers(1, 300))
def test_save_is_all_or_nothing(tmp_path_factory, monkeypatch, fail_at, where, fault, classes):
    import zegkit.io as zio

    folder = tmp_path_factory.mktemp("save")
    image = Image.new("RGB", (6, 4), "red")
    names = [f"c{i}" for i in range(classes)]
    labels = np.arange(24).reshape(4, 6) % classes
    Segmentation(labels, names, np.full(classes, 1 / classes)).save(folder, "x", image)
    before = _digests(folder)
    real = {"_write_synced": zio._write_synced, "replace": os.replace}[where]
    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) == fail_at:
            raise fault
        return real(*args)

    with monkeypatch.context() as patch:
        if where == "replace":
            patch.setattr(zio.os, "replace", failing)
        else:
            patch.setattr(zio, "_write_synced", failing)
        newer = Segmentation(labels[::-1].copy(), names, np.full(classes, 1 / classes))
        try:
            newer.save(folder, "x", image)
        except (OSError, KeyboardInterrupt):
            assert _digests(folder) == before  # the earlier unit, byte for byte
            event("failed: earlier unit intact")
            return
    event("written: new unit complete")
    assert sorted(_digests(folder)) == ["x.json", "x_labels.png", "x_overlay.png"]  # no temp
    assert (np.array(Image.open(folder / "x_labels.png")) == labels[::-1]).all()  # the new unit
