"""Training data: training-split readers in their on-disk layouts, zero-shot labels, mmseg-style
augmentation, the deterministic step sampler and loader, and the pre-training data check."""

import numpy as np
import pytest
import torch
from PIL import Image

from zegkit.data import synthetic
from zegkit.data.base import IGNORE_INDEX
from zegkit.train.augment import (
    AugmentConfig,
    augment,
    hsv_to_rgb,
    is_balanced,
    photometric_distortion,
    random_crop,
    random_resize,
    rescale_size,
    rgb_to_hsv,
)
from zegkit.train.data import (
    PSEUDO_LABEL,
    AugmentedTrainingSet,
    StepSampler,
    SyntheticTrainingSet,
    build_train_loader,
    check_training_set,
    draw_rng,
    images_without,
    load_training_set,
    seen_class_mask,
    zero_shot_labels,
    zero_shot_split,
)

H, W = 6, 8
PLAIN = AugmentConfig(scale=None, crop_size=(H, W), cat_max_ratio=1.0, photometric=False,
                      flip_prob=0.0)


def _image(path, seed=0, size=(H, W)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _mask(path, value=1, size=(H, W)):
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.full(size, value, np.uint8)
    labels[0] = 0
    Image.fromarray(labels).save(path)


def _split(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}\n" for name in ids))


# ---- readers ----------------------------------------------------------------------------------
@pytest.fixture
def voc_aug_root(tmp_path):
    """VOC 2012 + SBD as train_aug.txt with every mask in SegmentationClassAug."""
    root = tmp_path / "VOCdevkit" / "VOC2012"
    ids = ["2007_000032", "2008_000002", "2011_003276"]
    for i, name in enumerate(ids):
        _image(root / "JPEGImages" / f"{name}.jpg", seed=i)
        _mask(root / "SegmentationClassAug" / f"{name}.png", value=16)
    _split(root / "ImageSets/Segmentation/train_aug.txt", ids)
    return root


def test_voc_train_aug_reads_segmentation_class_aug(voc_aug_root):
    dataset = load_training_set("voc20", voc_aug_root)
    assert dataset.split == "train_aug" and len(dataset) == 3
    assert {s.mask.parent.name for s in dataset.samples} == {"SegmentationClassAug"}
    image, mask, name = dataset[1]
    assert name == "2008_000002" and image.shape == (3, H, W)
    assert (mask[0] == IGNORE_INDEX).all() and (mask[1:] == 15).all()  # reduce_zero_label


def test_voc_train_aug_mmseg_converter_layout(tmp_path):
    root = tmp_path / "VOC2012"
    for name in ("a", "b", "c"):
        _image(root / "JPEGImages" / f"{name}.jpg")
    _mask(root / "SegmentationClass" / "a.png")
    _mask(root / "SegmentationClassAug" / "b.png")
    _mask(root / "SegmentationClassAug" / "c.png")
    _split(root / "ImageSets/Segmentation/train.txt", ["a"])
    _split(root / "ImageSets/Segmentation/aug.txt", ["b", "c"])
    dataset = load_training_set("voc21", root)
    assert [(s.name, s.mask.parent.name) for s in dataset.samples] == [
        ("a", "SegmentationClass"), ("b", "SegmentationClassAug"), ("c", "SegmentationClassAug")]


def test_voc_train_aug_errors_name_the_fix(tmp_path, voc_aug_root):
    root = tmp_path / "empty" / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="voc_aug.py"):
        load_training_set("voc20", root)
    (voc_aug_root / "SegmentationClassAug" / "2011_003276.png").unlink()
    with pytest.raises(FileNotFoundError, match="2011_003276.png"):
        load_training_set("voc20", voc_aug_root)


def test_coco_stuff_train2017(tmp_path):
    root = tmp_path / "coco_stuff164k"
    for name in ("000000000009", "000000000025"):
        _image(root / "images/train2017" / f"{name}.jpg")
        _mask(root / "annotations/train2017" / f"{name}_labelTrainIds.png", value=170)
    _image(root / "images/val2017/000000000139.jpg")
    dataset = load_training_set("coco_stuff", root)
    assert dataset.names == ["000000000009", "000000000025"]
    assert (dataset[0][1][1:] == 170).all()


