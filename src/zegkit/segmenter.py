"""The front object: a backbone, a method, a vocabulary and an inference protocol.

Setting a vocabulary computes its text embeddings once (cached); segmenting many images reuses
them. `segment` takes a path, PIL image or array; `probabilities` / `predict` take tensor batches.
`load_segmenter` is the one builder (the API, `zegkit segment` and `zegkit eval` use it): settings
resolve as the user's explicit value > the evaluation protocol's value for this method > the
method's default, and `Segmenter.settings()` records the effective ones with every result.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from zegkit.backbone import DEFAULT_MODEL, ClipBackbone, load_clip
from zegkit.config import check_setting_types
from zegkit.data.protocols import Protocol, get_protocol
from zegkit.hardware import autocast_dtype, check_device, resolve_precision
from zegkit.inference import (
    Decision,
    InferenceConfig,
    StitchedScores,
    background_class,
    decide_labels,
    decide_stitched,
    precision_context,
    resize,
    resized_size,
    sliding_scores,
    unit_images,
    whole_scores,
)
from zegkit.io import (
    ImageSource,
    json_text,
    jsonable,
    load_image,
    png_bytes,
    to_tensor,
    write_files_atomic,
)
from zegkit.methods import Method, create_method, method_name
from zegkit.scores import DenseScores, class_probabilities, row_classes
from zegkit.text import TextEmbeddings, encode_vocabulary, parse_classes
from zegkit.viz import class_fractions, label_png, overlay

INFERENCE_FIELDS = frozenset(f.name for f in fields(InferenceConfig))


@dataclass
class Segmentation:
    """One image's result.

    Attributes:
        labels: (H, W) int64 class indices at the input image's resolution.
        class_names: the K class display names, in label order.
        scores: (K,) mean probability of each class over the image.
        settings: the effective settings that produced it (`Segmenter.settings()`).
    """

    labels: np.ndarray
    class_names: list[str]
    scores: np.ndarray
    settings: dict = field(default_factory=dict)

    def fractions(self) -> dict[str, float]:
        """Fraction of pixels labelled with each class."""
        return class_fractions(self.labels, self.class_names, ignore_index=None)

    def overlay(self, image: ImageSource, alpha: float = 0.5) -> Image.Image:
        """The image with the label colours blended over it and a legend beside it."""
        return overlay(image, self.labels, self.class_names, alpha=alpha, ignore_index=None)

    def output_paths(self, out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
        """Where `save` writes, by kind: <stem>_labels.png, <stem>_overlay.png, <stem>.json."""
        return output_paths(out_dir, stem)

    def save(self, out_dir: str | os.PathLike, stem: str, image: ImageSource) -> dict[str, Path]:
        """Write <stem>_labels.png, <stem>_overlay.png and <stem>.json as one unit.

        All three are rendered in memory first, then written together (`write_files_atomic`):
        a failure (unwritable folder, full disk, Ctrl-C) leaves an earlier result of the same
        stem as it was, and nothing half-written. The label map is a palette PNG for up to 255
        classes and a 16-bit greyscale PNG (pixel value = class index) beyond.

        Returns:
            The written paths by kind ("labels", "overlay", "json").

        Raises:
            ValueError: non-finite scores, or `image` is a path `save` would overwrite.
            OSError: the files could not be written (nothing changed).
        """
        if not np.isfinite(self.scores).all():
            raise ValueError(
                f"The scores of {stem!r} are not finite (NaN or infinity), so its outputs were "
                "not written; check the method settings (logit_scale, --set values)."
            )
        out = Path(out_dir)
        paths = output_paths(out, stem)
        if isinstance(image, (str, os.PathLike)) and any(
            _same_file(path, Path(image)) for path in paths.values()
        ):
            raise ValueError(
                f"Saving {stem!r} into {out} would overwrite its input {image}; choose another "
                "output folder."
            )
        summary = {
            "classes": self.class_names,
            "height": int(self.labels.shape[0]),
            "width": int(self.labels.shape[1]),
            "pixel_fractions": self.fractions(),
            "mean_scores": dict(zip(self.class_names, map(float, self.scores), strict=True)),
            "settings": self.settings,
        }
        contents = {
            paths["labels"]: png_bytes(label_png(self.labels, self.class_names)),
            paths["overlay"]: png_bytes(self.overlay(image)),
            paths["json"]: json_text(summary, paths["json"]).encode("utf-8"),
        }
        out.mkdir(parents=True, exist_ok=True)
        write_files_atomic(contents)
        return paths


def output_paths(out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """The three files `Segmentation.save` writes for `stem` into `out_dir`, by kind."""
    out = Path(out_dir)
    return {
        "labels": out / f"{stem}_labels.png",
        "overlay": out / f"{stem}_overlay.png",
        "json": out / f"{stem}.json",
    }


def _same_file(first: Path, second: Path) -> bool:
    """Whether two paths name one file (resolving links and relative parts)."""
    return first.exists() and second.exists() and os.path.samefile(first, second)


class Segmenter:
    """Zero-shot segmentation with one backbone, one method and one inference protocol.

    Args:
        backbone: the frozen CLIP.
        method: how dense scores come out of the backbone (and how they become probabilities).
        config: the inference protocol.
        templates: prompt templates for vocabularies ("imagenet", "short", "single" or a list);
            None: the method's own (`Method.default_templates`).
        protocol: name of the evaluation protocol the settings came from, for the record.
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        method: Method,
        config: InferenceConfig | None = None,
        templates: str | Sequence[str] | None = None,
        protocol: str | None = None,
    ) -> None:
        self.backbone = backbone
        self.method = method.to(backbone.device).eval()
        self.config = config or InferenceConfig()
        self.templates = method.default_templates() if templates is None else templates
        self.protocol = protocol
        self._check_crop()
        self.refiners = self._build_refiners()
        self._forward = compiled(self.method) if self.config.compile else self.method
        self.text: TextEmbeddings | None = None
        self._background: int | None = None  # class index below-threshold pixels get
        self._vocabularies: dict[tuple, tuple[TextEmbeddings, int | None]] = {}

    def _check_crop(self) -> None:
        """A sliding window must hold at least one of the backbone's patches."""
        patch = self.backbone.patch_size
        if self.config.mode == "slide" and self.config.crop < patch:
            raise ValueError(
                f"crop ({self.config.crop} px) is smaller than the model's patch size ({patch} "
                f"px), so a window holds no patch; use a crop of at least {patch} (CLIP's "
                f"training size {self.backbone.image_size} is usual)."
            )

    def _build_refiners(self) -> list[nn.Module]:
        """The method's own refiners, then the user's `refine` chain, on the backbone's device."""
        from zegkit.refine import create_refiner, parse_refine_chain

        user_chain = [(name, {}) for name in parse_refine_chain(self.config.refine)]
        chain = [*self.method.refiners(), *user_chain]
        dtype = autocast_dtype(self.config.precision, self.backbone.device)
        return [
            create_refiner(name, device=self.backbone.device, dtype=dtype, **options)
            for name, options in chain
        ]

    def settings(self) -> dict[str, object]:
        """The effective settings, JSON-ready: enough to reproduce a result. "resolved_precision"
        is what the precision setting computes in here ("auto" resolved: fp32 or bf16)."""
        from zegkit import __version__

        templates = self.templates
        return {
            "method": method_name(self.method),
            "method_config": jsonable(asdict(self.method.config)),
            "inference": asdict(self.config),
            "resolved_precision": resolve_precision(self.config.precision, self.backbone.device),
            "model": self.backbone.name,
            "templates": templates if isinstance(templates, str) else list(templates),
            "protocol": self.protocol,
            "zegkit_version": __version__,
        }

    def set_vocabulary(
        self, classes: Sequence[str], templates: str | Sequence[str] | None = None
    ) -> TextEmbeddings:
        """Use `classes` (each "name" or "name; synonym; ...") from now on; embeds them once.

        Raises:
            ValueError: empty, blank or duplicate class names (see zegkit.text.parse_classes);
                a background threshold is set but no class is named "background".
        """
        templates = self.templates if templates is None else templates
        key = (tuple(classes), templates if isinstance(templates, str) else tuple(templates))
        if key not in self._vocabularies:
            background = None
            if self.config.background_threshold is not None:
                background = background_class(parse_classes(classes))
            embedded = encode_vocabulary(self.backbone, classes, templates=templates)
            self._vocabularies[key] = embedded, background
        self.text, self._background = self._vocabularies[key]
        return self.text

    def _require_text(self) -> TextEmbeddings:
        if self.text is None:
            raise RuntimeError(
                "No vocabulary set: call set_vocabulary([...class names...]) or pass classes= to "
                "segment()."
            )
        return self.text

    @torch.no_grad()
    def scores(self, images: Tensor) -> DenseScores:
        """The method's refined scores at the images' resolution.

        Args:
            images: (B, 3, H, W), float with values in [0, 1] or uint8 (0..255, scaled by 1/255).

        Raises:
            TypeError: not a torch tensor.
            ValueError: another layout, no pixels, or values outside [0, 1].
        """
        images, stitched = self._stitched(images)
        scores = DenseScores(stitched.values(), self.method.activation(), self.method.rows)
        for refiner in self.refiners:
            scores = refiner(images, scores)
        return scores

    def probabilities(self, images: Tensor) -> Tensor:
        """Class probabilities (B, K, H, W) for images (B, 3, H, W) in [0, 1] (or uint8).

        Raises:
            ValueError: bad images (see `scores`), or the method produced NaN or infinity.
        """
        probabilities = class_probabilities(self.scores(images), self._require_text())
        self._check_finite(probabilities)
        return probabilities

    def _check_finite(self, values: Tensor) -> None:
        """Refuse NaN or infinite scores, naming the method's settings that likely caused them."""
        if not torch.isfinite(values).all():
            raise ValueError(
                f"Method {method_name(self.method)!r} produced NaN or infinite scores with "
                f"settings {jsonable(asdict(self.method.config))}; check them (a logit_scale "
                "must be a positive finite number, e.g. NACLIP's gaussian_std must be > 0)."
            )

    def _stitched(self, images: Tensor) -> tuple[Tensor, StitchedScores]:
        """The checked images (B, 3, H, W) in [0, 1] and the method's stitched scores at their
        resolution, before refinement."""
        text = self._require_text()
        images = unit_images(images).to(self.backbone.device)
        height, width = images.shape[-2:]
        size = resized_size(height, width, self.config.short_side)
        pixels = self.method.normalize(self.backbone, resize(images, size))
        return images, self._stitched_scores(pixels, text).resized((height, width))

    def _stitched_scores(self, pixels: Tensor, text: TextEmbeddings) -> StitchedScores:
        """The method's scores over the resized image, by the configured mode."""

        def crop_scores(crops: Tensor) -> Tensor:
            return self._forward(self.backbone, crops, text)

        with precision_context(self.config.precision, pixels.device):
            if self.config.mode == "whole":
                return whole_scores(crop_scores, pixels, self.backbone.patch_size)
            return sliding_scores(crop_scores, pixels, self.config)

    def predict(self, images: Tensor) -> Tensor:
        """Labels (B, H, W) for images (B, 3, H, W) in [0, 1]; background threshold applied."""
        return self.decision(images).labels

    @torch.no_grad()
    def decision(self, images: Tensor, means: bool = False) -> Decision:
        """Labels (B, H, W) and, with `means`, each class's mean probability (B, K) for images
        (B, 3, H, W) in [0, 1] (or uint8), equal to `decide(probabilities(images))` and its
        mean over the pixels up to float rounding.

        Without refiners the classes are decided a block of lines at a time from the stitched scores
        (`decide_stitched`), so memory does not grow with classes x pixels; refiners need every
        class at full resolution, so with them this goes through `probabilities`.

        Raises:
            ValueError: bad images (see `scores`), or the method produced NaN or infinity.
        """
        if self.refiners:
            probabilities = self.probabilities(images)
            mean = probabilities.mean(dim=(2, 3)) if means else None
            return Decision(self.decide(probabilities), mean)
        text = self._require_text()
        _, stitched = self._stitched(images)
        self._check_finite(stitched.grid)
        rows = row_classes(self.method.rows, stitched.shape[1], text)
        return decide_stitched(stitched, self.method.activation(), rows,
                               self.config.background_threshold, self._background, means)

    def decide(self, probabilities: Tensor) -> Tensor:
        """Labels (B, H, W) of class probabilities (B, K, H, W): the most probable class, or the
        "background" class where that is below the background threshold."""
        self._require_text()
        return decide_labels(probabilities, self.config.background_threshold, self._background)

    def segment(self, image: ImageSource, classes: Sequence[str] | None = None) -> Segmentation:
        """Segment one image (path, PIL image or array) with `classes` or the current vocabulary;
        with ClsCLIP+'s zoom-in when the config names proposals (`zegkit.zoom`)."""
        if classes is not None:
            self.set_vocabulary(classes)
        text = self._require_text()
        if self.config.proposals is not None:
            from zegkit.zoom import zoom_segment

            return zoom_segment(self, image, self.config.proposals)
        decision = self.decision(to_tensor(load_image(image))[None], means=True)
        return Segmentation(
            labels=decision.labels[0].cpu().numpy().astype(np.int64),
            class_names=list(text.class_names),
            scores=decision.mean_probabilities[0].cpu().numpy(),
            settings=self.settings(),
        )

    __call__ = segment


