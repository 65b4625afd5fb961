"""Zero-shot image classification with a segmenter's backbone and method: `zegkit classify`.

    segmenter = zegkit.load_segmenter("pacl", model="zegkit/tiny-synthetic",
                                      checkpoint="runs/pacl-synthetic/last.safetensors")
    results = classify(segmenter, ["scene.png"], classes=["star", "ring", "grass"])
    results[0].top(3)      # [("star", 0.71), ("grass", 0.20), ("ring", 0.09)]

An image is resized so its short side is the CLIP's input size and centre-cropped (CLIP's
preprocessing); each class is scored by the method's `image_scores` against the vocabulary's class
rows (the synonym mean of the template ensemble): for PACL the pooled compatibility φ(x, y_c), for
the other methods CLIP's own cosine of the global image embedding. Probabilities are the softmax of
the scores times the CLIP's learned logit scale, as CLIP's zero-shot classifier.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from zegkit.io import ImageSource, load_image, save_json_atomic, to_tensor
from zegkit.segmenter import Segmenter
from zegkit.train.captions import fit_crop

DEFAULT_BATCH = 16


@dataclass
class Classification:
    """One image's zero-shot classification.

    Attributes:
        class_names: the K class display names.
        scores: (K,) the method's image-class scores (cosines / compatibilities).
        probabilities: (K,) softmax over the classes of the scores times CLIP's logit scale.
    """

    class_names: list[str]
    scores: np.ndarray
    probabilities: np.ndarray

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The k most probable classes with their probabilities, best first."""
        order = np.argsort(-self.probabilities, kind="stable")[:k]
        return [(self.class_names[i], float(self.probabilities[i])) for i in order]


@torch.no_grad()
def image_scores(segmenter: Segmenter, images: Tensor | Sequence[Tensor]) -> Tensor:
    """Scores (B, K) of images against the current vocabulary's classes.

    Args:
        images: (B, 3, H, W), or B tensors (3, H_b, W_b) of any sizes, values in [0, 1].

    Raises:
        RuntimeError: no vocabulary set.
        ValueError: images of another layout.
    """
    text = segmenter._require_text()
    for image in images:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"images must be (3, H, W) each, in [0, 1]; got one of shape "
                             f"{tuple(image.shape)}.")
    backbone, method = segmenter.backbone, segmenter.method
    crops = torch.stack([fit_crop(image.cpu(), backbone.image_size) for image in images])
    pixels = method.normalize(backbone, crops.to(backbone.device))
    return method.image_scores(backbone, pixels, text.embeddings).float().cpu()


def classify(segmenter: Segmenter, images: Sequence[ImageSource],
             classes: Sequence[str] | None = None,
             batch_size: int = DEFAULT_BATCH) -> list[Classification]:
    """Classify images (paths, PIL images or arrays) among `classes` (or the current vocabulary).

    Raises:
        ValueError: bad classes or images (see `Segmenter.set_vocabulary`, `zegkit.io`).
    """
    if classes is not None:
        segmenter.set_vocabulary(classes)
    text = segmenter._require_text()
    scale = float(segmenter.backbone.model.logit_scale.exp())
    results = []
    for first in range(0, len(images), batch_size):
        loaded = [to_tensor(load_image(image)) for image in images[first:first + batch_size]]
        scores = image_scores(segmenter, loaded)
        probabilities = (scale * scores).softmax(dim=1)
        results += [Classification(list(text.class_names), s.numpy(), p.numpy())
                    for s, p in zip(scores, probabilities, strict=True)]
    return results


# ---- command line (`zegkit classify`) ---------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `zegkit classify`: images, classes, output, and the model flags of segment."""
    from zegkit.cli import add_model_arguments

    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    classes = parser.add_mutually_exclusive_group(required=True)
    classes.add_argument("--classes", help='class names, comma-separated; synonyms separated by '
                         '";", e.g. "cat; kitten, dog"')
    classes.add_argument("--classes-file", type=Path,
                         help="file with one class per line (synonyms separated by ';' or ',')")
    parser.add_argument("--top", type=int, default=5,
                        help="classes printed per image (default: 5)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file with every image's scores and probabilities (default: "
                        "none)")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> None:
    """Run `zegkit classify` with parsed arguments."""
    from zegkit.cli import build_segmenter, collect_images, parse_class_list
    from zegkit.text import parse_classes, read_class_file

    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}.")
    classes = (read_class_file(args.classes_file) if args.classes_file
               else parse_class_list(args.classes))
    parse_classes(classes)  # validate before loading anything heavy
    paths = collect_images(args.inputs)
    segmenter = build_segmenter(args)
    results = classify(segmenter, paths, classes)
    for path, result in zip(paths, results, strict=True):
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in result.top(args.top)))
    if args.output is not None:
        record = {"settings": segmenter.settings(), "images": [
            {"image": str(path), "scores": dict(zip(r.class_names, map(float, r.scores),
                                                    strict=True)),
             "probabilities": dict(zip(r.class_names, map(float, r.probabilities),
                                       strict=True))}
            for path, r in zip(paths, results, strict=True)]}
        save_json_atomic(record, args.output)
        print(f"Saved {args.output}")