def test_pascal_context_train(tmp_path):
    root = tmp_path / "VOC2010"
    for name in ("2008_000008", "2008_000015"):
        _image(root / "JPEGImages" / f"{name}.jpg")
        _mask(root / "SegmentationClassContext" / f"{name}.png", value=59)
    _split(root / "ImageSets/SegmentationContext/train.txt", ["2008_000015"])
    dataset = load_training_set("context59", root)
    mask = dataset[0][1]
    assert dataset.names == ["2008_000015"] and (mask[0] == 255).all() and (mask[1:] == 58).all()


def test_synthetic_training_scenes_are_fixed_and_not_evaluation_scenes():
    dataset = load_training_set("synthetic", num_scenes=4, seed=3, size=32)
    assert isinstance(dataset, SyntheticTrainingSet) and len(dataset) == 4
    assert dataset.class_names == list(synthetic.CLASSES)
    assert [dataset.class_names[i] for i in dataset.unseen] == list(synthetic.UNSEEN)
    assert [dataset.class_names[i] for i in dataset.seen] == list(synthetic.SEEN)
    image, mask, _ = dataset[2]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and mask.dtype == torch.int64
    again = SyntheticTrainingSet(4, seed=3, size=32)[2]
    assert torch.equal(image, again[0]) and torch.equal(mask, again[1])
    evaluation = synthetic.generate_scene(np.random.default_rng([3, 2]), 32)  # write_dataset's
    assert not np.array_equal(image.permute(1, 2, 0).numpy(), evaluation.image)
    assert not torch.equal(image, SyntheticTrainingSet(4, seed=4, size=32)[2][0])
    for index in range(4):  # the layout-only mask the fold filter reads is the item's mask
        assert np.array_equal(dataset.read_checked_mask(index), dataset[index][1].numpy())


# ---- zero-shot labels -------------------------------------------------------------------------
def test_zero_shot_labels_ignore_unseen_and_keep_indices():
    mask = torch.tensor([[0, 15, 19], [3, 255, 16]])
    assert zero_shot_labels(mask, [15, 16, 19]).tolist() == [[0, 255, 255], [3, 255, 255]]
    assert zero_shot_labels(mask, [15], PSEUDO_LABEL).tolist() == [[0, -1, 19], [3, 255, 16]]
    assert mask[0, 1] == 15  # not changed in place
    assert seen_class_mask(4, [0, 2]).tolist() == [True, False, True, False]


def test_zero_shot_split_from_protocol_or_dataset(voc_aug_root):
    voc = load_training_set("voc20", voc_aug_root)
    seen, unseen = zero_shot_split(voc, "zegclip-voc-15-5")
    assert unseen == [15, 16, 17, 18, 19] and seen == list(range(15))
    with pytest.raises(ValueError, match="is for coco_stuff171"):
        zero_shot_split(voc, "zegclip-coco-156-15")
    with pytest.raises(ValueError, match="no seen/unseen split"):
        zero_shot_split(voc)
    scenes = SyntheticTrainingSet(2, size=32)
    assert zero_shot_split(scenes, "zegkit-synthetic") == (scenes.seen, scenes.unseen)


def test_images_without_unseen_classes():
    scenes = SyntheticTrainingSet(6, size=32)
    kept = images_without(scenes, scenes.unseen)
    for index in range(6):
        shows_unseen = np.isin(scenes[index][1].numpy(), scenes.unseen).any()
        assert (index in kept) != shows_unseen


# ---- augmentation -----------------------------------------------------------------------------
def _coded(height, width):
    """A mask with varied labels and an image whose red channel is 10 x the label."""
    mask = torch.arange(height * width).reshape(height, width) % 7
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[0] = (mask * 10).to(torch.uint8)
    return image, mask


