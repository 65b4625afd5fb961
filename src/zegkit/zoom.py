"""ClsCLIP+'s local zoom-in (arXiv 2304.06212): re-segment region proposals up close, OR them in.

1. Proposals: boxes with a class. Either from a boxes file (a detector's output, COCO-style
   JSON, `read_proposals`) or from the method itself (`self_proposals`: the connected
   components of each class in the whole-image prediction, each box padded by `pad` of its
   size on every side). The paper used a COCO-trained YOLOv7, which was supervised on every
   PASCAL and COCO-20i class, so its ClsCLIP+ numbers are not zero-shot; "self" needs no
   detector and no box supervision.
2. Zoom: each kept box's crop is resized so its short side is the segmenter's short side (the
   backbone's training size when the segmenter keeps input sizes) and segmented with the same
   vocabulary; its probabilities are resized back onto the box.
3. Merge by union (the paper's pixel-wise OR on soft masks): a class's probability is the max of
   its whole-image probability and its boxes' probabilities inside them; classes without boxes
   keep the whole-image prediction. Boxes of classes outside the vocabulary are not kept (the
   paper keeps the boxes whose class is the target).

Boxes file formats (boxes are COCO's [x, y, width, height] in image pixels):
- a COCO results/dataset file: {"images": [{"id", "file_name"}, ...], "annotations":
  [{"image_id", "bbox", "category_id", "score"?}, ...], "categories": [{"id", "name"}, ...]};
  an image is found by its file name's stem;
- one image's list: [{"bbox": [x, y, w, h], "category": name, "score"?}, ...].

    segmenter = load_segmenter("clsclip", "zegkit/tiny-synthetic", checkpoint=path)
    result = zoom_segment(segmenter, "scene.png", "self", classes=["star", "ring"])
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from zegkit.data.base import class_index
from zegkit.inference import BACKGROUND_NAME, resize, resized_size, unit_images
from zegkit.io import ImageSource, load_image, to_tensor

SELF = "self"
DEFAULT_PAD = 0.25  # a self-proposal's box grows by this fraction of its size on every side
DEFAULT_MIN_AREA = 16  # pixels; smaller components are noise, not objects to zoom into


@dataclass(frozen=True)
class Proposal:
    """A region proposal: a box in image pixels and the vocabulary row of its class.

    Attributes:
        box: (x0, y0, x1, y1), x1 and y1 exclusive; fractional values widen to whole pixels.
        label: the class (row of the vocabulary) the box was proposed for.
        score: the detector's confidence (kept for callers that filter; the merge ignores it).
    """

    box: tuple[float, float, float, float]
    label: int
    score: float = 1.0


def clip_box(proposal: Proposal, height: int, width: int) -> tuple[int, int, int, int]:
    """The proposal's box widened to whole pixels and clamped to an image of (height, width).

    Raises:
        ValueError: the box is empty or lies outside the image.
    """
    left, top, right, bottom = proposal.box
    x0, y0, x1, y1 = math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"Proposal box {proposal.box} must have x0 < x1 and y0 < y1.")
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"Proposal box {proposal.box} lies outside the {height}x{width} image.")
    return x0, y0, x1, y1


def _detections(record: object, image: str, path: Path) -> list[tuple[list[float], str, float]]:
    """(bbox, class name, score) of `image` in a parsed boxes file (module docstring)."""
    if isinstance(record, list):
        return [(d["bbox"], d["category"], float(d.get("score", 1.0))) for d in record]
    if not isinstance(record, dict) or not {"images", "annotations", "categories"} <= set(record):
        raise ValueError(f"{path} is neither a COCO-style file (images, annotations, categories) "
                         "nor a list of {bbox, category} boxes.")
    ids = [entry["id"] for entry in record["images"] if Path(entry["file_name"]).stem == image]
    if not ids:
        raise ValueError(f"{path} lists no image named {image!r} (by file-name stem); its "
                         f"images include {[e['file_name'] for e in record['images'][:5]]}.")
    names = {entry["id"]: entry["name"] for entry in record["categories"]}
    return [(a["bbox"], names[a["category_id"]], float(a.get("score", 1.0)))
            for a in record["annotations"] if a["image_id"] == ids[0]]


def read_proposals(path: str | os.PathLike, image: str, class_names: Sequence[str]
                   ) -> list[Proposal]:
    """The proposals of image `image` (a name or path; its stem is matched) in a boxes file,
    for the classes of `class_names` (boxes of other classes are left out).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not valid JSON, not a boxes file, or the image is not in it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No boxes file at {str(path)!r}; pass a COCO-style JSON file "
                                "or 'self' (proposals from the method's own mask).")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from None
    proposals = []
    for (x, y, w, h), name, score in _detections(record, Path(image).stem, path):
        try:
            label = class_index(name, class_names)
        except ValueError:
            continue  # a class the vocabulary does not ask for
        proposals.append(Proposal((x, y, x + w, y + h), label, score))
    return proposals


