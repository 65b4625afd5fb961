"""Training augmentation as MMSegmentation 0.x pipelines do it for ZegCLIP, in plain torch.

ZegCLIP's configs (``configs/_base_/datasets/*_512x512.py``) train with::

    Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0))     # keep_ratio
    RandomCrop(crop_size=(512, 512), cat_max_ratio=0.75)
    RandomFlip(prob=0.5)                                       # horizontal
    PhotoMetricDistortion()
    Normalize(...)                                             # left to the method
    Pad(size=(512, 512), pad_val=0, seg_pad_val=255)

`augment` reproduces these steps with mmseg's semantics: the resize target is ``scale * ratio``
and the image is rescaled to fit inside it keeping its aspect ratio (``mmcv.rescale_size``:
factor = min(long / long side, short / short side), sizes rounded half up); the crop box is
redrawn up to 10 times while one class covers >= `cat_max_ratio` of the crop's non-ignored
pixels, or the crop holds a single class (mmseg keeps the last box drawn); photometric distortion
applies random brightness, then contrast either before or after saturation and hue (a coin picks
the order), each step with probability 1/2. Images are bilinear (no antialiasing, as cv2's
INTER_LINEAR), labels nearest.

Why no library: kornia and albumentations have resize, crop, flip and colour jitter, but neither
has mmseg's `cat_max_ratio` crop rejection nor its PhotoMetricDistortion (value ranges in uint8
units, the random contrast position), and albumentations needs OpenCV. What is needed is small and
exact in torch. Every random number comes from the `numpy.random.Generator` passed in, so a draw
is a pure function of that generator's seed (see `zegkit.train.data.draw_rng`).

Deviations, all small: pixel values are kept on the 0..255 integer grid between steps as mmseg's
uint8 arrays are (brightness/contrast truncate as ``astype(np.uint8)`` does), but the HSV round
trip is computed in float and rounded, approximating cv2's uint8 HSV conversion. Padding happens
here, before normalisation, with `image_pad` (default black); mmseg pads after ``Normalize``, so
its 0 is the mean colour: set ``image_pad`` to the normalisation mean (in [0, 1]) to match.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from zegkit.data.base import IGNORE_INDEX

# mmseg PhotoMetricDistortion defaults (mmseg/datasets/pipelines/transforms.py), uint8 units.
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18  # in OpenCV's uint8 hue units (degrees / 2), so +-36 degrees
HUE_PERIOD = 180  # OpenCV's uint8 hue wraps at 180 (= 360 degrees)
# mmseg RandomCrop: how many times a crop box is redrawn while the class check fails.
CROP_TRIES = 10
MAX_PIXEL = 255.0


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentation of one training recipe; defaults are ZegCLIP's 512 configs."""

    scale: tuple[int, int] | None = (2048, 512)
    """(long, short) side bound of mmseg's Resize before the random ratio; None: no resize."""
    ratio_range: tuple[float, float] = (0.5, 2.0)
    """The resize target is ``scale * ratio``, ratio uniform in this range."""
    crop_size: tuple[int, int] = (512, 512)
    """(H, W) of every training item: random crop to it, then pad up to it."""
    cat_max_ratio: float = 0.75
    """Redraw a crop where one class has >= this share of non-ignored pixels; 1.0: off."""
    crop_tries: int = CROP_TRIES
    """How many times a rejected crop box is redrawn (mmseg: 10; the last box is kept)."""
    flip_prob: float = 0.5
    """Probability of a horizontal flip (image and mask together)."""
    photometric: bool = True
    """Apply mmseg's PhotoMetricDistortion (the four settings below)."""
    brightness_delta: float = BRIGHTNESS_DELTA
    """Brightness offset uniform in [-delta, delta], uint8 units."""
    contrast_range: tuple[float, float] = CONTRAST_RANGE
    """Contrast factor range."""
    saturation_range: tuple[float, float] = SATURATION_RANGE
    """Saturation factor range (on HSV saturation in uint8 units)."""
    hue_delta: int = HUE_DELTA
    """Hue offset, an integer in [-delta, delta) (numpy randint), OpenCV uint8 hue units."""
    image_pad: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """RGB in [0, 1] for padded image pixels (see the module docstring for mmseg's value)."""
    ignore_index: int = IGNORE_INDEX
    """Label of padded pixels, and the label not counted by the cat_max_ratio check."""

    def __post_init__(self) -> None:
        if self.scale is not None and (len(self.scale) != 2 or min(self.scale) < 1):
            raise ValueError(
                f"scale must be (long, short) positive ints or None, got {self.scale}."
            )
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got "
                             f"{self.ratio_range}.")
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be (H, W) positive ints, got {self.crop_size}.")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1] (1 turns the check off), got "
                             f"{self.cat_max_ratio}.")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}.")

    @classmethod
    def at_crop(cls, crop: int, **overrides) -> AugmentConfig:
        """ZegCLIP's augmentation scaled to square `crop` crops: scale (4 * crop, crop), as
        (2048, 512) is for 512 crops; e.g. ``AugmentConfig.at_crop(224)`` for 224 synthetic
        scenes."""
        return cls(scale=(4 * crop, crop), crop_size=(crop, crop), **overrides)


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(H, W) after mmcv's keep-ratio rescale to fit inside `scale` = (long, short) bounds."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def random_resize(image: torch.Tensor, mask: torch.Tensor, cfg: AugmentConfig,
                  rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """mmseg Resize with ratio_range: image (3, H, W) bilinear, mask (H, W) nearest."""
    if cfg.scale is None:
        return image, mask
    ratio = rng.uniform(*cfg.ratio_range)
    target = (int(cfg.scale[0] * ratio), int(cfg.scale[1] * ratio))
    size = rescale_size(image.shape[-2], image.shape[-1], target)
    if size == tuple(image.shape[-2:]):
        return image, mask
    resized = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    labels = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0]
    return resized.round().clamp(0, MAX_PIXEL), labels.long()