CropForward = Callable[[ClipBackbone, Tensor, TextEmbeddings], Tensor]


def compiled(method: Method) -> CropForward:
    """`method`'s forward through torch.compile, compiled at its first call and reused after;
    the crop batch size is dynamic, so a full batch and the remainder share one graph.

    Raises:
        RuntimeError: torch.compile is not available here (e.g. a Python newer than the
            installed torch supports), or, at the first call, it cannot compile (on a CPU
            it needs a C++ compiler).
    """
    try:
        forward = torch.compile(method)
    except RuntimeError as error:
        raise RuntimeError(
            f"torch.compile is not available with torch {torch.__version__} here ({error}); "
            "run without compile (drop --compile, compile=False)."
        ) from error
    from torch._dynamo import maybe_mark_dynamic
    from torch._dynamo.exc import BackendCompilerFailed

    def run(backbone: ClipBackbone, crops: Tensor, text: TextEmbeddings) -> Tensor:
        maybe_mark_dynamic(crops, 0)
        try:
            return forward(backbone, crops, text)
        except BackendCompilerFailed as error:
            reason = str(error).strip().splitlines()[0][:200]
            raise RuntimeError(
                f"torch.compile could not compile {method_name(method)!r} ({reason}). On a "
                "CPU it needs a C++ compiler (g++ or clang++ on the PATH); or run without "
                "compile (drop --compile, compile=False)."
            ) from error

    return run


