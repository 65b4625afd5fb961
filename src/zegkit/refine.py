"""Post-processing of dense class scores, chosen by name: ``REFINERS = {"none", "pamr"}``.

PAMR, Pixel-Adaptive Mask Refinement: Araslanov & Roth, "Single-Stage Semantic Segmentation from
Image Labels", CVPR 2020 (arXiv 2005.08104); code visinf/1-stage-wseg ``models/mods/pamr.py``.
The training-free CLIP segmenters use the same module unchanged as an optional last step:
wangf3014/SCLIP ``pamr.py`` + ``clip_segmentor.py`` (``pamr_stride=(8, 16)``, off by default) and
sinahmr/NACLIP (``pamr_steps=10``, ``pamr_stride=(8, 16)``). They apply it to the stitched
cosine logits, bilinearly resized to the image, before the logit scale and the softmax.

How it works. For every pixel i and each of its 8 neighbours j on a 3 x 3 grid dilated by d (for
every d in ``dilations``; borders replicate the edge pixel), the colour distance, per channel, is
divided by 0.1 x the standard deviation of the colours in i's neighbourhood (the 9 pixels of every
dilation pooled, the centre counted once per dilation, unbiased), then averaged over channels:
``a_ij = -mean_c |I_c(i) - I_c(j)| / (1e-8 + 0.1 * std_c(i))``. One softmax over *all* 8 x len(d)
neighbours together (not per dilation) turns these into weights ``w_ij``. Each iteration replaces
every pixel's scores by the weighted mean of its neighbours' scores (the centre is not among
them): ``m(i) <- sum_j w_ij m(j)``. Because a colour edge gets a near-zero weight, scores stop
spreading at edges and the mask snaps to them.

Logits or probabilities: either. Each step is a convex combination of neighbours, so it commutes
with the logit scale (refining cosine logits, then scaling, equals scaling, then refining) and
keeps probabilities summing to 1. zegkit, like SCLIP, passes logits at image resolution. The
image's per-channel affine normalisation cancels in the ratio, so [0, 1] pixels and CLIP-
normalised pixels give the same weights (up to the 1e-8).

Deviations from the reference code: scores at another size than the image are resized with
``align_corners=False`` (the reference uses True; SCLIP always passes matching sizes); the
neighbours' scores are accumulated one shift at a time instead of being stacked, so memory stays
at about two copies of the scores for any number of dilations; the arithmetic runs in float32 and
the result is cast back to the scores' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAMR_ITERATIONS = 10  # NACLIP configs (pamr_steps=10); the paper's PAMR_ITER = 10
PAMR_DILATIONS = (8, 16)  # SCLIP / NACLIP pamr_stride; the paper uses (1, 2, 4, 8, 12, 24)
STD_FACTOR = 0.1  # colour distances are divided by 0.1 x the local std (reference pamr.py)
STD_EPS = 1e-8  # added to that denominator (reference pamr.py)

# The 8 neighbours of a 3 x 3 window as (row, column) steps, in the reference kernel's order.
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _shift(padded: Tensor, dy: int, dx: int, pad: int, size: tuple[int, int]) -> Tensor:
    """View of ``padded`` (edge-replicated by ``pad``): each pixel's neighbour at (dy, dx)."""
    h, w = size
    top, left = pad + dy, pad + dx
    return padded[..., top : top + h, left : left + w]


def local_affinity(image: Tensor, dilations: Sequence[int]) -> Tensor:
    """PAMR's neighbour weights from image colours.

    Args:
        image: B x C x H x W colours (any real dtype; computed in float32).
        dilations: the spacings d of the 3 x 3 neighbourhoods.

    Returns:
        B x P x H x W weights, P = 8 x len(dilations), ordered dilation-major then as
        ``NEIGHBOURS``; they are non-negative and sum to 1 over P.
    """
    image = image.float()
    size = (image.shape[-2], image.shape[-1])
    window, neighbours = [], []  # each entry B x C x H x W
    for d in dilations:
        padded = F.pad(image, (d, d, d, d), mode="replicate")
        shifted = [_shift(padded, dy * d, dx * d, d, size) for dy, dx in NEIGHBOURS]
        neighbours += shifted
        window += [*shifted, image]
    spread = torch.stack(window, dim=2).std(dim=2)  # B x C x H x W, unbiased as in the reference
    distance = torch.stack([(n - image).abs() for n in neighbours], dim=2)  # B x C x P x H x W
    logits = -(distance / (STD_EPS + STD_FACTOR * spread).unsqueeze(2)).mean(dim=1)  # B x P x H x W
    return logits.softmax(dim=1)


def _check_pair(image: Tensor, scores: Tensor) -> None:
    if image.dim() != 4 or scores.dim() != 4:
        raise ValueError(
            f"Refinement needs an image B x 3 x H x W and scores B x K x h x w; got shapes "
            f"{tuple(image.shape)} and {tuple(scores.shape)}. Add a batch dimension with "
            "unsqueeze(0) for a single image."
        )
    if image.shape[0] != scores.shape[0]:
        raise ValueError(
            f"The image batch ({image.shape[0]}) and the score batch ({scores.shape[0]}) differ; "
            "pass one image per score map."
        )
    if not scores.is_floating_point():
        raise ValueError(
            f"Scores must be a float tensor (logits or probabilities), got {scores.dtype}."
        )


