"""Sliding-window stitching, resizing and the class decision of the inference protocol."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip

from zegkit import inference
from zegkit.backbone import ClipBackbone
from zegkit.inference import (
    InferenceConfig,
    decide_labels,
    decide_stitched,
    pad_to,
    resize,
    resize_matrices,
    resized_size,
    sliding_crops,
    sliding_scores,
    whole_scores,
    window_starts,
)
from zegkit.methods import create_method
from zegkit.scores import Activation, DenseScores, class_probabilities, row_classes
from zegkit.segmenter import Segmenter


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
    stitched = sliding_scores(_pixelwise, pixels, config).values()
    assert stitched.shape == (2, 2, 250, 333)
    assert torch.allclose(stitched, _pixelwise(pixels), atol=1e-5)


def test_image_smaller_than_crop_is_padded_then_cut():
    pixels = torch.randn(1, 3, 50, 70)
    stitched = sliding_scores(_pixelwise, pixels, InferenceConfig(crop=64, stride=32)).values()
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
    expected = resize(_pixelwise(F.pad(pixels, (0, 10, 0, 14))), (64, 80))[..., :50, :70]
    torch.testing.assert_close(out.values(), expected, atol=1e-5, rtol=0)


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


# ---- stitching at the crops' resolution, deciding a few classes at a time ---------------------
def _reference_sliding(crop_scores, pixels, config):
    """The protocol as written (SCLIP / mmseg slide inference, zegkit before issue 17): every
    crop's scores resized to the crop and added into a full-resolution canvas, then averaged."""
    batch, _, height, width = pixels.shape
    padded = pad_to(pixels, config.crop)
    crops, boxes = sliding_crops(padded, config)
    scores = resize(crop_scores(crops).float(), (config.crop, config.crop))
    total = torch.zeros(batch, scores.shape[1], *padded.shape[-2:])
    count = torch.zeros(1, 1, *padded.shape[-2:])
    for offset, crop in enumerate(scores):
        image, box = divmod(offset, len(boxes))
        y, x = boxes[box]
        total[image, :, y : y + config.crop, x : x + config.crop] += crop
        count[..., y : y + config.crop, x : x + config.crop] += 1 / batch
    return (total / count)[..., :height, :width]


def _patch_scores(rows: int, patch: int = 16):
    """A 'method' with scores at patch resolution (one per 16-px cell), like CLIP methods."""
    torch.manual_seed(3)
    mix = torch.randn(rows, 3)

    def scores(crops):
        cells = F.avg_pool2d(crops, patch)  # (B, 3, h, w)
        return torch.einsum("rc,bchw->brhw", mix, cells).tanh()

    return scores


@pytest.mark.parametrize(("size", "new_size"), [((14, 14), (224, 224)), ((40, 60), (23, 90)),
                                                ((50, 70), (17, 31)), ((9, 9), (9, 9))])
def test_resize_matrices_are_resize(size, new_size):
    x = torch.randn(2, 3, *size)
    my, mx = resize_matrices(size, new_size)
    torch.testing.assert_close(my @ x @ mx.T, resize(x, new_size), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("shape", "crop", "stride"), [((2, 3, 250, 333), 64, 40),
                                                       ((1, 3, 448, 597), 224, 112),
                                                       ((1, 3, 50, 70), 64, 32)])
