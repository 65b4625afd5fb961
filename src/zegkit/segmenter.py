"""The front object: a backbone, a method, a vocabulary and an inference protocol.

Setting a vocabulary computes its text embeddings once (cached); segmenting many images reuses
them. `segment` takes a path, PIL image or array; `probabilities` / `predict` take tensor batches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from zegkit.backbone import DEFAULT_MODEL, ClipBackbone, load_clip
from zegkit.inference import (
    PRECISIONS,
    InferenceConfig,
    class_probabilities,
    decide_labels,
    resize,
    resized_size,
    sliding_logits,
    whole_logits,
)
from zegkit.io import ImageSource, load_image, save_json_atomic, save_png_atomic, to_tensor
from zegkit.methods import Method, create_method
from zegkit.refine import create_refiner
from zegkit.text import TextEmbeddings, encode_vocabulary
from zegkit.viz import class_fractions, label_png, overlay


@dataclass
class Segmentation:
    """One image's result.

    Attributes:
        labels: (H, W) int64 class indices at the input image's resolution.
        class_names: the K class display names, in label order.
        scores: (K,) mean probability of each class over the image.
    """

    labels: np.ndarray
    class_names: list[str]
    scores: np.ndarray

    def fractions(self) -> dict[str, float]:
        """Fraction of pixels labelled with each class."""
        return class_fractions(self.labels, self.class_names, ignore_index=None)

    def overlay(self, image: ImageSource, alpha: float = 0.5) -> Image.Image:
        """The image with the label colours blended over it and a legend beside it."""
        return overlay(image, self.labels, self.class_names, alpha=alpha, ignore_index=None)

    def save(self, out_dir: str | os.PathLike, stem: str, image: ImageSource) -> dict[str, Path]:
        """Write <stem>_labels.png (palette), <stem>_overlay.png and <stem>.json, each atomically.

        Returns:
            The written paths by kind ("labels", "overlay", "json").
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "labels": out / f"{stem}_labels.png",
            "overlay": out / f"{stem}_overlay.png",
            "json": out / f"{stem}.json",
        }
        save_png_atomic(label_png(self.labels, self.class_names), paths["labels"])
        save_png_atomic(self.overlay(image), paths["overlay"])
        summary = {
            "classes": self.class_names,
            "height": int(self.labels.shape[0]),
            "width": int(self.labels.shape[1]),
            "pixel_fractions": self.fractions(),
            "mean_scores": dict(zip(self.class_names, map(float, self.scores), strict=True)),
        }
        save_json_atomic(summary, paths["json"])
        return paths