def self_proposals(labels: Tensor, class_names: Sequence[str], pad: float = DEFAULT_PAD,
                   min_area: int = DEFAULT_MIN_AREA) -> list[Proposal]:
    """Boxes around the connected components of each non-background class of a label map.

    Args:
        labels: (H, W) class indices (a first-pass prediction).
        class_names: the vocabulary (a class named "background" gets no boxes).
        pad: each box grows by this fraction of its width / height on every side.
        min_area: components of fewer pixels are left out.
    """
    labels_np = labels.cpu().numpy()
    height, width = labels_np.shape
    proposals = []
    for label in np.unique(labels_np).tolist():
        if class_names[label].split(";")[0].strip().casefold() == BACKGROUND_NAME:
            continue
        components, _ = ndimage.label(labels_np == label)
        for rows, columns in ndimage.find_objects(components):
            if (components[rows, columns] > 0).sum() < min_area:
                continue
            dy, dx = pad * (rows.stop - rows.start), pad * (columns.stop - columns.start)
            box = (max(columns.start - dx, 0), max(rows.start - dy, 0),
                   min(columns.stop + dx, width), min(rows.stop + dy, height))
            proposals.append(Proposal(box, label))
    return proposals


def merge_regions(probabilities: Tensor, regions: Sequence[tuple[Proposal, Tensor]]) -> Tensor:
    """The union of whole-image and region predictions: per class the max of its whole-image
    probability and, inside each of its boxes, the box's probability.

    Args:
        probabilities: K x H x W whole-image class probabilities.
        regions: (proposal, h_box x w_box probabilities of the proposal's class) pairs.

    Returns:
        K x H x W merged probabilities (float32).

    Raises:
        ValueError: region probabilities that do not fit their box.
    """
    out = probabilities.float().clone()
    height, width = out.shape[-2:]
    for proposal, region in regions:
        x0, y0, x1, y1 = clip_box(proposal, height, width)
        if tuple(region.shape) != (y1 - y0, x1 - x0):
            raise ValueError(f"Region probabilities of shape {tuple(region.shape)} do not fit "
                             f"box {proposal.box} ({y1 - y0} x {x1 - x0} pixels).")
        window = out[proposal.label, y0:y1, x0:x1]
        out[proposal.label, y0:y1, x0:x1] = torch.maximum(window, region.float())
    return out


def zoom_probabilities(segmenter: object, images: Tensor, proposals: str | os.PathLike |
                       Sequence[Proposal], name: str = "") -> Tensor:
    """ClsCLIP+'s class probabilities (1, K, H, W) of one image (1, 3, H, W) in [0, 1] with the
    segmenter's current vocabulary.

    Args:
        segmenter: a `zegkit.segmenter.Segmenter` with a vocabulary set.
        images: one image.
        proposals: "self", a boxes file, or proposals (rows of the vocabulary).
        name: the image's name, to find it in a boxes file.

    Raises:
        ValueError: a proposal whose class is not a vocabulary row, or an unusable box.
    """
    images = unit_images(images)
    probabilities = segmenter.probabilities(images)[0]  # (K, H, W)
    class_names = segmenter.text.class_names
    if isinstance(proposals, str) and proposals == SELF:
        proposals = self_proposals(segmenter.decide(probabilities[None])[0], class_names)
    elif isinstance(proposals, (str, os.PathLike)):
        proposals = read_proposals(proposals, name, class_names)
    height, width = images.shape[-2:]
    side = segmenter.config.short_side or segmenter.backbone.image_size
    regions = []
    for proposal in proposals:
        if not 0 <= proposal.label < len(class_names):
            raise ValueError(f"Proposal label {proposal.label} is not a class index in "
                             f"0..{len(class_names) - 1}; map boxes to the vocabulary's rows.")
        x0, y0, x1, y1 = clip_box(proposal, height, width)
        crop = images[:, :, y0:y1, x0:x1]
        # antialiased shrinking rounds 1.0 up by a few ulps (a 224 x 215 crop of ones -> 117 x
        # 112 peaks at 1 + 2.4e-7), which the segmenter's [0, 1] input check refuses
        zoomed = resize(crop, resized_size(y1 - y0, x1 - x0, side)).clamp_(0.0, 1.0)
        region = segmenter.probabilities(zoomed)[:, proposal.label : proposal.label + 1]
        regions.append((proposal, resize(region, (y1 - y0, x1 - x0))[0, 0]))
    return merge_regions(probabilities, regions)[None]


def zoom_segment(segmenter: object, image: ImageSource, proposals: str | os.PathLike |
                 Sequence[Proposal], classes: Sequence[str] | None = None) -> object:
    """`Segmenter.segment` with ClsCLIP+'s zoom-in: a `Segmentation` of one image (path, PIL
    image or array) whose settings record the proposals' source."""
    from zegkit.segmenter import Segmentation

    if classes is not None:
        segmenter.set_vocabulary(classes)
    name = Path(image).name if isinstance(image, (str, os.PathLike)) else ""
    source = proposals if isinstance(proposals, (str, os.PathLike)) else "caller's boxes"
    probabilities = zoom_probabilities(segmenter, to_tensor(load_image(image))[None],
                                       proposals, name)
    return Segmentation(
        labels=segmenter.decide(probabilities)[0].cpu().numpy().astype(np.int64),
        class_names=list(segmenter.text.class_names),
        scores=probabilities[0].mean(dim=(1, 2)).cpu().numpy(),
        settings={**segmenter.settings(), "proposals": str(source)},
    )
