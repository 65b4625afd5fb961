"""ClsCLIP+'s zoom-in: the union merge, proposals from boxes files and from a label map, and the
zoomed probabilities against a direct computation with the segmenter's own passes."""

import json

import pytest
import torch
from conftest import make_tiny_clip

from zegkit.backbone import ClipBackbone
from zegkit.inference import resize
from zegkit.segmenter import load_segmenter
from zegkit.zoom import (
    Proposal,
    merge_regions,
    read_proposals,
    self_proposals,
    zoom_probabilities,
    zoom_segment,
)

CLASSES = ["background", "dog", "cat"]


def _naive_segmenter(tokenizer, short_side: int):
    backbone = ClipBackbone(make_tiny_clip(16), tokenizer, "tiny")
    segmenter = load_segmenter("naive", backbone=backbone, mode="whole", short_side=short_side)
    segmenter.set_vocabulary(CLASSES, templates="single")
    return segmenter


@pytest.fixture(scope="module")
def segmenter(tiny_tokenizer):
    return _naive_segmenter(tiny_tokenizer, 64)


def test_merge_is_a_union_over_boxes():
    probabilities = torch.rand(3, 6, 8)
    a = (Proposal((0, 0, 4, 3), label=1), torch.full((3, 4), 0.9))
    b = (Proposal((2.5, 1, 6, 4), label=1), torch.full((3, 4), 0.05))
    out = merge_regions(probabilities, [a, b])
    expected = probabilities[1].clone()
    expected[0:3, 0:4] = torch.maximum(expected[0:3, 0:4], torch.tensor(0.9))
    expected[1:4, 2:6] = torch.maximum(expected[1:4, 2:6], torch.tensor(0.05))  # 2.5 widens
    torch.testing.assert_close(out[1], expected)
    torch.testing.assert_close(out[[0, 2]], probabilities[[0, 2]])  # no boxes: unchanged
    torch.testing.assert_close(merge_regions(probabilities, []), probabilities)
    with pytest.raises(ValueError, match="do not fit"):
        merge_regions(probabilities, [(Proposal((0, 0, 4, 4), label=0), torch.zeros(3, 3))])
    with pytest.raises(ValueError, match="outside"):
        merge_regions(probabilities, [(Proposal((9, 9, 12, 12), label=0), torch.zeros(1, 1))])


def test_boxes_files_coco_and_per_image_list(tmp_path):
    coco = {"images": [{"id": 7, "file_name": "a/img1.jpg"}, {"id": 8, "file_name": "img2.jpg"}],
            "annotations": [{"image_id": 7, "bbox": [1, 2, 3, 4], "category_id": 18,
                             "score": 0.8},
                            {"image_id": 7, "bbox": [0, 0, 5, 5], "category_id": 1},
                            {"image_id": 8, "bbox": [2, 2, 2, 2], "category_id": 17}],
            "categories": [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"},
                           {"id": 18, "name": "dog"}]}
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(coco))
    assert read_proposals(path, "img1.png", CLASSES) == [Proposal((1, 2, 4, 6), 1, 0.8)]
    assert read_proposals(path, "img2", CLASSES) == [Proposal((2, 2, 4, 4), 2, 1.0)]
    with pytest.raises(ValueError, match="no image named 'img3'"):
        read_proposals(path, "img3.jpg", CLASSES)
    listed = tmp_path / "one.json"
    listed.write_text(json.dumps([{"bbox": [0, 1, 2, 3], "category": "cat"}]))
    assert read_proposals(listed, "anything", CLASSES) == [Proposal((0, 1, 2, 4), 2, 1.0)]
    with pytest.raises(FileNotFoundError, match="'self'"):
        read_proposals(tmp_path / "missing.json", "x", CLASSES)


def test_self_proposals_box_each_component_with_padding():
    labels = torch.zeros(20, 20, dtype=torch.long)
    labels[2:6, 2:6] = 1  # 16 px
    labels[10:12, 14:18] = 1  # 8 px: below min_area
    labels[12:20, 0:8] = 2
    proposals = self_proposals(labels, CLASSES, pad=0.25, min_area=10)
    assert proposals == [Proposal((1.0, 1.0, 7.0, 7.0), 1), Proposal((0, 10.0, 10.0, 20), 2)]


def test_zoom_matches_a_direct_computation(segmenter):
    images = torch.rand(1, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    plain = segmenter.probabilities(images)[0]
    torch.testing.assert_close(zoom_probabilities(segmenter, images, [])[0], plain)
    box = Proposal((10, 5, 42, 29), label=2)  # 32 x 24 px, zoomed to short side 64
    got = zoom_probabilities(segmenter, images, [box])[0]
    zoomed = segmenter.probabilities(resize(images[:, :, 5:29, 10:42], (64, 85)))
    region = resize(zoomed[:, 2:3], (24, 32))[0, 0]
    expected = plain.clone()
    expected[2, 5:29, 10:42] = torch.maximum(plain[2, 5:29, 10:42], region)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="not a class index"):
        zoom_probabilities(segmenter, images, [Proposal((0, 0, 4, 4), label=3)])


def test_zoom_of_a_white_crop_stays_a_valid_image(tiny_tokenizer):
    """Shrinking a 224 x 215 crop of ones to 117 x 112 rounds to 1 + 2.4e-7 (measured), which
    the segmenter's [0, 1] check refused in the middle of an episode run."""
    out = zoom_probabilities(_naive_segmenter(tiny_tokenizer, 112), torch.ones(1, 3, 224, 224),
                             [Proposal((9, 0, 224, 224), label=1)])
    assert out.shape == (1, 3, 224, 224) and torch.isfinite(out).all()


def test_zoom_segment_with_self_proposals_records_them(segmenter, tmp_path):
    image = (torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(1)) * 255).byte()
    result = zoom_segment(segmenter, image.numpy(), "self")
    plain = segmenter.segment(image.numpy())
    assert result.labels.shape == (40, 56) and result.settings["proposals"] == "self"
    # the union only adds probability: a class's mean score never falls
    assert (result.scores >= plain.scores - 1e-6).all()


def test_cli_segment_with_self_proposals(tiny_clip_dir, tmp_path):
    from PIL import Image

    from zegkit.cli import main
    from zegkit.inference import InferenceConfig

    path = tmp_path / "photo.png"
    Image.fromarray((torch.rand(48, 64, 3) * 255).byte().numpy()).save(path)
    assert main(["segment", str(path), "--classes", "background, dog, cat", "--method", "naive",
                 "--model", str(tiny_clip_dir), "--proposals", "self", "--out",
                 str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "photo.json").read_text())
    assert record["settings"]["proposals"] == "self"
    assert record["settings"]["inference"]["proposals"] == "self"
    with pytest.raises(FileNotFoundError, match="neither 'self' nor a boxes file"):
        InferenceConfig(proposals=str(tmp_path / "boxes.json"))