def _crop_box(height: int, width: int, crop: tuple[int, int],
              rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a crop, uniform over the positions that fit (0 where it cannot)."""
    top = int(rng.integers(0, max(height - crop[0], 0) + 1))
    left = int(rng.integers(0, max(width - crop[1], 0) + 1))
    return top, left


def is_balanced(labels: torch.Tensor, cat_max_ratio: float, ignore_index: int) -> bool:
    """mmseg RandomCrop's test: more than one class and none with >= cat_max_ratio of the
    non-ignored pixels."""
    counts = torch.bincount(labels.flatten())  # labels are >= 0 before the zero-shot mapping
    if ignore_index < len(counts):
        counts[ignore_index] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio


def random_crop(image: torch.Tensor, mask: torch.Tensor, cfg: AugmentConfig,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """mmseg RandomCrop with cat_max_ratio; a side shorter than the crop is kept whole."""
    height, width = mask.shape
    ch, cw = cfg.crop_size
    top, left = _crop_box(height, width, cfg.crop_size, rng)
    if cfg.cat_max_ratio < 1:
        for _ in range(cfg.crop_tries):
            if is_balanced(mask[top : top + ch, left : left + cw], cfg.cat_max_ratio,
                           cfg.ignore_index):
                break
            top, left = _crop_box(height, width, cfg.crop_size, rng)
    window = (slice(top, top + ch), slice(left, left + cw))
    return image[(slice(None), *window)], mask[window]


def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 255] -> HSV: hue in degrees [0, 360), saturation [0, 1], value
    [0, 255]."""
    value, brightest = image.max(dim=0)
    spread = value - image.min(dim=0).values
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))
    red, green, blue = image
    hue = torch.stack([(green - blue) / safe, (blue - red) / safe + 2, (red - green) / safe + 4])
    hue = (60 * hue.gather(0, brightest[None])[0]) % 360
    hue = torch.where(spread > 0, hue, torch.zeros_like(hue))
    saturation = torch.where(value > 0, spread / torch.where(value > 0, value, 1), 0)
    return torch.stack([hue, saturation, value])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hsv` (RGB in [0, 255])."""
    hue, saturation, value = hsv
    offsets = torch.tensor([5.0, 3.0, 1.0])[:, None, None]  # R, G, B sectors of the hue circle
    k = (offsets + hue / 60) % 6
    ramp = torch.minimum(torch.minimum(k, 4 - k), torch.ones_like(k)).clamp(min=0)
    return value - value * saturation * ramp


def _scale_values(image: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """mmseg's convert: ``clip(x * alpha + beta, 0, 255).astype(uint8)`` (truncation)."""
    return (image * alpha + beta).clamp(0, MAX_PIXEL).floor()


def _quantised_hsv(image: torch.Tensor) -> torch.Tensor:
    """HSV in OpenCV's uint8 units: hue 0..179 (degrees / 2), saturation and value 0..255."""
    hue, saturation, value = rgb_to_hsv(image)
    return torch.stack([(hue / 2).round() % HUE_PERIOD, (saturation * MAX_PIXEL).round(), value])


def _from_quantised_hsv(hsv: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = hsv
    rgb = hsv_to_rgb(torch.stack([hue * 2, saturation / MAX_PIXEL, value]))
    return rgb.round().clamp(0, MAX_PIXEL)


def photometric_distortion(image: torch.Tensor, cfg: AugmentConfig,
                           rng: np.random.Generator) -> torch.Tensor:
    """mmseg PhotoMetricDistortion on an RGB (3, H, W) image in uint8 units (float tensor)."""
    if rng.integers(2):
        image = _scale_values(image, beta=rng.uniform(-cfg.brightness_delta,
                                                      cfg.brightness_delta))
    contrast_first = bool(rng.integers(2))

    def contrast(image: torch.Tensor) -> torch.Tensor:
        if rng.integers(2):
            return _scale_values(image, alpha=rng.uniform(*cfg.contrast_range))
        return image

    if contrast_first:
        image = contrast(image)
    if rng.integers(2):
        hsv = _quantised_hsv(image)
        hsv[1] = _scale_values(hsv[1], alpha=rng.uniform(*cfg.saturation_range))
        image = _from_quantised_hsv(hsv)
    if rng.integers(2):
        hsv = _quantised_hsv(image)
        hsv[0] = (hsv[0] + int(rng.integers(-cfg.hue_delta, cfg.hue_delta))) % HUE_PERIOD
        image = _from_quantised_hsv(hsv)
    if not contrast_first:
        image = contrast(image)
    return image


def pad_to(image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int],
           image_pad: tuple[float, float, float], ignore_index: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad image (3, h, w) and mask (h, w) at the bottom and right up to `size` (H, W)."""
    height, width = mask.shape
    if (height, width) == tuple(size):
        return image, mask
    padded = torch.tensor(image_pad, dtype=image.dtype)[:, None, None].repeat(1, *size)
    padded[:, :height, :width] = image
    labels = torch.full(size, ignore_index, dtype=mask.dtype)
    labels[:height, :width] = mask
    return padded, labels


def augment(image: torch.Tensor, mask: torch.Tensor, cfg: AugmentConfig,
            rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize, crop, flip, distort and pad one training item.

    Args:
        image: (3, H, W) uint8 RGB, as the dataset readers give it.
        mask: (H, W) int64 class indices, `cfg.ignore_index` for ignore.
        cfg: the augmentation settings.
        rng: the only source of randomness (one per draw, see `zegkit.train.data.draw_rng`).

    Returns:
        image (3, crop H, crop W) float32 RGB in [0, 1] (not normalised), mask (crop H, crop W)
        int64 with padded pixels `cfg.ignore_index`.
    """
    if image.shape[-2:] != mask.shape:
        raise ValueError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)} differ in size.")
    pixels = image.float()
    pixels, mask = random_resize(pixels, mask, cfg, rng)
    pixels, mask = random_crop(pixels, mask, cfg, rng)
    if rng.random() < cfg.flip_prob:
        pixels, mask = pixels.flip(-1), mask.flip(-1)
    if cfg.photometric:
        pixels = photometric_distortion(pixels, cfg, rng)
    pixels = pixels / MAX_PIXEL
    pixels, mask = pad_to(pixels, mask, cfg.crop_size, cfg.image_pad, cfg.ignore_index)
    return pixels.contiguous(), mask.contiguous()
