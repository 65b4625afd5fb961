"""Readers for the standard benchmark layouts (MMSegmentation's), a plain folder, and synthetic.

``load_dataset(name, root, split="val")`` is the entry point; ``DATASETS`` maps each name to its
reader and ``list_datasets()`` describes them. Every reader gives a `SegmentationDataset`
(``zegkit.data.base``): items ``(image uint8 (3, H, W), mask int64 (H, W), name)`` with 255 for
ignore, ``class_names`` with synonyms ("a; b; c"), ``ignore_index``, and ``seen``/``unseen``
where the dataset defines a zero-shot split.

Layouts (as produced by MMSegmentation's ``tools/dataset_converters``; see its
``docs/en/user_guides/2_dataset_prepare.md``), relative to the data root:

========================  =====================================================================
voc21 / voc20             VOCdevkit/VOC2012: JPEGImages/*.jpg, SegmentationClass/*.png,
                          ImageSets/Segmentation/<split>.txt. Labels 0 = background, 1..20,
                          255 = border. voc20 drops background (0 -> ignore, v -> v - 1).
                          Split train_aug (VOC train + SBD): SegmentationClassAug/*.png with
                          ImageSets/Segmentation/train_aug.txt, or MMSegmentation's aug.txt.
context60 / context59     VOCdevkit/VOC2010: JPEGImages/*.jpg, SegmentationClassContext/*.png,
                          ImageSets/SegmentationContext/<split>.txt. Labels 0 = background,
                          1..59. context59 drops background (0 -> ignore, v -> v - 1).
coco_stuff171             coco_stuff164k: images/<split>2017/*.jpg,
                          annotations/<split>2017/*_labelTrainIds.png (0..170, 255 = unlabelled).
coco20i                   COCO 2014 as few-shot segmentation code reads it (HSNet, PFENet):
                          <split>2014/*.jpg, annotations/<split>2014/<id>.png with 0 =
                          background, 1..80 = the COCO things in category order, 255 = ignore.
coco_object               images/<split>2017/*.jpg, annotations/<split>2017/*_instanceTrainIds.png
                          (0 = background, 1..80 = the COCO things); written from the COCO
                          instance JSON by ``zegkit.data.coco_object.convert_coco_object``.
cityscapes19              leftImg8bit/<split>/<city>/*_leftImg8bit.png,
                          gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (0..18, 255).
ade150                    ADEChallengeData2016: images/<validation|training>/*.jpg,
                          annotations/<...>/*.png; 0 = other -> ignore, v -> v - 1.
folder                    images (root/images/ or root itself), optional masks root/masks/<id>.png,
                          class names in root/classes.txt.
synthetic                 root/images/<id>.png, root/masks/<id>.png, root/classes.txt,
                          root/split.json {"seen": [...], "unseen": [...]} (zegkit.data.synthetic).
========================  =====================================================================
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from zegkit.data.base import (
    Sample,
    SegmentationDataset,
    check_files_exist,
    class_indices,
    describe_folder,
    pair_by_stem,
    read_split_file,
    require_layout,
    shipped_class_names,
)
from zegkit.io import IMAGE_EXTENSIONS
from zegkit.text import read_class_file

PathLike = str | os.PathLike
# Dataset split name -> folder name, for layouts that spell splits differently.
COCO_SPLIT_FOLDERS = {"val": "val2017", "train": "train2017"}
COCO2014_SPLIT_FOLDERS = {"val": "val2014", "train": "train2014"}
ADE_SPLIT_FOLDERS = {"val": "validation", "train": "training"}
# VOC 2012 train + SBD, the training split of the VOC benchmarks, and its mask folder.
VOC_TRAIN_AUG = "train_aug"
AUG_MASKS = "SegmentationClassAug"
SYNTHETIC_SPLIT_FILE = "split.json"
CLASSES_FILE = "classes.txt"


def _files_with_suffix(folder: Path, suffix: str, *, recursive: bool = False) -> dict[str, Path]:
    """{id: path} for files in `folder` ending with `suffix`; id is the name without it."""
    candidates = folder.rglob(f"*{suffix}") if recursive else folder.glob(f"*{suffix}")
    return {
        path.name[: -len(suffix)]: path
        for path in candidates
        if path.is_file() and not path.name.startswith(".")
    }


def _split_folder(split: str, folders: dict[str, str], dataset: str) -> str:
    if split not in folders:
        raise ValueError(f"{dataset}: unknown split {split!r}; choose one of {sorted(folders)}.")
    return folders[split]


def _listed_samples(
    root: Path, ids: Sequence[str], image_dir: str, mask_dir: str, dataset: str
) -> list[Sample]:
    samples = [
        Sample(name, root / image_dir / f"{name}.jpg", root / mask_dir / f"{name}.png")
        for name in ids
    ]
    check_files_exist(samples, dataset)
    return samples


def _voc_train_aug(root: Path, name: str) -> list[Sample]:
    """VOC train + SBD (10,582 images) in either layout the MMSegmentation world uses.

    1. ``ImageSets/Segmentation/train_aug.txt`` with every mask in ``SegmentationClassAug``
       (the DeepLab / SBD-release convention).
    2. MMSegmentation's ``tools/dataset_converters/voc_aug.py`` output, as ZegCLIP's
       ``voc12_20_aug_512x512.py`` reads it: ``train.txt`` ids with ``SegmentationClass`` masks,
       then ``aug.txt`` ids (SBD minus VOC train and val) with ``SegmentationClassAug`` masks.
    """
    sets = root / "ImageSets" / "Segmentation"
    if (sets / "train_aug.txt").is_file():
        require_layout(root, name, ["JPEGImages", AUG_MASKS])
        ids = read_split_file(sets / "train_aug.txt", name)
        return _listed_samples(root, ids, "JPEGImages", AUG_MASKS, name)
    if (sets / "aug.txt").is_file():
        require_layout(root, name, ["JPEGImages", "SegmentationClass", AUG_MASKS])
        voc = read_split_file(sets / "train.txt", name)
        sbd = read_split_file(sets / "aug.txt", name)
        return _listed_samples(root, voc, "JPEGImages", "SegmentationClass", name) + (
            _listed_samples(root, sbd, "JPEGImages", AUG_MASKS, name)
        )
    raise FileNotFoundError(
        f"{name}: split train_aug needs {sets / 'train_aug.txt'} (masks in {root / AUG_MASKS}) "
        f"or MMSegmentation's {sets / 'aug.txt'} beside train.txt; "
        f"{describe_folder(sets)}. Create them from SBD with MMSegmentation's "
        f"tools/dataset_converters/voc_aug.py."
    )


def pascal_voc(
    root: PathLike, split: str = "val", *, background: bool = True
) -> SegmentationDataset:
    """Pascal VOC 2012 (root = VOCdevkit/VOC2012): voc21 with background, voc20 without.

    Split "train_aug" is VOC train + SBD (see `_voc_train_aug`); others are
    ImageSets/Segmentation/<split>.txt with SegmentationClass masks.
    """
    root, name = Path(root).expanduser(), "voc21" if background else "voc20"
    if split == VOC_TRAIN_AUG:
        require_layout(root, name, ["JPEGImages", "ImageSets/Segmentation"])
        samples = _voc_train_aug(root, name)
    else:
        split_file = f"ImageSets/Segmentation/{split}.txt"
        require_layout(root, name, ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"])
        ids = read_split_file(root / split_file, name)
        samples = _listed_samples(root, ids, "JPEGImages", "SegmentationClass", name)
    return SegmentationDataset(
        samples, shipped_class_names(name), name=name, root=root, reduce_zero_label=not background
    )


def pascal_context(
    root: PathLike, split: str = "val", *, background: bool = True
) -> SegmentationDataset:
    """Pascal Context (root = VOCdevkit/VOC2010): context60 with background, context59 without."""
    root, name = Path(root).expanduser(), "context60" if background else "context59"
    expected = ["JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"]
    require_layout(root, name, expected)
    ids = read_split_file(root / f"ImageSets/SegmentationContext/{split}.txt", name)
    samples = _listed_samples(root, ids, "JPEGImages", "SegmentationClassContext", name)
    return SegmentationDataset(
        samples, shipped_class_names(name), name=name, root=root, reduce_zero_label=not background
    )


def _coco_layout(root: Path, split: str, name: str, mask_suffix: str) -> list[Sample]:
    folder = _split_folder(split, COCO_SPLIT_FOLDERS, name)
    require_layout(root, name, [f"images/{folder}", f"annotations/{folder}"])
    images = _files_with_suffix(root / "images" / folder, ".jpg")
    masks = _files_with_suffix(root / "annotations" / folder, mask_suffix)
    if not images:
        raise FileNotFoundError(f"{name}: no .jpg images in {root / 'images' / folder}.")
    hint = f"annotations/{folder}/<id>{mask_suffix}"
    return pair_by_stem(images, masks, name, hint)


def coco_stuff(root: PathLike, split: str = "val") -> SegmentationDataset:
    """COCO-Stuff 164k, 171 classes (root = coco_stuff164k, MMSegmentation's converter output)."""
    root = Path(root).expanduser()
    samples = _coco_layout(root, split, "coco_stuff171", "_labelTrainIds.png")
    classes = shipped_class_names("coco_stuff171")
    return SegmentationDataset(samples, classes, name="coco_stuff171", root=root)


def coco_object(root: PathLike, split: str = "val") -> SegmentationDataset:
    """COCO-Object: background + the 80 COCO thing classes (see `zegkit.data.coco_object`)."""
    root = Path(root).expanduser()
    samples = _coco_layout(root, split, "coco_object", "_instanceTrainIds.png")
    classes = shipped_class_names("coco_object")
    return SegmentationDataset(samples, classes, name="coco_object", root=root)


def coco20i(root: PathLike, split: str = "val") -> SegmentationDataset:
    """COCO 2014 with background + the 80 things, in the few-shot layout (module docstring),
    the data of the COCO-20i fold protocols."""
    root, name = Path(root).expanduser(), "coco20i"
    folder = _split_folder(split, COCO2014_SPLIT_FOLDERS, name)
    require_layout(root, name, [folder, f"annotations/{folder}"])
    images = _files_with_suffix(root / folder, ".jpg")
    if not images:
        raise FileNotFoundError(f"{name}: no .jpg images in {root / folder}.")
    masks = _files_with_suffix(root / "annotations" / folder, ".png")
    samples = pair_by_stem(images, masks, name, f"annotations/{folder}/<id>.png")
    return SegmentationDataset(samples, shipped_class_names("coco_object"), name=name, root=root)


def cityscapes(root: PathLike, split: str = "val") -> SegmentationDataset:
    """Cityscapes, 19 train classes (root holds leftImg8bit/ and gtFine/)."""
    root, name = Path(root).expanduser(), "cityscapes19"
    require_layout(root, name, [f"leftImg8bit/{split}", f"gtFine/{split}"])
    images = _files_with_suffix(root / "leftImg8bit" / split, "_leftImg8bit.png", recursive=True)
    masks = _files_with_suffix(root / "gtFine" / split, "_gtFine_labelTrainIds.png", recursive=True)
    if not images:
        raise FileNotFoundError(
            f"{name}: no *_leftImg8bit.png images under {root / 'leftImg8bit' / split}/<city>/."
        )
    if not masks:
        raise FileNotFoundError(
            f"{name}: no *_gtFine_labelTrainIds.png under {root / 'gtFine' / split}/<city>/. "
            f"Create them with cityscapesscripts' createTrainIdLabelImgs (or MMSegmentation's "
            f"tools/dataset_converters/cityscapes.py)."
        )
    hint = f"gtFine/{split}/<city>/<id>_gtFine_labelTrainIds.png"
    samples = pair_by_stem(images, masks, name, hint)
    return SegmentationDataset(samples, shipped_class_names(name), name=name, root=root)


def ade20k(root: PathLike, split: str = "val") -> SegmentationDataset:
    """ADE20K SceneParsing, 150 classes (root = ADEChallengeData2016)."""
    root, name = Path(root).expanduser(), "ade150"
    folder = _split_folder(split, ADE_SPLIT_FOLDERS, name)
    require_layout(root, name, [f"images/{folder}", f"annotations/{folder}"])
    images = _files_with_suffix(root / "images" / folder, ".jpg")
    if not images:
        raise FileNotFoundError(f"{name}: no .jpg images in {root / 'images' / folder}.")
    masks = _files_with_suffix(root / "annotations" / folder, ".png")
    samples = pair_by_stem(images, masks, name, f"annotations/{folder}/<id>.png")
    return SegmentationDataset(
        samples, shipped_class_names(name), name=name, root=root, reduce_zero_label=True
    )


def _image_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and path.name[0] != ".":
            if path.stem in found:
                raise ValueError(
                    f"Two images share the id {path.stem!r}: {found[path.stem].name} and "
                    f"{path.name} in {folder}; rename one."
                )
            found[path.stem] = path
    return found


def _class_names_from(root: Path, classes: Sequence[str] | None, dataset: str) -> list[str]:
    if classes is not None:
        return list(classes)
    path = root / CLASSES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{dataset}: {path} not found. Write the class names there, one per line in label "
            f"order (synonyms separated by ';'), or pass classes=[...]."
        )
    return read_class_file(path)