def test_mmseg_rescale_and_resize_keep_aspect_ratio():
    assert rescale_size(375, 500, (2048, 512)) == (512, 683)
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # the long side bounds it
    image, mask = _coded(375, 500)
    cfg = AugmentConfig(ratio_range=(0.5, 0.5))
    resized, labels = random_resize(image.float(), mask, cfg, np.random.default_rng(0))
    assert resized.shape == (3, 256, 341) and labels.shape == (256, 341)
    assert set(labels.unique().tolist()) <= set(range(7))  # nearest: no new label values


def test_small_images_are_padded_with_0_and_255():
    image, mask = _coded(5, 7)
    cfg = AugmentConfig(scale=None, crop_size=(8, 9), photometric=False, flip_prob=0.0)
    pixels, labels = augment(image, mask, cfg, np.random.default_rng(0))
    assert pixels.shape == (3, 8, 9) and pixels.dtype == torch.float32
    assert labels.shape == (8, 9) and labels.dtype == torch.int64
    assert (pixels[:, 5:] == 0).all() and (pixels[:, :, 7:] == 0).all()
    assert (labels[5:] == 255).all() and (labels[:, 7:] == 255).all()
    assert torch.equal(labels[:5, :7], mask)
    assert torch.allclose(pixels[0, :5, :7] * 255, mask.float() * 10)


def test_large_images_are_cropped_and_flips_move_image_and_mask_together():
    image, mask = _coded(40, 50)
    cfg = AugmentConfig(scale=None, crop_size=(16, 16), photometric=False, flip_prob=0.0)
    flipped_cfg = AugmentConfig(scale=None, crop_size=(16, 16), photometric=False, flip_prob=1.0)
    for draw in range(5):
        pixels, labels = augment(image, mask, cfg, draw_rng(0, draw))
        flipped, flipped_labels = augment(image, mask, flipped_cfg, draw_rng(0, draw))
        assert pixels.shape == (3, 16, 16) and labels.shape == (16, 16)
        assert torch.equal(flipped, pixels.flip(-1))
        assert torch.equal(flipped_labels, labels.flip(-1))
        assert torch.allclose(flipped[0] * 255, flipped_labels.float() * 10)  # still aligned
    resized = AugmentConfig(scale=(80, 20), crop_size=(16, 16), photometric=False)
    pixels, labels = augment(image, mask, resized, draw_rng(0, 0))
    assert pixels.shape == (3, 16, 16) and labels.shape == (16, 16)


def test_cat_max_ratio_counts_classes_as_mmseg():
    assert not is_balanced(torch.zeros(4, 4, dtype=torch.long), 0.75, 255)  # one class
    two = torch.tensor([[0, 0, 0, 1]])
    assert not is_balanced(two, 0.75, 255)  # 3/4 is not < 0.75
    assert is_balanced(torch.tensor([[0, 0, 1, 1]]), 0.75, 255)
    assert is_balanced(torch.tensor([[0, 0, 1, 255, 255, 255]]), 0.75, 255)  # ignore not counted
    assert not is_balanced(torch.tensor([[0, 255, 255, 255]]), 0.75, 255)


def test_cat_max_ratio_rejects_one_class_crops():
    mask = torch.zeros(8, 64, dtype=torch.long)
    mask[:, 60:] = 1  # only crops at left 55 or 56 (of 57) are balanced
    image = torch.zeros(3, 8, 64)

    def balanced_share(ratio):
        cfg = AugmentConfig(crop_size=(8, 8), cat_max_ratio=ratio)
        crops = [random_crop(image, mask, cfg, np.random.default_rng(seed))[1]
                 for seed in range(300)]
        assert all(crop.shape == (8, 8) for crop in crops)
        return np.mean([is_balanced(crop, 0.75, 255) for crop in crops])

    assert balanced_share(1.0) < 0.1  # 2/57 without the check
    assert 0.2 < balanced_share(0.75) < 0.45  # 1 - (55/57)**11 = 0.32 with 10 redraws
    uniform = AugmentConfig(crop_size=(8, 8))
    assert random_crop(image, torch.zeros_like(mask), uniform, np.random.default_rng(0))[1].shape \
        == (8, 8)  # never balanced: the last box is kept


