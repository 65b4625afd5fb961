"""The inference protocol: resize, sliding window, batched crops, stitching, class decisions.

The field's shared protocol (SCLIP's, adopted by ClearCLIP, NACLIP and others): resize so the short
side is S, slide a crop window with a stride, average the overlapping scores, resize them to the
input, optionally refine (PAMR), turn them into class probabilities as the method says
(`zegkit.scores`), argmax, and give pixels whose best class probability is below a threshold the
background label 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

# mmseg's Resize(scale=(2048, S), keep_ratio=True) in the field's configs: the long side is capped.
MAX_LONG_SIDE = 2048
MODES = ("slide", "whole")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Below-threshold pixels go to the class with this display name (the datasets' class 0).
BACKGROUND_NAME = "background"
UINT8_MAX = 255

CropScores = Callable[[Tensor], Tensor]


@dataclass
class InferenceConfig:
    """How images are fed to a method and how its scores become labels.

    Attributes:
        short_side: resize so the short side has this many pixels (None keeps the input size).
            448 suits ViT-B/16 with 224 crops; the SCLIP protocol uses 336 for most datasets.
        mode: "slide" (crop windows, scores averaged where they overlap) or "whole" (one pass over
            the resized image, position embeddings interpolated).
        crop: sliding-window size in pixels (224, CLIP's training size).
        stride: sliding-window step in pixels (112: every pixel is seen by up to 4 crops).
        crop_batch: crops per backbone call; bounds memory (crops of one image and of all images in
            a batch are pooled and cut into chunks of this size).
        background_threshold: pixels whose best class probability is below this get label 0,
            the background class (None: off). For datasets whose class 0 is background.
        refine: refiners applied to the stitched scores at input resolution, after the method's
            own ("none", "pamr", "diffusion", or names joined by "+"; see zegkit.refine).
        precision: "fp32" or "bf16" autocast: faster on GPUs and on CPUs with native bf16
            (AVX-512 BF16, AMX); on AVX2-only CPUs it is emulated and several times slower.
        proposals: ClsCLIP+'s local zoom-in (`zegkit.zoom`): "self" (boxes around the
            components of the method's own mask) or a COCO-style boxes JSON file; applied by
            `Segmenter.segment` and the episode protocols. None: off.
    """

    short_side: int | None = 448
    mode: str = "slide"
    crop: int = 224
    stride: int = 112
    crop_batch: int = 32
    background_threshold: float | None = None
    refine: str = "none"
    precision: str = "fp32"
    proposals: str | None = None

    def __post_init__(self) -> None:
        if self.proposals not in (None, "self") and not Path(self.proposals).expanduser().is_file():
            raise FileNotFoundError(
                f"proposals {self.proposals!r} is neither 'self' nor a boxes file; pass 'self' "
                "or a COCO-style JSON of boxes (see zegkit.zoom)."
            )
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}."
            )
        for name in ("crop", "stride", "crop_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.stride > self.crop:
            raise ValueError(
                f"stride ({self.stride}) larger than crop ({self.crop}) would leave pixels unseen."
            )
        if self.short_side is not None and self.short_side < 1:
            raise ValueError(f"short_side must be positive or None, got {self.short_side}.")
        threshold = self.background_threshold
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"background_threshold is a probability in [0, 1], got {threshold}.")


def precision_context(precision: str, device: str | torch.device) -> AbstractContextManager:
    """Autocast to `precision`'s dtype (a PRECISIONS key) on `device`; fp32 disables it."""
    dtype = PRECISIONS[precision]
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


def resized_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """Size after scaling the short side to `short_side`, the long side capped at MAX_LONG_SIDE."""
    if short_side is None:
        return height, width
    scale = min(short_side / min(height, width), MAX_LONG_SIDE / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (B, C, H, W); antialiased when shrinking."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrinking = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(
        images, size=size, mode="bilinear", align_corners=False, antialias=shrinking
    )


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows covering [0, length): a step of `stride`, the last flush with the
    end (SCLIP / mmseg slide inference). An input shorter than the crop gets one window at 0."""
    steps = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(steps)]


def pad_to(images: Tensor, size: int) -> Tensor:
    """Zero-pad (B, C, H, W) at the bottom/right so both sides are at least `size`.

    Images smaller than a crop are padded, not stretched: in normalised pixels zero is the mean
    colour, and the padded scores are cut away again after the pass.
    """
    pad_h, pad_w = max(size - images.shape[-2], 0), max(size - images.shape[-1], 0)
    return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images


def sliding_crops(padded: Tensor, config: InferenceConfig) -> tuple[Tensor, list[tuple[int, int]]]:
    """The sliding-window crops of images (B, 3, H, W) at least one crop in size (`pad_to`).

    Returns:
        crops (B * n, 3, crop, crop), image-major, and the n window corners (y, x).
    """
    boxes = [
        (y, x)
        for y in window_starts(padded.shape[-2], config.crop, config.stride)
        for x in window_starts(padded.shape[-1], config.crop, config.stride)
    ]
    crops = torch.stack(
        [padded[:, :, y : y + config.crop, x : x + config.crop] for y, x in boxes], 1
    )
    return crops.flatten(0, 1), boxes  # (B * n, 3, crop, crop)


def sliding_scores(crop_scores: CropScores, pixels: Tensor, config: InferenceConfig) -> Tensor:
    """Stitch a method's scores over sliding crops of normalised `pixels` (B, 3, H, W).

    Crops of every image are batched together, `config.crop_batch` per call. Each crop's scores
    are resized to the crop and summed; each pixel is divided by the number of crops covering it.

    Returns:
        scores (B, R, H, W).
    """
    batch, _, height, width = pixels.shape
    padded = pad_to(pixels, config.crop)
    crops, boxes = sliding_crops(padded, config)
    total = count = None
    for start in range(0, crops.shape[0], config.crop_batch):
        chunk = crop_scores(crops[start : start + config.crop_batch]).float()
        chunk = resize(chunk, (config.crop, config.crop))
        if total is None:
            total = padded.new_zeros(batch, chunk.shape[1], *padded.shape[-2:], dtype=torch.float32)
            count = padded.new_zeros(1, 1, *padded.shape[-2:], dtype=torch.float32)
        for offset, crop in enumerate(chunk, start=start):
            image, box = divmod(offset, len(boxes))
            y, x = boxes[box]
            total[image, :, y : y + config.crop, x : x + config.crop] += crop
            if image == 0:
                count[..., y : y + config.crop, x : x + config.crop] += 1
    return (total / count)[..., :height, :width]


def whole_scores(crop_scores: CropScores, pixels: Tensor, patch_size: int) -> Tensor:
    """A method's scores over whole images (B, 3, H, W), resized back to (H, W).

    The input is zero-padded to a multiple of the patch size so every pixel lies in a patch.
    """
    height, width = pixels.shape[-2:]
    pad_h, pad_w = -height % patch_size, -width % patch_size
    scores = crop_scores(F.pad(pixels, (0, pad_w, 0, pad_h))).float()
    scores = resize(scores, (height + pad_h, width + pad_w))
    return scores[..., :height, :width]


def decide_labels(
    probabilities: Tensor, background_threshold: float | None, background: int | None = None
) -> Tensor:
    """Argmax labels (B, H, W) of probabilities (B, K, H, W); pixels whose best probability is
    below the threshold get the `background` class (`background_class` finds it by name).

    Raises:
        ValueError: a threshold without a background index (no class would be a silent guess).
    """
    best, labels = probabilities.max(dim=1)
    if background_threshold is not None:
        if background is None:
            raise ValueError("A background threshold needs the index of the background class.")
        labels[best < background_threshold] = background
    return labels


def background_class(classes: Sequence[Sequence[str]]) -> int:
    """The index of the class named "background" (any case), which below-threshold pixels get.

    Args:
        classes: synonym lists per class, the display name first (`zegkit.text.parse_classes`).

    Raises:
        ValueError: no class is named "background": without one a threshold would hand
            uncertain pixels to a real class.
    """
    for index, names in enumerate(classes):
        if names[0].casefold() == BACKGROUND_NAME:
            return index
    raise ValueError(
        f"A background threshold gives uncertain pixels the class named {BACKGROUND_NAME!r}, "
        f"and these classes have none ({[names[0] for names in classes][:10]}). Add it, e.g. "
        f"--classes \"{BACKGROUND_NAME}, cat, dog\" (it is scored like any class), or drop "
        "the threshold."
    )


def unit_images(images: object) -> Tensor:
    """Check an image batch and return it as float32 (B, 3, H, W) in [0, 1].

    uint8 tensors (0..255) are scaled by 1/255; float tensors must already lie in [0, 1] (an
    image in 0..255 or CLIP-normalised would otherwise be silently misread).

    Raises:
        TypeError: not a torch tensor.
        ValueError: another layout or dtype, no pixels, NaN/inf, or values outside [0, 1].
    """
    if not isinstance(images, Tensor):
        raise TypeError(
            f"images must be a torch.Tensor (B, 3, H, W) in [0, 1], got {type(images).__name__}. "
            "For a path, PIL image or (H, W, 3) array use Segmenter.segment(); or convert: "
            "torch.from_numpy(array).permute(2, 0, 1)[None] / 255."
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
    if images.numel() == 0:
        raise ValueError(f"images have no pixels (shape {tuple(images.shape)}).")
    if images.dtype == torch.uint8:
        return images.float() / UINT8_MAX
    if not images.is_floating_point():
        raise ValueError(
            f"images must be float in [0, 1] or uint8, got dtype {images.dtype}; convert with "
            ".float() / 255 for 0..255 values."
        )
    images = images.float()
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values.")
    low, high = (float(value) for value in torch.aminmax(images))
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"images must hold values in [0, 1], got [{low:g}, {high:g}]: divide 0..255 values "
            "by 255; pass images before normalisation (each method normalises them itself)."
        )
    return images