def image_folder(
    root: PathLike, split: str = "val", *, classes: Sequence[str] | None = None
) -> SegmentationDataset:
    """A plain folder of images with optional masks.

    Images are in root/images/ if that folder exists, else in root itself; masks, if any, are
    root/masks/<id>.png (label indices, 255 = ignore); class names come from `classes` or
    root/classes.txt. Without a masks folder the dataset is unlabelled (`has_masks` False).

    Args:
        root: the folder.
        split: unused (a folder has one split); accepted for a uniform signature.
        classes: class names in label order; default: read root/classes.txt.

    Raises:
        FileNotFoundError: no images, no class names, or images without masks when some exist.
    """
    del split
    root, name = Path(root).expanduser(), "folder"
    image_dir = root / "images" if (root / "images").is_dir() else root
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{name}: {describe_folder(root)}; expected a folder of images.")
    images = _image_files(image_dir)
    if not images:
        raise FileNotFoundError(
            f"{name}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}; "
            f"{describe_folder(image_dir)}."
        )
    class_names = _class_names_from(root, classes, name)
    mask_dir = root / "masks"
    if mask_dir.is_dir():
        samples = pair_by_stem(images, _files_with_suffix(mask_dir, ".png"), name, "masks/<id>.png")
    else:
        samples = [Sample(stem, path, None) for stem, path in sorted(images.items())]
    return SegmentationDataset(samples, class_names, name=name, root=root)