class NoRefine(nn.Module):
    """The ``"none"`` refiner: returns the scores unchanged (after the same shape checks)."""

    def forward(self, image: Tensor, scores: Tensor) -> Tensor:
        """Return ``scores`` as they are.

        Args:
            image: B x 3 x H x W.
            scores: B x K x h x w logits or probabilities.
        """
        _check_pair(image, scores)
        return scores


class PAMR(nn.Module):
    """Pixel-adaptive mask refinement (no parameters; see the module docstring).

    Args:
        num_iter: propagation steps (default 10, as NACLIP and the paper); 0 returns the scores
            resized to the image.
        dilations: spacings of the 3 x 3 neighbourhoods in pixels of the image (default (8, 16),
            as SCLIP / NACLIP at image resolution).
    """

    def __init__(self, num_iter: int = PAMR_ITERATIONS, dilations: Sequence[int] = PAMR_DILATIONS):
        super().__init__()
        if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 0:
            raise ValueError(f"PAMR num_iter must be an integer >= 0, got {num_iter!r}.")
        dilations = tuple(dilations)
        if not dilations or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dilations
        ):
            raise ValueError(
                f"PAMR dilations must be a non-empty sequence of integers >= 1, got {dilations!r} "
                f"(SCLIP uses {PAMR_DILATIONS})."
            )
        self.num_iter = num_iter
        self.dilations = dilations

    def extra_repr(self) -> str:
        return f"num_iter={self.num_iter}, dilations={self.dilations}"

    def forward(self, image: Tensor, scores: Tensor) -> Tensor:
        """Refine ``scores`` along the colour edges of ``image``.

        Args:
            image: B x 3 x H x W colours, [0, 1] or CLIP-normalised (any channel count works).
            scores: B x K x h x w logits or probabilities; resized (bilinear) to H x W if h x w
                differs.

        Returns:
            B x K x H x W refined scores, same kind (logits stay logits) and dtype as ``scores``.

        Raises:
            ValueError: the shapes do not describe a batch of images and score maps.
        """
        _check_pair(image, scores)
        size = (image.shape[-2], image.shape[-1])
        dtype = scores.dtype
        mask = scores.float()
        if mask.shape[-2:] != size:
            mask = F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
        weights = local_affinity(image, self.dilations).unsqueeze(2)  # B x P x 1 x H x W
        for _ in range(self.num_iter):
            mask = self._propagate(mask, weights, size)
        return mask.to(dtype)

    def _propagate(self, mask: Tensor, weights: Tensor, size: tuple[int, int]) -> Tensor:
        """One step: each pixel becomes the affinity-weighted mean of its neighbours."""
        out = torch.zeros_like(mask)  # B x K x H x W
        p = 0
        for d in self.dilations:
            padded = F.pad(mask, (d, d, d, d), mode="replicate")
            for dy, dx in NEIGHBOURS:
                out.addcmul_(_shift(padded, dy * d, dx * d, d, size), weights[:, p])
                p += 1
        return out


REFINERS: dict[str, type[nn.Module]] = {"none": NoRefine, "pamr": PAMR}

_DESCRIPTIONS = {
    "none": "no refinement",
    "pamr": "PAMR: scores propagated along colour-similar neighbours (Araslanov & Roth 2020)",
}


def list_refiners() -> dict[str, str]:
    """Refiner names with a one-line description each."""
    return {name: _DESCRIPTIONS[name] for name in sorted(REFINERS)}


def create_refiner(name: str, **kwargs) -> nn.Module:
    """Build the refiner called ``name`` (a key of ``REFINERS``) with keyword overrides.

    ``None`` values are dropped so that unset CLI flags keep the defaults.

    Raises:
        ValueError: unknown name (the valid ones are listed) or invalid arguments.
    """
    if name not in REFINERS:
        raise ValueError(f"Unknown refiner {name!r}; choose one of {sorted(REFINERS)}.")
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    try:
        return REFINERS[name](**kwargs)
    except TypeError as error:
        raise ValueError(f"Bad arguments {sorted(kwargs)} for refiner {name!r}: {error}") from None


def refine(name: str, image: Tensor, scores: Tensor, **kwargs) -> Tensor:
    """Refine ``scores`` (B x K x h x w logits or probabilities) with the refiner ``name``.

    Args:
        name: a key of ``REFINERS`` ("none", "pamr").
        image: B x 3 x H x W, the image the scores belong to.
        scores: B x K x h x w.
        **kwargs: the refiner's options, e.g. ``num_iter=10, dilations=(8, 16)`` for PAMR.

    Returns:
        The refined scores: B x K x H x W for PAMR, ``scores`` itself for "none".
    """
    return create_refiner(name, **kwargs)(image, scores)