def test_photometric_distortion_stays_on_the_uint8_grid():
    rgb = torch.rand(3, 20, 20) * 255
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-3)
    image = rgb.round()
    cfg = AugmentConfig()
    out = photometric_distortion(image, cfg, np.random.default_rng(1))
    assert torch.equal(out, photometric_distortion(image, cfg, np.random.default_rng(1)))
    assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255
    changed = [not torch.equal(image, photometric_distortion(image, cfg, np.random.default_rng(s)))
               for s in range(8)]
    assert any(changed)


# ---- determinism ------------------------------------------------------------------------------
def test_same_seed_and_draw_give_the_same_item():
    items = AugmentedTrainingSet(SyntheticTrainingSet(3, size=48), AugmentConfig.at_crop(32),
                                 seed=5)
    first, again = items[(1, 7)], items[(1, 7)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = items[(1, 8)]
    assert not torch.equal(first[0], other[0])


def test_ranks_share_each_global_batch_and_resume_continues():
    full = StepSampler(10, 6, seed=0, num_steps=5)
    batches = list(full)
    assert len(batches) == 5 and [draw for _, draw in batches[1]] == list(range(6, 12))
    first_epoch = [index for batch in batches for index, draw in batch if draw < 10]
    assert sorted(first_epoch) == list(range(10))  # each image once per epoch
    shares = [list(StepSampler(10, 6, seed=0, num_steps=5, rank=r, world_size=3))
              for r in range(3)]
    for step, batch in enumerate(batches):
        assert [share[step] for share in shares] == [batch[r::3] for r in range(3)]
    assert list(StepSampler(10, 6, seed=0, num_steps=5, start_step=3)) == batches[3:]
    assert list(StepSampler(10, 6, seed=1, num_steps=5)) != batches
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        StepSampler(10, 6, seed=0, num_steps=5, world_size=4)


def test_loader_batches_do_not_depend_on_workers_or_ranks():
    scenes = SyntheticTrainingSet(5, size=32)
    cfg = AugmentConfig.at_crop(32)

    def batches(**options):
        loader = build_train_loader(scenes, cfg, batch_size=4, seed=2, num_steps=3,
                                    unseen=scenes.unseen, **options)
        return list(loader)

    single = batches()
    assert len(single) == 3
    images, labels = single[0]
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (4, 32, 32) and labels.dtype == torch.int64
    assert not torch.isin(labels, torch.tensor(scenes.unseen)).any()
    for (a, b), (c, d) in zip(batches(num_workers=2), single, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    rank0, rank1 = batches(rank=0, world_size=2), batches(rank=1, world_size=2)
    for step in range(3):
        assert torch.equal(rank0[step][0], single[step][0][0::2])
        assert torch.equal(rank1[step][1], single[step][1][1::2])
    resumed = batches(start_step=2)
    assert len(resumed) == 1 and torch.equal(resumed[0][0], single[2][0])


# ---- bad data ---------------------------------------------------------------------------------
def test_check_training_set_names_bad_files(voc_aug_root):
    masks = voc_aug_root / "SegmentationClassAug"
    check_training_set(load_training_set("voc20", voc_aug_root))
    _mask(masks / "2008_000002.png", value=40)  # > 20 classes
    _mask(masks / "2011_003276.png", size=(H + 1, W))
    dataset = load_training_set("voc20", voc_aug_root)
    (masks / "2007_000032.png").unlink()  # gone after the reader listed it
    with pytest.raises(ValueError, match="3 bad training items") as error:
        check_training_set(dataset, sample=None)
    message = str(error.value)
    assert "2007_000032.png does not exist" in message
    assert "2008_000002.png holds values 39" in message
    assert "2011_003276.png is 8x7" in message
    with pytest.raises(ValueError, match="1 bad training items"):
        check_training_set(dataset, sample=1)  # only the first image is opened
    check_training_set(SyntheticTrainingSet(10**6, size=32))  # generated: nothing to open