def _synthetic_split(root: Path, class_names: list[str]) -> tuple[list[int], list[int]]:
    path = root / SYNTHETIC_SPLIT_FILE
    try:
        split = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"synthetic: {path} is not valid JSON: {error}.") from None
    if not isinstance(split, dict) or not all(key in split for key in ("seen", "unseen")):
        raise ValueError(
            f"synthetic: {path} must be an object with 'seen' and 'unseen' lists of class names "
            f"or indices; got {split!r:.200}."
        )
    seen = class_indices(split["seen"], class_names)
    unseen = class_indices(split["unseen"], class_names)
    if set(seen) & set(unseen):
        raise ValueError(f"synthetic: {path} lists classes as both seen and unseen.")
    return seen, unseen


def synthetic(root: PathLike, split: str = "val") -> SegmentationDataset:
    """The synthetic proving ground written by `zegkit.data.synthetic` (layout: module docstring).

    Args:
        root: the generated folder.
        split: unused (one split per generated folder); accepted for a uniform signature.
    """
    del split
    root, name = Path(root).expanduser(), "synthetic"
    require_layout(root, name, ["images", "masks", CLASSES_FILE, SYNTHETIC_SPLIT_FILE])
    class_names = read_class_file(root / CLASSES_FILE)
    seen, unseen = _synthetic_split(root, class_names)
    images = _image_files(root / "images")
    masks = _files_with_suffix(root / "masks", ".png")
    samples = pair_by_stem(images, masks, name, "masks/<id>.png")
    return SegmentationDataset(
        samples, class_names, name=name, root=root, seen=seen, unseen=unseen
    )


