"""COCO-Object label maps from COCO instance annotations, without pycocotools.

COCO-Object (GroupViT, arXiv 2202.11094; TCL; SCLIP ``cfg_coco_object.py``) evaluates the 80 COCO
thing classes plus background on val2017. Its label PNGs (``<id>_instanceTrainIds.png``) hold
0 for background and 1..80 for the things, in COCO's category-id order.

`convert_coco_object` writes them from ``instances_val2017.json``:

- every image listed in the JSON gets a map, all background to start with;
- instances are painted largest first (by their ``area``), so a small object lying on a large one
  stays visible; crowd regions (``iscrowd: 1``) are painted with their class like any instance,
  as COCO-Stuff's pixel maps do;
- polygons are filled with PIL's ``ImageDraw.polygon`` (outline included); pycocotools rasterises
  with its own sub-pixel rule, so single boundary pixels can differ from maps made with it;
- run-length encodings are decoded here: uncompressed (``counts`` a list, as in the instance
  JSON's crowd annotations) and compressed (``counts`` a string, pycocotools' ``rleToString``
  format), both column-major as COCO stores them.

GroupViT's own converter (``convert_dataset/convert_coco_object.py``) derives the same classes
from COCO-Stuff's pixel maps instead; use `labels_from_coco_stuff` if you have those.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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
# pycocotools' compressed RLE: 5 payload bits per character, offset by ASCII '0'.
RLE_CHAR_OFFSET = 48
RLE_PAYLOAD_BITS = 5
RLE_MORE_BIT = 0x20
RLE_SIGN_BIT = 0x10


def rle_string_to_counts(text: str | bytes) -> list[int]:
    """Decode pycocotools' compressed RLE string into run lengths.

    Each count is written in 5-bit groups (low bits first) as characters from '0'; bit 0x20 says
    another group follows, bit 0x10 of the last group is the sign. From the third count on, the
    stored value is the difference to the count two places before.

    Raises:
        ValueError: the string ends inside a count or decodes to a negative run length.
    """
    if isinstance(text, bytes):
        text = text.decode("ascii")
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise ValueError("Compressed RLE string ends in the middle of a count.")
            group = ord(text[position]) - RLE_CHAR_OFFSET
            value |= (group & 0x1F) << shift
            more = bool(group & RLE_MORE_BIT)
            position += 1
            shift += RLE_PAYLOAD_BITS
            if not more and group & RLE_SIGN_BIT:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            raise ValueError(f"Compressed RLE string decodes to a negative run length ({value}).")
        counts.append(value)
    return counts


def rle_decode(counts: Sequence[int] | str | bytes, height: int, width: int) -> np.ndarray:
    """Decode a COCO run-length encoding to a bool mask (H, W).

    Args:
        counts: alternating run lengths of 0s and 1s (starting with 0s) over the column-major
            pixels, or the compressed string form.
        height, width: the mask size (the RLE's "size" is [height, width]).

    Raises:
        ValueError: the runs do not add up to height * width.
    """
    if isinstance(counts, (str, bytes)):
        counts = rle_string_to_counts(counts)
    runs = np.asarray(counts, dtype=np.int64)
    if runs.sum() != height * width:
        raise ValueError(
            f"RLE runs add up to {int(runs.sum())} pixels but the mask is {height}x{width} "
            f"= {height * width}."
        )
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape(width, height).T  # column-major -> (H, W)


def polygons_to_mask(polygons: Iterable[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Fill COCO polygons ([x0, y0, x1, y1, ...] each) into a bool mask (H, W)."""
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if len(polygon) >= 6 and len(polygon) % 2 == 0:  # >= 3 (x, y) points
            xs, ys = polygon[0::2], polygon[1::2]
            points = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]
            draw.polygon(points, fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def segmentation_to_mask(segmentation: object, height: int, width: int) -> np.ndarray:
    """A COCO annotation's "segmentation" (polygons or RLE) as a bool mask (H, W).

    Raises:
        ValueError: an RLE whose size differs from the image's, or an unknown format.
    """
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        size = segmentation.get("size", [height, width])
        if list(size) != [height, width]:
            raise ValueError(f"RLE size {size} differs from the image size {[height, width]}.")
        return rle_decode(segmentation["counts"], height, width)
    raise ValueError(
        f"Unknown COCO segmentation format {type(segmentation).__name__}; expected a list of "
        f"polygons or an RLE dict with 'counts' and 'size'."
    )


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