def resolve_settings(
    method: str, protocol: Protocol | None, settings: Mapping[str, object]
) -> tuple[dict[str, object], dict[str, object]]:
    """(method settings, inference settings) by precedence: the explicit `settings` (None means
    unset) > the protocol's values for `method` > the defaults (left out: the configs have them).

    Keys of `settings` that are InferenceConfig fields go to inference, all others to the method
    (whose factory rejects unknown ones, listing the valid ones).
    """
    explicit = {key: value for key, value in settings.items() if value is not None}
    inference = dict(protocol.inference_overrides()) if protocol is not None else {}
    method_settings = protocol.settings_for(method) if protocol is not None else {}
    for key, value in explicit.items():
        (inference if key in INFERENCE_FIELDS else method_settings)[key] = value
    return method_settings, inference


def inference_config(values: Mapping[str, object]) -> InferenceConfig:
    """The InferenceConfig of resolved inference settings (`resolve_settings`), their types
    checked first (a string for crop would fail inside its range checks).

    Raises:
        ValueError: a value of the wrong type or out of range.
    """
    check_setting_types(InferenceConfig, values, "The inference")
    return InferenceConfig(**values)


def _recipes_of(method: str) -> list[str]:
    """The names of the training recipes of `method` (for the message of a missing checkpoint)."""
    from zegkit.train.recipes import RECIPES

    return sorted(name for name, recipe in RECIPES.items() if recipe.method == method)


