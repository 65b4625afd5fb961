"""Sliding-window stitching, resizing and the class decision of the inference protocol."""

import pytest
import torch

from zegkit.inference import (
    InferenceConfig,
    decide_labels,
    resized_size,
    sliding_scores,
    whole_scores,
    window_starts,
)
from zegkit.scores import Activation, DenseScores, class_probabilities


class _Vocabulary:
    """The part of TextEmbeddings the synonym reduction reads: 4 rows (bg, bg, dog, cat)."""

    class_index = torch.tensor([0, 0, 1, 2])
    classifier = torch.zeros(4, 2)
    num_classes = 3
    synonym_reduce = "max"


def test_window_starts_cover_and_snap_to_the_edge():
    assert window_starts(448, 224, 112) == [0, 112, 224]
    assert window_starts(597, 224, 112) == [0, 112, 224, 336, 373]
    assert window_starts(100, 224, 112) == [0]
    for length in range(224, 700, 37):
        starts = window_starts(length, 224, 112)
        covered = torch.zeros(length)
        for s in starts:
            covered[s : s + 224] = 1
        assert covered.all() and starts[-1] + 224 == length


def test_resized_size_short_side_and_cap():
    assert resized_size(300, 400, 448) == (448, 597)
    assert resized_size(100, 4000, 448) == (51, 2048)  # long side capped as mmseg does
    assert resized_size(300, 400, None) == (300, 400)


def _pixelwise(crops):
    """A 'method' whose logits depend only on each pixel: stitching must reproduce it exactly."""
    return torch.cat([crops.mean(1, keepdim=True), -crops.mean(1, keepdim=True)], 1)


def test_sliding_equals_pixelwise_everywhere():
    pixels = torch.randn(2, 3, 250, 333)
    config = InferenceConfig(crop=64, stride=40, crop_batch=5)
    stitched = sliding_scores(_pixelwise, pixels, config)
    assert stitched.shape == (2, 2, 250, 333)
    assert torch.allclose(stitched, _pixelwise(pixels), atol=1e-5)


def test_image_smaller_than_crop_is_padded_then_cut():
    pixels = torch.randn(1, 3, 50, 70)
    stitched = sliding_scores(_pixelwise, pixels, InferenceConfig(crop=64, stride=32))
    assert stitched.shape == (1, 2, 50, 70)
    assert torch.allclose(stitched, _pixelwise(pixels), atol=1e-5)


def test_whole_mode_pads_to_patch_multiple():
    pixels = torch.randn(1, 3, 50, 70)
    seen = []

    def method(x):
        seen.append(x.shape[-2:])
        return _pixelwise(x)

    out = whole_scores(method, pixels, patch_size=16)
    assert seen == [(64, 80)] and out.shape == (1, 2, 50, 70)


def test_synonym_max_and_background_threshold():
    logits = torch.tensor([0.30, 0.25, 0.10, 0.28]).view(1, 4, 1, 1)  # rows: bg, bg, dog, cat
    scores = DenseScores(logits, Activation("softmax", 10.0), rows="synonyms")
    probs = class_probabilities(scores, _Vocabulary())
    joint = (10 * logits.flatten()).softmax(0)
    assert torch.allclose(probs.flatten(), torch.stack([joint[:2].max(), joint[2], joint[3]]))
    assert decide_labels(probs, None).item() == 0
    probs = torch.tensor([0.2, 0.5, 0.3]).view(1, 3, 1, 1)
    assert decide_labels(probs, 0.4, 0).item() == 1
    assert decide_labels(probs, 0.6, 0).item() == 0


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"mode": "tiles"}, "mode must be one of"),
        ({"precision": "fp16"}, "precision must be one of"),
        ({"stride": 300}, "larger than crop"),
        ({"background_threshold": 2.0}, "probability in"),
        ({"crop": 0}, "positive integer"),
    ],
)
def test_bad_config(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        InferenceConfig(**kwargs)


def test_activations_and_declared_rows():
    values = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    sigmoid = DenseScores(values, Activation("sigmoid", 2.0), rows="classes").probabilities()
    assert torch.allclose(sigmoid.flatten(), (2 * values.flatten()).sigmoid())
    identity = DenseScores(values.abs(), Activation("identity"), rows="classes")
    assert torch.equal(identity.probabilities(), values.abs())
    with pytest.raises(ValueError, match="declared per class have 3 rows"):
        class_probabilities(DenseScores(values, Activation(), rows="classes"), _FourClasses())
    with pytest.raises(ValueError, match="takes no scale"):
        Activation("identity", 3.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        Activation("tanh")


class _FourClasses(_Vocabulary):
    num_classes = 4


def test_background_threshold_uses_the_background_class_not_the_first():
    from zegkit.inference import background_class

    classes = [["cat"], ["Background", "bg"], ["dog"]]
    assert background_class(classes) == 1
    probabilities = torch.tensor([[0.4, 0.3, 0.3], [0.1, 0.1, 0.8]]).T.reshape(1, 3, 1, 2)
    labels = decide_labels(probabilities, 0.5, background_class(classes))
    assert labels.tolist() == [[[1, 2]]]
    with pytest.raises(ValueError, match="background"):
        background_class([["cat"], ["dog"]])


@pytest.mark.parametrize(
    ("images", "error", "fragment"),
    [
        (torch.rand(1, 3, 4, 4) * 255, ValueError, r"\[0, 1\]"),
        (torch.full((1, 3, 2, 2), float("nan")), ValueError, "NaN"),
        (torch.zeros(1, 3, 0, 4), ValueError, "no pixels"),
        (torch.zeros(1, 3, 2, 2, dtype=torch.int32), ValueError, "dtype"),
        (torch.zeros(3, 2, 2), ValueError, "shape"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_unit_images_refuses_misread_inputs(images, error, fragment):
    from zegkit.inference import unit_images

    with pytest.raises(error, match=fragment):
        unit_images(images)


def test_unit_images_scales_uint8():
    from zegkit.inference import unit_images

    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.equal(unit_images(images), torch.ones(1, 3, 2, 2))