@dataclass(frozen=True)
class DatasetInfo:
    """A reader and a one-line description of the layout it expects."""

    reader: Callable[..., SegmentationDataset]
    description: str


def _voc20(root: PathLike, split: str = "val") -> SegmentationDataset:
    return pascal_voc(root, split, background=False)


def _context59(root: PathLike, split: str = "val") -> SegmentationDataset:
    return pascal_context(root, split, background=False)


DATASETS: dict[str, DatasetInfo] = {
    "voc21": DatasetInfo(pascal_voc, "Pascal VOC 2012 val, 20 classes + background"),
    "voc20": DatasetInfo(_voc20, "Pascal VOC 2012 val, 20 classes, background ignored"),
    "context60": DatasetInfo(pascal_context, "Pascal Context val, 59 classes + background"),
    "context59": DatasetInfo(_context59, "Pascal Context val, 59 classes, background ignored"),
    "coco_stuff171": DatasetInfo(coco_stuff, "COCO-Stuff 164k val, 171 classes"),
    "coco_object": DatasetInfo(coco_object, "COCO val2017, 80 thing classes + background"),
    "coco20i": DatasetInfo(coco20i, "COCO 2014 val, 80 things + background (COCO-20i folds)"),
    "cityscapes19": DatasetInfo(cityscapes, "Cityscapes val, 19 classes"),
    "ade150": DatasetInfo(ade20k, "ADE20K val, 150 classes"),
    "folder": DatasetInfo(image_folder, "a folder of images, optional masks/, classes.txt"),
    "synthetic": DatasetInfo(synthetic, "zegkit's synthetic proving ground, seen/unseen split"),
}
# Other spellings users type for the same datasets.
ALIASES = {
    "voc": "voc21",
    "context": "context59",
    "coco_stuff": "coco_stuff171",
    "cocostuff": "coco_stuff171",
    "coco-stuff": "coco_stuff171",
    "coco-object": "coco_object",
    "cityscapes": "cityscapes19",
    "ade20k": "ade150",
    "ade": "ade150",
}


def list_datasets() -> dict[str, str]:
    """{dataset name: one-line description} for every name `load_dataset` accepts."""
    return {name: info.description for name, info in DATASETS.items()}


def canonical_name(name: str) -> str:
    """The registered name for `name` or one of its aliases.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}. Known datasets: {sorted(DATASETS)} "
            f"(aliases: {sorted(ALIASES)})."
        )
    return key


def load_dataset(name: str, root: PathLike, split: str = "val") -> SegmentationDataset:
    """Open a dataset by name from its on-disk layout (see the module docstring).

    Args:
        name: a key of `DATASETS` (or an alias such as "ade20k", "cityscapes").
        root: the data root, e.g. ~/data/VOCdevkit/VOC2012 for voc21.
        split: "val" (default) or another split the layout has ("train").

    Returns:
        The dataset; images are decoded and masks checked lazily, per item.

    Raises:
        ValueError: unknown dataset name (known names listed) or split.
        FileNotFoundError: the root does not have the expected layout (expected sub-folders and
            what was found are listed), a split file is missing, or images lack masks.
    """
    dataset = DATASETS[canonical_name(name)].reader(root, split)
    dataset.split = split
    return dataset
