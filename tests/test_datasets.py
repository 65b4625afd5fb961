"""Dataset readers on tiny fixtures in each on-disk layout; COCO-Object conversion; protocols."""

import json
from dataclasses import fields

import numpy as np
import pytest
import torch
from PIL import Image

from zegkit.data.base import class_index, display_name, shipped_class_names
from zegkit.data.coco_object import (
    COCO_THING_IDS,
    convert_coco_object,
    labels_from_coco_stuff,
    segmentation_to_mask,
)
from zegkit.data.datasets import DATASETS, list_datasets, load_dataset
from zegkit.data.protocols import DEFAULT_PROTOCOLS, PROTOCOLS, get_protocol
from zegkit.inference import InferenceConfig

H, W = 6, 8


def _image(path, seed=0, size=(H, W)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def _mask(path, values, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(values, dtype=np.uint8))
    if palette:  # VOC ships palette PNGs; the indices are the labels
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    image.save(path)


def _labels(*values):
    """An (H, W) mask whose rows cycle through `values`."""
    return np.array([[values[(r + c) % len(values)] for c in range(W)] for r in range(H)])


# ---- layouts ----------------------------------------------------------------------------------
@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for i, name in enumerate(["2007_000032", "2007_000039"]):
        _image(root / "JPEGImages" / f"{name}.jpg", seed=i)
        _mask(root / "SegmentationClass" / f"{name}.png", _labels(0, 1, 20, 255), palette=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n2007_000039\n")
    return root


def test_voc21_reads_images_masks_and_names(voc_root):
    dataset = load_dataset("voc21", voc_root)
    assert len(dataset) == 2 and dataset.num_classes == 21 and dataset.ignore_index == 255
    image, mask, name = dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, H, W)
    assert mask.dtype == torch.int64 and mask.shape == (H, W)
    assert name == "2007_000032"
    assert sorted(mask.unique().tolist()) == [0, 1, 20, 255]
    assert display_name(dataset.class_names[0]) == "background"
    assert display_name(dataset.class_names[20]) == "tv monitor"
    assert dataset.seen is None and dataset.split == "val"


def test_voc20_ignores_background_and_shifts_classes(voc_root):
    voc21, voc20 = load_dataset("voc21", voc_root), load_dataset("voc20", voc_root)
    raw, shifted = voc21[1][1], voc20[1][1]
    assert voc20.num_classes == 20
    assert torch.equal(shifted[raw == 0], torch.full_like(shifted[raw == 0], 255))
    assert torch.equal(shifted[raw == 1], torch.zeros_like(shifted[raw == 1]))
    assert (shifted[raw == 20] == 19).all() and (shifted[raw == 255] == 255).all()
    assert torch.equal(voc21[1][0], voc20[1][0])


def test_pascal_context_60_and_59(tmp_path):
    root = tmp_path / "VOC2010"
    _image(root / "JPEGImages" / "2008_000002.jpg")
    _mask(root / "SegmentationClassContext" / "2008_000002.png", _labels(0, 1, 59))
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    mask60 = load_dataset("context60", root)[0][1]
    mask59 = load_dataset("context59", root)[0][1]
    assert load_dataset("context60", root).num_classes == 60
    assert sorted(mask60.unique().tolist()) == [0, 1, 59]
    assert sorted(mask59.unique().tolist()) == [0, 58, 255]
    assert (mask59[mask60 == 0] == 255).all()


def test_coco_stuff_pairs_by_id(tmp_path):
    root = tmp_path / "coco_stuff164k"
    for i, name in enumerate(["000000000139", "000000000285"]):
        _image(root / "images" / "val2017" / f"{name}.jpg", seed=i)
        _mask(root / "annotations" / "val2017" / f"{name}_labelTrainIds.png", _labels(0, 170, 255))
    # the raw COCO-Stuff PNGs next to the train-id ones must not be picked up as masks
    _mask(root / "annotations" / "val2017" / "000000000139.png", _labels(181))
    dataset = load_dataset("coco_stuff", root)
    assert dataset.name == "coco_stuff171" and dataset.num_classes == 171
    assert dataset.names == ["000000000139", "000000000285"]
    assert sorted(dataset[1][1].unique().tolist()) == [0, 170, 255]


def test_coco20i_reads_the_few_shot_layout(tmp_path):
    root = tmp_path / "COCO2014"
    for split, folder in (("val", "val2014"), ("train", "train2014")):
        name = f"COCO_{folder}_000000000042"
        _image(root / folder / f"{name}.jpg")
        _mask(root / "annotations" / folder / f"{name}.png", _labels(0, 1, 80, 255))
        dataset = load_dataset("coco20i", root, split)
        assert dataset.names == [name] and dataset.num_classes == 81
        assert display_name(dataset.class_names[1]) == "person"
        assert sorted(dataset[0][1].unique().tolist()) == [0, 1, 80, 255]
    with pytest.raises(FileNotFoundError, match="val2014"):
        load_dataset("coco20i", tmp_path / "nothing")


def test_cityscapes_reads_city_subfolders(tmp_path):
    root = tmp_path / "cityscapes"
    stem = "frankfurt_000000_000294"
    _image(root / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png")
    _mask(root / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelTrainIds.png",
          _labels(0, 18, 255))
    _mask(root / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png", _labels(33))
    dataset = load_dataset("cityscapes", root)
    image, mask, name = dataset[0]
    assert name == stem and dataset.num_classes == 19
    assert sorted(mask.unique().tolist()) == [0, 18, 255]


def test_cityscapes_without_train_ids_says_how_to_make_them(tmp_path):
    root = tmp_path / "cityscapes"
    _image(root / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png")
    _mask(root / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png",
          _labels(7))
    with pytest.raises(FileNotFoundError, match="createTrainIdLabelImgs"):
        load_dataset("cityscapes19", root)


def test_ade20k_reduces_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _image(root / "images" / "validation" / "ADE_val_00000001.jpg")
    _mask(root / "annotations" / "validation" / "ADE_val_00000001.png", _labels(0, 1, 150))
    dataset = load_dataset("ade20k", root)
    assert dataset.name == "ade150" and dataset.num_classes == 150
    assert sorted(dataset[0][1].unique().tolist()) == [0, 149, 255]


def test_folder_with_and_without_masks(tmp_path):
    _image(tmp_path / "images" / "a.png")
    _image(tmp_path / "images" / "b.jpg", seed=1)
    (tmp_path / "classes.txt").write_text("sky\nperson, people\n")
    unlabelled = load_dataset("folder", tmp_path)
    assert not unlabelled.has_masks and unlabelled.names == ["a", "b"]
    assert unlabelled.class_names == ["sky", "person; people"]
    assert (unlabelled[0][1] == 255).all()
    _mask(tmp_path / "masks" / "a.png", _labels(0, 1))
    _mask(tmp_path / "masks" / "b.png", _labels(1, 255))
    labelled = load_dataset("folder", tmp_path)
    assert labelled.has_masks and sorted(labelled[1][1].unique().tolist()) == [1, 255]


def test_folder_needs_class_names(tmp_path):
    _image(tmp_path / "photo.png")
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        load_dataset("folder", tmp_path)


def test_synthetic_layout_with_named_split(tmp_path):
    for i in range(2):
        _image(tmp_path / "images" / f"{i:06d}.png", seed=i)
        _mask(tmp_path / "masks" / f"{i:06d}.png", _labels(0, 1, 2, 3))
    (tmp_path / "classes.txt").write_text("sky\nwater\nstar\nheart\n")
    (tmp_path / "split.json").write_text(json.dumps({"seen": ["sky", "star"],
                                                     "unseen": ["water", "heart"]}))
    dataset = load_dataset("synthetic", tmp_path)
    assert dataset.seen == [0, 2] and dataset.unseen == [1, 3]
    assert dataset.names == ["000000", "000001"]


def test_synthetic_generator_output_loads(tmp_path):
    synthetic = pytest.importorskip("zegkit.data.synthetic")
    root = synthetic.write_dataset(tmp_path / "synth", 2, seed=0, size=32)
    dataset = load_dataset("synthetic", root)
    image, mask, _ = dataset[1]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
    assert len(dataset.unseen) == len(synthetic.UNSEEN)
    assert [display_name(dataset.class_names[i]) for i in dataset.unseen] == list(
        synthetic.UNSEEN)


# ---- errors -----------------------------------------------------------------------------------
def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="voc21") as error:
        load_dataset("pascal", ".")
    assert "ade150" in str(error.value)
    assert set(list_datasets()) == set(DATASETS)


def test_wrong_root_says_what_was_expected_and_found(tmp_path):
    (tmp_path / "Annotations").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("voc21", tmp_path)
    message = str(error.value)
    assert "SegmentationClass" in message and "ImageSets/Segmentation" in message
    assert "Annotations/" in message  # what was found


def test_root_one_level_too_high_points_at_the_right_folder(voc_root):
    with pytest.raises(FileNotFoundError, match="VOC2012: pass that folder"):
        load_dataset("voc21", voc_root.parent)


def test_missing_split_and_missing_masks(voc_root):
    with pytest.raises(FileNotFoundError, match="trainaug.txt"):
        load_dataset("voc21", voc_root, split="trainaug")
    (voc_root / "SegmentationClass" / "2007_000039.png").unlink()
    with pytest.raises(FileNotFoundError, match="2007_000039"):
        load_dataset("voc21", voc_root)


def test_empty_split_file_is_an_error(voc_root):
    (voc_root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(ValueError, match="lists no images"):
        load_dataset("voc21", voc_root)


def test_out_of_range_mask_values_name_file_and_values(voc_root):
    bad = voc_root / "SegmentationClass" / "2007_000039.png"
    _mask(bad, _labels(0, 21, 40))
    dataset = load_dataset("voc21", voc_root)  # checked lazily, per image
    dataset[0]
    with pytest.raises(ValueError, match="2007_000039.png") as error:
        dataset[1]
    assert "21, 40" in str(error.value)


def test_mask_size_and_mode_are_checked(voc_root):
    _mask(voc_root / "SegmentationClass" / "2007_000032.png", np.zeros((H + 1, W)))
    Image.new("RGB", (W, H)).save(voc_root / "SegmentationClass" / "2007_000039.png")
    dataset = load_dataset("voc21", voc_root)
    with pytest.raises(ValueError, match="must have their image's size"):
        dataset[0]
    with pytest.raises(ValueError, match="single-channel"):
        dataset[1]


# ---- COCO-Object ------------------------------------------------------------------------------
def test_uncompressed_rle_is_column_major():
    # 2 x 3 mask, column-major runs: 1 zero, 2 ones, 3 zeros -> pixels (1,0) and (0,1) set
    expected = np.array([[0, 1, 0], [1, 0, 0]], dtype=bool)
    rle = {"counts": [1, 2, 3], "size": [2, 3]}
    assert np.array_equal(segmentation_to_mask(rle, 2, 3), expected)
    with pytest.raises(ValueError, match="add up"):
        segmentation_to_mask({"counts": [1, 2], "size": [2, 3]}, 2, 3)
    with pytest.raises(ValueError, match="differs from the image size"):
        segmentation_to_mask(rle, 3, 2)


def test_compressed_rle_from_the_coco_api_decodes_back():
    from pycocotools import mask as coco_mask

    mask = np.random.default_rng(0).random((7, 5)) > 0.5
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    as_json = {"counts": encoded["counts"].decode(), "size": encoded["size"]}  # JSON holds str
    assert np.array_equal(segmentation_to_mask(as_json, 7, 5), mask)


def test_polygon_fill_and_bad_formats():
    mask = segmentation_to_mask([[1, 1, 4, 1, 4, 3, 1, 3]], 5, 6)
    assert mask[1:3, 1:4].all() and mask.sum() == 6  # COCO's rasterisation: [1, 4) x [1, 3)
    assert not segmentation_to_mask([[1, 1, 2, 2]], 5, 6).any()  # < 3 points: nothing
    with pytest.raises(ValueError, match="Unknown COCO segmentation format"):
        segmentation_to_mask("polygon", 5, 6)


def test_convert_coco_object_and_read_it(tmp_path):
    person, giraffe = COCO_THING_IDS.index(1) + 1, COCO_THING_IDS.index(25) + 1
    instances = {
        "images": [{"id": 7, "file_name": "000000000007.jpg", "height": H, "width": W},
                   {"id": 8, "file_name": "000000000008.jpg", "height": H, "width": W}],
        "annotations": [
            # a big giraffe polygon, and a small crowd of people (RLE) painted on top of it
            {"id": 1, "image_id": 7, "category_id": 25, "iscrowd": 0, "area": 30.0,
             "segmentation": [[0, 0, 7, 0, 7, 5, 0, 5]]},
            {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 1, "area": 2.0,
             "segmentation": {"counts": [H * 2, 2, H * W - H * 2 - 2], "size": [H, W]}},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 25, "name": "giraffe"}],
    }
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(instances))
    root = tmp_path / "coco"
    assert convert_coco_object(path, root) == 2
    assert convert_coco_object(path, root) == 0  # existing maps are kept
    for image_id in (7, 8):
        _image(root / "images" / "val2017" / f"00000000000{image_id}.jpg")
    dataset = load_dataset("coco_object", root)
    assert dataset.num_classes == 81 and display_name(dataset.class_names[giraffe]) == "giraffe"
    first, second = dataset[0][1], dataset[1][1]
    assert first[0, 2] == person and first[1, 2] == person  # column 2, rows 0-1
    assert first[3, 4] == giraffe
    assert (second == 0).all()  # no annotations: all background
    assert len(COCO_THING_IDS) == 80


def test_labels_from_coco_stuff():
    train_ids = np.array([[0, 79, 80], [170, 255, 5]])
    assert labels_from_coco_stuff(train_ids).tolist() == [[1, 80, 0], [0, 255, 6]]


# ---- class names and protocols ------------------------------------------------------------------
@pytest.mark.parametrize("name, count", [
    ("voc21", 21), ("voc20", 20), ("context60", 60), ("context59", 59), ("coco_stuff171", 171),
    ("coco_object", 81), ("cityscapes19", 19), ("ade150", 150),
])
def test_shipped_class_files(name, count):
    names = shipped_class_names(name)
    assert len(names) == count
    if name in ("voc21", "context60", "coco_object"):
        assert display_name(names[0]) == "background"


def test_class_index_matches_official_spellings():
    coco = shipped_class_names("coco_stuff171")
    assert class_index("wall-concrete", coco) == 160
    assert class_index("playingfield", coco) == 133
    assert class_index("pottedplant", shipped_class_names("voc20")) == 15
    with pytest.raises(ValueError, match="not in this vocabulary"):
        class_index("unicorn", coco)


def test_protocol_splits_match_the_papers_indices():
    def unseen(name):
        protocol = PROTOCOLS[name]
        return protocol.split_indices(shipped_class_names(protocol.dataset))

    seen, voc = unseen("zegclip-voc-15-5")
    assert voc == [15, 16, 17, 18, 19] and seen == list(range(15))
    assert sorted(unseen("zegclip-coco-156-15")[1]) == [
        19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160]
    assert sorted(unseen("cascadeclip-context-49-10")[1]) == [0, 2, 3, 7, 9, 13, 17, 19, 31, 37]
    # ZS3Net's ten names, in the alphabetical Context-59 order
    assert sorted(unseen("zs3-context-49-10")[1]) == [0, 6, 7, 14, 19, 24, 31, 33, 48, 54]


def test_protocols_fit_datasets_and_inference_config():
    config_fields = {field.name for field in fields(InferenceConfig)}
    for protocol in PROTOCOLS.values():
        assert protocol.dataset in DATASETS
        assert set(protocol.inference_overrides()) <= config_fields
        InferenceConfig(**protocol.inference_overrides())
        json.dumps(protocol.to_dict())
    for dataset, name in DEFAULT_PROTOCOLS.items():
        assert PROTOCOLS[name].dataset == dataset
    voc21 = get_protocol("sclip-voc21")
    assert (voc21.short_side, voc21.crop, voc21.stride) == (336, 224, 112)
    assert voc21.background_threshold == 0.1
    assert voc21.settings_for("sclip") == {"logit_scale": 65.0}
    assert voc21.settings_for("clearclip") == {}  # ClearCLIP keeps its own temperature
    assert get_protocol("sclip-ade150").background_threshold is None
    with pytest.raises(ValueError, match="sclip-voc21"):
        get_protocol("sclip-voc")