def load_segmenter(
    method: str = "sclip",
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    backbone: ClipBackbone | None = None,
    device: str | torch.device = "cpu",
    tokenizer: str | None = None,
    templates: str | Sequence[str] | None = None,
    protocol: str | Protocol | None = None,
    checkpoint: str | os.PathLike | None = None,
    **settings: object,
) -> Segmenter:
    """Build a Segmenter: the one builder behind the API, `zegkit segment` and `zegkit eval`.

    Args:
        method: a name from `zegkit.list_methods()`.
        model: hub id, local directory, checkpoint file, or "zegkit/tiny-synthetic".
        backbone: an already loaded CLIP to use instead of loading `model`.
        device: where to run.
        tokenizer: tokenizer source for a bare checkpoint file (see `zegkit.backbone.load_clip`).
        templates: prompt templates for vocabularies (None: the method's own).
        protocol: an evaluation protocol (name or object) whose inference settings and values
            for this method apply unless `settings` sets them.
        checkpoint: a trained method's file (`zegkit.methods.checkpoint.save_method`); its
            config is the base the protocol's and explicit settings apply to.
        **settings: InferenceConfig fields (e.g. precision="bf16", refine="pamr") and method
            settings (e.g. logit_scale=50); None values are ignored.

    Raises:
        ValueError: unknown method, protocol or setting, listing the valid ones, or a setting of
            the wrong type or range (all checked before any weights load); a trained method
            without `checkpoint`.
        RuntimeError: a checkpoint made for another method or backbone; a device this machine
            does not have (e.g. "cuda" without CUDA).
    """
    chosen = get_protocol(protocol) if isinstance(protocol, str) else protocol
    method_settings, inference = resolve_settings(method, chosen, settings)
    # Every setting is checked before the weights load (seconds to minutes for a large CLIP).
    config = inference_config(inference)
    if checkpoint is None:
        built = create_method(method, **method_settings)
    else:  # the checkpoint's header and config with the settings, before its tensors
        from zegkit.methods.checkpoint import configure_method, load_trained

        built = configure_method(checkpoint, method=method, **method_settings)
    check_device(device)
    if backbone is None:
        backbone = load_clip(model, device=device, tokenizer_source=tokenizer)
    if checkpoint is not None:
        built = load_trained(built, checkpoint, backbone)
    else:
        built.build(backbone)
        if built.trainable:
            raise ValueError(
                f"Method {method!r} is trained: pass its weights with checkpoint= (CLI: "
                f"--checkpoint runs/<name>/last.safetensors), written by `zegkit train --recipe "
                f"<recipe> --out runs/<name>`; {method}'s recipes: {_recipes_of(method)}."
            )
    return Segmenter(
        backbone,
        built,
        config,
        templates=templates,
        protocol=None if chosen is None else chosen.name,
    )
