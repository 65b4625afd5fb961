"""Nothing lost, nothing half-written: failing saves leave earlier results intact (issue 16)."""

import hashlib

import numpy as np
import pytest
import torch
from conftest import make_tiny_clip
from PIL import Image

from zegkit.backbone import ClipBackbone
from zegkit.inference import InferenceConfig
from zegkit.methods import create_method
from zegkit.segmenter import Segmentation, Segmenter


def _digests(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir()}


def _result(scores):
    return Segmentation(np.zeros((4, 6), np.int64), ["cat", "dog"], np.asarray(scores))


@pytest.fixture
def earlier(tmp_path):
    """A folder holding an image and an earlier good result for it."""
    image = tmp_path / "x.png"
    Image.new("RGB", (6, 4), "red").save(image)
    out = tmp_path / "out"
    _result([0.5, 0.5]).save(out, "x", image)
    return image, out


def test_non_finite_scores_leave_earlier_result_intact(earlier):
    image, out = earlier
    before = _digests(out)
    with pytest.raises(ValueError, match="not finite"):
        _result([float("nan"), 0.5]).save(out, "x", image)
    assert _digests(out) == before


def test_failed_write_leaves_earlier_result_intact(earlier, monkeypatch):
    import zegkit.io as zio

    image, out = earlier
    before = _digests(out)
    real = zio._write_synced
    calls = []

    def full_disk(path, data):
        calls.append(path)
        if len(calls) == 3:  # the JSON, after both PNGs were staged
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(zio, "_write_synced", full_disk)
    with pytest.raises(OSError):
        _result([0.2, 0.8]).save(out, "x", image)
    assert _digests(out) == before


def test_save_refuses_to_overwrite_its_input(tmp_path):
    image = tmp_path / "x_labels.png"
    Image.new("RGB", (6, 4), "red").save(image)
    before = _digests(tmp_path)
    with pytest.raises(ValueError, match="overwrite its input"):
        _result([0.5, 0.5]).save(tmp_path, "x", image)
    assert _digests(tmp_path) == before


def test_crop_smaller_than_patch_is_refused(tiny_tokenizer):
    backbone = ClipBackbone(make_tiny_clip(16), tiny_tokenizer, "tiny")
    with pytest.raises(ValueError, match="patch size"):
        Segmenter(backbone, create_method("maskclip"), InferenceConfig(crop=8, stride=4))


def test_uint8_and_0_255_images_are_not_misread(tiny_tokenizer):
    backbone = ClipBackbone(make_tiny_clip(16), tiny_tokenizer, "tiny")
    segmenter = Segmenter(backbone, create_method("maskclip"),
                          InferenceConfig(short_side=None, mode="whole"), templates="single")
    segmenter.set_vocabulary(["cat", "dog"])
    pixels = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    expected = segmenter.probabilities(pixels.float() / 255)
    assert torch.allclose(segmenter.probabilities(pixels), expected)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        segmenter.probabilities(pixels.float())
