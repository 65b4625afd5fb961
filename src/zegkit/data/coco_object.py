"""COCO-Object label maps from COCO instance annotations.

COCO-Object (GroupViT, arXiv 2202.11094; TCL; SCLIP ``cfg_coco_object.py``) evaluates the 80 COCO
thing classes plus background on val2017. Its label PNGs (``<id>_instanceTrainIds.png``) hold
0 for background and 1..80 for the things, in COCO's category-id order.

`convert_coco_object` writes them from ``instances_val2017.json``:

- every image listed in the JSON gets a map, all background to start with;
- instances are painted largest first (by their ``area``), so a small object lying on a large one
  stays visible; crowd regions (``iscrowd: 1``) are painted with their class like any instance,
  as COCO-Stuff's pixel maps do;
- polygons and run-length encodings (uncompressed ``counts`` lists, as the instance JSON's crowd
  annotations hold, and compressed strings) are rasterised / decoded by pycocotools, COCO's own
  reference implementation, so the maps match those made with the COCO API pixel for pixel.

GroupViT's own converter (``convert_dataset/convert_coco_object.py``) derives the same classes
from COCO-Stuff's pixel maps instead; use `labels_from_coco_stuff` if you have those.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from zegkit.data.base import IGNORE_INDEX
from zegkit.io import save_png_atomic

# The 80 COCO thing category ids, in order; category COCO_THING_IDS[i] gets label i + 1
# (COCO 2017 instances_*.json "categories"; ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused).
COCO_THING_IDS: tuple[int, ...] = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)
BACKGROUND = 0
LABEL_SUFFIX = "_instanceTrainIds.png"
# COCO-Stuff 164k train ids 0..79 are the things (same order), 80..170 the stuff classes.
COCO_STUFF_NUM_THINGS = 80

def segmentation_to_mask(segmentation: object, height: int, width: int) -> np.ndarray:
    """A COCO annotation's "segmentation" (polygons or RLE) as a bool mask (H, W).

    Raises:
        ValueError: an RLE whose size differs from the image's or whose runs do not cover it,
            or an unknown format.
    """
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]  # >= 3 points
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        size = list(segmentation.get("size", [height, width]))
        if size != [height, width]:
            raise ValueError(f"RLE size {size} differs from the image size {[height, width]}.")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if sum(counts) != height * width:
                raise ValueError(
                    f"RLE runs add up to {sum(counts)} pixels but the mask is {height}x{width} "
                    f"= {height * width}."
                )
            rle = coco_mask.frPyObjects({"counts": counts, "size": size}, height, width)
        else:
            rle = {"counts": counts.encode() if isinstance(counts, str) else counts, "size": size}
    else:
        raise ValueError(
            f"Unknown COCO segmentation format {type(segmentation).__name__}; expected a list of "
            f"polygons or an RLE dict with 'counts' and 'size'."
        )
    return coco_mask.decode(rle).astype(bool)


def instance_label_map(annotations: Sequence[dict], height: int, width: int) -> np.ndarray:
    """The COCO-Object label map (H, W) uint8 of one image from its instance annotations.

    Raises:
        ValueError: an annotation's category is not one of the 80 COCO things.
    """
    label_of = {category: index + 1 for index, category in enumerate(COCO_THING_IDS)}
    labels = np.full((height, width), BACKGROUND, dtype=np.uint8)
    for annotation in sorted(annotations, key=lambda a: -float(a.get("area", 0.0))):
        category = annotation["category_id"]
        if category not in label_of:
            raise ValueError(
                f"Annotation {annotation.get('id')} has category_id {category}, which is not one "
                f"of the 80 COCO thing categories {list(COCO_THING_IDS)}."
            )
        labels[segmentation_to_mask(annotation["segmentation"], height, width)] = label_of[category]
    return labels


def labels_from_coco_stuff(train_ids: np.ndarray) -> np.ndarray:
    """COCO-Stuff 164k train ids (0..170, 255) -> COCO-Object labels (things 1..80, stuff 0)."""
    labels = np.where(train_ids < COCO_STUFF_NUM_THINGS, train_ids + 1, BACKGROUND)
    labels[train_ids == IGNORE_INDEX] = IGNORE_INDEX
    return labels.astype(np.uint8)


def convert_coco_object(
    instances_json: str | os.PathLike,
    out_root: str | os.PathLike,
    split: str = "val",
    *,
    overwrite: bool = False,
) -> int:
    """Write COCO-Object label PNGs from a COCO instances JSON.

    Output: ``out_root/annotations/<split>2017/<image stem>_instanceTrainIds.png``, the layout
    `zegkit.data.datasets.coco_object` reads (images go to ``out_root/images/<split>2017/``).
    Existing PNGs are kept unless `overwrite`, so an interrupted conversion can be rerun.

    Args:
        instances_json: e.g. annotations/instances_val2017.json from cocodataset.org.
        out_root: the dataset root to write into.
        split: "val" or "train" (names the output folder).
        overwrite: rewrite PNGs that already exist.

    Returns:
        The number of label PNGs written.

    Raises:
        FileNotFoundError: the JSON file does not exist.
        ValueError: the JSON is not a COCO instances file, or holds an unknown category.
    """
    path = Path(instances_json).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; download annotations_trainval2017.zip from cocodataset.org and "
            f"pass its annotations/instances_{split}2017.json."
        )
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        raise ValueError(f"{path} is not a COCO instances file (no 'images'/'annotations').")
    by_image: dict[int, list[dict]] = {}
    for annotation in data["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    out_dir = Path(out_root).expanduser() / "annotations" / f"{split}2017"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for image in data["images"]:
        target = out_dir / f"{Path(image['file_name']).stem}{LABEL_SUFFIX}"
        if target.exists() and not overwrite:
            continue
        labels = instance_label_map(by_image.get(image["id"], []), image["height"], image["width"])
        save_png_atomic(Image.fromarray(labels), target)
        written += 1
    return written