class Segmenter:
    """Zero-shot segmentation with one backbone, one method and one inference protocol.

    Args:
        backbone: the frozen CLIP.
        method: how dense logits come out of the backbone.
        config: the inference protocol.
        templates: prompt templates for vocabularies ("imagenet", "short", "single" or a list).
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        method: Method,
        config: InferenceConfig | None = None,
        templates: str | Sequence[str] = "imagenet",
    ) -> None:
        self.backbone = backbone
        self.method = method.to(backbone.device).eval()
        self.config = config or InferenceConfig()
        self.templates = templates
        self.refiner = create_refiner(self.config.refine)
        self.method_refiner = self.method.build_refiner(backbone.device)
        self.text: TextEmbeddings | None = None
        self._vocabularies: dict[tuple, TextEmbeddings] = {}

    @property
    def logit_scale(self) -> float:
        """The configured logit scale, else the method's paper default."""
        return self.config.logit_scale or self.method.config.logit_scale

    def set_vocabulary(
        self, classes: Sequence[str], templates: str | Sequence[str] | None = None
    ) -> TextEmbeddings:
        """Use `classes` (each "name" or "name; synonym; ...") from now on; embeds them once.

        Raises:
            ValueError: empty, blank or duplicate class names (see zegkit.text.parse_classes).
        """
        templates = self.templates if templates is None else templates
        key = (tuple(classes), templates if isinstance(templates, str) else tuple(templates))
        if key not in self._vocabularies:
            self._vocabularies[key] = encode_vocabulary(self.backbone, classes, templates=templates)
        self.text = self._vocabularies[key]
        return self.text

    def _require_text(self) -> TextEmbeddings:
        if self.text is None:
            raise RuntimeError(
                "No vocabulary set: call set_vocabulary([...class names...]) or pass classes= to "
                "segment()."
            )
        return self.text

    @torch.no_grad()
    def probabilities(self, images: Tensor) -> Tensor:
        """Class probabilities (B, K, H, W) for images (B, 3, H, W) with values in [0, 1]."""
        text = self._require_text()
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}."
            )
        images = images.to(self.backbone.device, torch.float32)
        height, width = images.shape[-2:]
        size = resized_size(height, width, self.config.short_side)
        pixels = self.backbone.normalize(resize(images, size))
        logits = self._stitched_logits(pixels, text)
        logits = self.refiner(images, resize(logits, (height, width)))
        probabilities = class_probabilities(
            logits, text.class_index, text.num_classes, self.logit_scale
        )
        if self.method_refiner is not None:
            probabilities = self.method_refiner(images, probabilities)
        return probabilities

    def _stitched_logits(self, pixels: Tensor, text: TextEmbeddings) -> Tensor:
        """Cosine logits (B, Q, h, w) over the resized image, by the configured mode."""

        def crop_logits(crops: Tensor) -> Tensor:
            return self.method(self.backbone, crops, text)

        dtype = PRECISIONS[self.config.precision]
        with torch.autocast(pixels.device.type, dtype=dtype, enabled=dtype != torch.float32):
            if self.config.mode == "whole":
                return whole_logits(crop_logits, pixels, self.backbone.patch_size)
            return sliding_logits(crop_logits, pixels, self.config)

    def predict(self, images: Tensor) -> Tensor:
        """Labels (B, H, W) for images (B, 3, H, W) in [0, 1]; background threshold applied."""
        return decide_labels(self.probabilities(images), self.config.background_threshold)

    def segment(self, image: ImageSource, classes: Sequence[str] | None = None) -> Segmentation:
        """Segment one image (path, PIL image or array) with `classes` or the current vocabulary."""
        if classes is not None:
            self.set_vocabulary(classes)
        text = self._require_text()
        probabilities = self.probabilities(to_tensor(load_image(image))[None])
        labels = decide_labels(probabilities, self.config.background_threshold)
        return Segmentation(
            labels=labels[0].cpu().numpy().astype(np.int64),
            class_names=list(text.class_names),
            scores=probabilities[0].mean(dim=(1, 2)).cpu().numpy(),
        )

    __call__ = segment


def load_segmenter(
    method: str = "sclip",
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    inference: InferenceConfig | None = None,
    templates: str | Sequence[str] = "imagenet",
    **overrides: object,
) -> Segmenter:
    """Build a Segmenter from a method name and a CLIP model.

    Args:
        method: a name from `zegkit.list_methods()`.
        model: hub id, local directory, checkpoint file, or "zegkit/tiny-synthetic".
        device: where to run.
        inference: the inference protocol (defaults: InferenceConfig()).
        templates: prompt templates for vocabularies.
        **overrides: InferenceConfig fields (e.g. precision="bf16", refine="pamr") and method
            settings (e.g. logit_scale=50); None values are ignored.

    Raises:
        ValueError: unknown method or setting, listing the valid ones.
    """
    inference_fields = set(InferenceConfig.__dataclass_fields__)
    inference_overrides = {
        k: v for k, v in overrides.items() if k in inference_fields and v is not None
    }
    method_overrides = {k: v for k, v in overrides.items() if k not in inference_fields}
    built_method = create_method(method, **method_overrides)
    config = replace(inference or InferenceConfig(), **inference_overrides)
    return Segmenter(load_clip(model, device=device), built_method, config, templates=templates)