def test_stitched_scores_equal_the_full_resolution_canvas(shape, crop, stride):
    pixels = torch.rand(shape)
    config = InferenceConfig(crop=crop, stride=stride, crop_batch=7)
    method = _patch_scores(5)
    stitched = sliding_scores(method, pixels, config)
    expected = _reference_sliding(method, pixels, config)
    torch.testing.assert_close(stitched.values(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(stitched.values(slice(1, 3)), expected[:, 1:3], atol=1e-5, rtol=0)
    blocks = list(stitched.blocks())
    assert [lines.start for lines, *_ in blocks[1:]] == [lines.stop for lines, *_ in blocks[:-1]]
    assert len(blocks) > 1 and blocks[-1][0].stop == shape[2]
    assert all(torch.equal(rows, torch.arange(5)) for *_, rows in blocks)
    by_lines = torch.cat([block for _, block, _ in blocks], dim=1).permute(0, 3, 1, 2)
    torch.testing.assert_close(by_lines, expected, atol=1e-5, rtol=0)
    resized = stitched.resized((shape[2] * 3 // 2, shape[3] // 2))
    torch.testing.assert_close(resized.values(), resize(expected, resized.shape[-2:]),
                               atol=1e-5, rtol=0)


class _Synonyms(_Vocabulary):
    """7 rows of 4 classes with 1, 3, 2 and 1 synonyms: their depth order is not class order."""

    class_index = torch.tensor([0, 1, 1, 1, 2, 2, 3])
    classifier = torch.zeros(7, 2)
    num_classes = 4


def test_synonym_order_puts_each_depth_of_rows_together():
    order, widths = inference._synonym_order(torch.tensor([0, 1, 1, 1, 2, 2, 3]))
    assert order.tolist() == [1, 4, 0, 6, 2, 5, 3] and widths == [4, 2, 1]
    block = torch.randn(5, 7)
    top = inference._class_max(block[:, order], widths)  # classes in the order 1, 2, 0, 3
    expected = torch.stack([block[:, 1:4].amax(1), block[:, 4:6].amax(1), block[:, 0],
                            block[:, 6]], 1)
    assert torch.equal(top, expected)


@pytest.mark.parametrize("activation", [Activation("softmax", 10.0), Activation("sigmoid", 3.0)])
def test_chunked_decision_equals_the_full_one(monkeypatch, activation):
    """Synonym rows, a threshold and means: a line a block == all lines at once == the
    probabilities at full resolution."""
    text = _Synonyms()
    grid = torch.randn(2, 7, 6, 8)
    stitched = inference.StitchedScores(grid, *resize_matrices((6, 8), (30, 20)))
    probabilities = class_probabilities(DenseScores(stitched.values(), activation), text)
    rows = row_classes("synonyms", 7, text)
    best = probabilities.amax(1).flatten().sort().values
    threshold = float(best[len(best) // 2 - 1 : len(best) // 2 + 1].mean())  # bites at half
    whole = decide_stitched(stitched, activation, rows, threshold, 0, means=True)
    monkeypatch.setattr(inference, "DECISION_CHUNK_BYTES", 1)
    chunked = inference.StitchedScores(stitched.grid, stitched.along_y, stitched.along_x)
    assert len(chunked._stripes) == len(chunked._bands) > 1  # a band a stripe, a line a block
    assert all(lines.stop - lines.start == 1 for lines, *_ in chunked.blocks())
    chunked = decide_stitched(chunked, activation, rows, threshold, 0, means=True)
    expected = decide_labels(probabilities, threshold, 0)
    assert (expected == 0).any() and (expected != 0).any()
    for decision in (whole, chunked):
        assert torch.equal(decision.labels, expected)
        torch.testing.assert_close(decision.mean_probabilities, probabilities.mean((2, 3)),
                                   atol=1e-6, rtol=0)


def _colour_scores(prototypes):
    """A method scoring each patch by closeness of its mean colour to each prototype colour
    (R x 3): on a picture of flat regions, a few rows lead by far everywhere."""

    def scores(crops):
        cells = F.avg_pool2d(crops, 16)  # (B, 3, h, w)
        return -10 * (cells[:, None] - prototypes[None, :, :, None, None]).square().sum(2)

    return scores


@pytest.mark.parametrize("size", [None, (130, 190)])
@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_rows_that_are_nowhere_best_are_not_expanded(monkeypatch, size, chunk_bytes):
    """Per run of lines only the rows that can be best there are expanded; the labels stay
    those of the argmax over every row at every pixel (also resized, also a line a block)."""
    corners = torch.tensor([[(i >> b) & 1 for b in range(3)] for i in range(8)], dtype=torch.float)
    prototypes = torch.cat([corners, torch.tensor([[0.5, 0.5, 0.5], [0.5, 0, 0], [0, 0.5, 0],
                                                   [0, 0, 0.5]])])  # 12 distinct colours
    pixels = torch.zeros(2, 3, 96, 160)
    pixels[:, :, :50, :70] = prototypes[2, :, None, None]  # four flat regions, then noise
    pixels[:, :, :50, 70:] = prototypes[7, :, None, None]
    pixels[:, :, 50:, :] = prototypes[[4, 9], :, None, None]
    pixels += 0.02 * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(1))
    config = InferenceConfig(crop=64, stride=40, crop_batch=5)
    stitched = sliding_scores(_colour_scores(prototypes), pixels, config)
    if size is not None:
        stitched = stitched.resized(size)
    if chunk_bytes is not None:
        monkeypatch.setattr(inference, "DECISION_CHUNK_BYTES", chunk_bytes)
    values = stitched.values()
    best = values.argmax(1)  # (B, H, W)
    contending = stitched.contenders()  # (runs of lines, R)
    assert contending.float().mean() < 0.5  # most rows are skipped
    for (lines, _), rows in zip(stitched._bands, contending, strict=True):
        assert rows[best[:, lines]].all()  # every pixel's best row contends in its band
    decision = decide_stitched(stitched, Activation("softmax", 10.0), torch.arange(12))
    assert torch.equal(decision.labels, best)


@pytest.fixture(scope="module")
def tiny_backbone(tiny_tokenizer):
    return ClipBackbone(make_tiny_clip(16), tiny_tokenizer, "tiny")


CLASSES = ["background; wall", "person; people; man", "dog", "cat", "grass", "sky", "tree; brick",
           "road", "car"]


@pytest.mark.parametrize(("method", "settings", "size"), [
    ("maskclip", {"short_side": None, "crop": 64, "stride": 40}, (97, 131)),
    ("sclip", {"short_side": 80, "crop": 48, "stride": 32, "background_threshold": 0.12},
     (120, 90)),
    ("cliper", {"short_side": 64, "crop": 48, "stride": 24}, (61, 200)),
    ("naive", {"short_side": 72, "mode": "whole"}, (50, 77)),
])
def test_segmenter_labels_equal_the_full_resolution_protocol(tiny_backbone, method, settings,
                                                             size):
    """Labels as the protocol computed them before issue 17 (every class at every pixel, one
    softmax), probabilities within 1e-5, on random images of a few sizes."""
    extra = {"compensation": False} if method == "cliper" else {}
    config = InferenceConfig(**settings, precision="fp32")  # as the oracle runs the method
    segmenter = Segmenter(tiny_backbone, create_method(method, **extra), config,
                          templates="single")
    text = segmenter.set_vocabulary(CLASSES)
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(size[0]))

    def crop_scores(crops):
        return segmenter.method(tiny_backbone, crops, text)

    height, width = size
    pixels = segmenter.method.normalize(
        tiny_backbone, resize(images, resized_size(height, width, config.short_side)))
    with torch.no_grad():
        if config.mode == "whole":
            padded = F.pad(pixels, (0, -pixels.shape[-1] % 16, 0, -pixels.shape[-2] % 16))
            stitched = resize(crop_scores(padded).float(), padded.shape[-2:])
            stitched = stitched[..., : pixels.shape[-2], : pixels.shape[-1]]
        else:
            stitched = _reference_sliding(crop_scores, pixels, config)
    values = resize(stitched, size)
    expected = class_probabilities(
        DenseScores(values, segmenter.method.activation(), segmenter.method.rows), text)
    torch.testing.assert_close(segmenter.probabilities(images), expected, atol=1e-5, rtol=0)
    labels = decide_labels(expected, config.background_threshold, segmenter._background)
    assert torch.equal(segmenter.predict(images), labels)
    decision = segmenter.decision(images, means=True)
    assert torch.equal(decision.labels, labels)
    torch.testing.assert_close(decision.mean_probabilities, expected.mean((2, 3)), atol=1e-5,
                               rtol=0)
