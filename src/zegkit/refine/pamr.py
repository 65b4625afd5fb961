"""PAMR, the ``"pamr"`` refiner: scores propagated along colour-similar neighbours.

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
keeps probabilities summing to 1. So PAMR refines a `DenseScores`' values and keeps its
activation: after SCLIP / NACLIP it refines their cosine logits before the softmax, as their code
does. The image's per-channel affine normalisation cancels in the ratio, so [0, 1] pixels and
CLIP-normalised pixels give the same weights (up to the 1e-8).

Deviations from the reference code: the neighbours' scores are accumulated one shift at a time
instead of being stacked, so memory stays at about two copies of the scores for any number of
dilations; the arithmetic runs in float32 and the result is cast back to the scores' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zegkit.refine.base import check_refiner_inputs
from zegkit.scores import DenseScores

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


class PAMR(nn.Module):
    """Pixel-adaptive mask refinement (no parameters; see the module docstring).

    Args:
        num_iter: propagation steps (default 10, as NACLIP and the paper); 0 returns the scores
            as they are.
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

    def forward(self, images: Tensor, scores: DenseScores) -> DenseScores:
        """Refine the score values along the colour edges of ``images``.

        Args:
            images: B x 3 x H x W colours, [0, 1] or CLIP-normalised.
            scores: B x R x H x W dense scores (logits or probabilities).

        Returns:
            The refined scores: same rows, same activation (logits stay logits), same dtype.

        Raises:
            ValueError: the images and scores do not belong together (see
                `check_refiner_inputs`).
        """
        check_refiner_inputs(images, scores)
        size = (images.shape[-2], images.shape[-1])
        mask = scores.values.float()
        weights = local_affinity(images, self.dilations).unsqueeze(2)  # B x P x 1 x H x W
        for _ in range(self.num_iter):
            mask = self._propagate(mask, weights, size)
        return scores.with_values(mask.to(scores.values.dtype))

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
