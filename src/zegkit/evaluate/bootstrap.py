"""Scene-bootstrap 95% intervals for mIoU, and for the mIoU difference between two methods.

Images (scenes), not pixels, are the independent units of a segmentation benchmark: pixels of
one image are strongly correlated. So an interval resamples images with replacement (Efron's
bootstrap, percentile method): each of `num_samples` resamples draws N of the N images, sums
their per-class intersection and union counts and computes mIoU from the sums by the one
definition the point estimate uses (`metrics.iou_summary`: a class absent from both ground truth
and prediction in a resample is left out of that resample's mean). The interval is the 2.5th and
97.5th percentile of the resampled values.

Two methods evaluated on the same images are compared by resampling the images jointly (the
same draws for both), which cancels the variation both methods share (an image that is hard for
one is usually hard for the other) and gives a much tighter interval for the difference than the
two separate intervals suggest.

Counts stay integers until the per-class ratio: the resampled sums are exact (a float64 product
of integers below 2**53), so the intervals are identical however the counts were sharded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from zegkit.evaluate.metrics import class_iou, iou_summary, optional_float

CONFIDENCE = 0.95
TAILS = ((1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2)  # the percentiles bounding the interval
CI_SUFFIX = "_ci95"  # result key of a metric's interval: "mIoU" -> "mIoU_ci95"


@dataclass(frozen=True)
class ImageStats:
    """Per-image, per-class intersection and union pixel counts of one evaluation.

    Row i is image i; summing the rows gives the dataset's counts (the confusion matrix's).
    """

    intersection: Tensor  # (N, K) int64
    union: Tensor  # (N, K) int64

    @classmethod
    def from_result(cls, result: Mapping) -> ImageStats:
        """The per-image counts an `evaluate(..., bootstrap=N)` result holds under "per_image".

        Raises:
            ValueError: the result has none (it was evaluated without a bootstrap).
        """
        if "per_image" not in result:
            raise ValueError(
                "This result has no per-image counts; evaluate with bootstrap=N (zegkit eval "
                "--bootstrap N) to keep them."
            )
        per_image = result["per_image"]
        return cls(torch.tensor(per_image["intersection"], dtype=torch.int64),
                   torch.tensor(per_image["union"], dtype=torch.int64))

    def to_dict(self) -> dict[str, list]:
        """{"intersection": N x K lists, "union": N x K lists}, as a JSON result stores them."""
        return {"intersection": self.intersection.tolist(), "union": self.union.tolist()}


def resample_weights(num_images: int, num_samples: int, seed: int) -> Tensor:
    """How often each image is drawn in each resample (images drawn with replacement).

    Args:
        num_images: N.
        num_samples: B resamples.
        seed: seeds the draws; the same (N, B, seed) gives the same weights everywhere.

    Returns:
        (B, N) float64 counts; each row sums to N.
    """
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(num_images, (num_samples, num_images), generator=generator)
    weights = torch.zeros(num_samples, num_images, dtype=torch.float64)
    return weights.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))


def resampled_summary(
    stats: ImageStats,
    weights: Tensor,
    seen: Sequence[int] | None = None,
    unseen: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """`iou_summary` (mIoU[, mIoU(S), mIoU(U), hIoU]) of every resample.

    Args:
        stats: the per-image counts.
        weights: (B, N) from `resample_weights`.
        seen, unseen: the zero-shot split, as in `metrics`.

    Returns:
        {metric: (B,) float64, NaN where a resample leaves the metric undefined}.
    """
    intersection = weights @ stats.intersection.double()  # (B, K)
    union = weights @ stats.union.double()  # (B, K)
    return iou_summary(class_iou(intersection, union), seen, unseen)


def _interval(values: Tensor) -> list[float] | None:
    """The percentile interval of resampled values (undefined resamples left out)."""
    if torch.isnan(values).all():
        return None
    bounds = torch.nanquantile(values, torch.tensor(TAILS, dtype=values.dtype))
    return [float(bound) for bound in bounds]


def _check(stats: ImageStats, num_samples: int) -> None:
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a whole number >= 1 (e.g. 1000); got {num_samples}.")
    if stats.intersection.ndim != 2 or stats.intersection.shape != stats.union.shape:
        raise ValueError(
            f"Per-image counts must be two N x K tensors; got intersection "
            f"{tuple(stats.intersection.shape)} and union {tuple(stats.union.shape)}."
        )
    if stats.intersection.shape[0] == 0:
        raise ValueError("A bootstrap needs at least one image; these counts hold none.")


def bootstrap_intervals(
    stats: ImageStats,
    num_samples: int,
    seed: int = 0,
    seen: Sequence[int] | None = None,
    unseen: Sequence[int] | None = None,
) -> dict[str, list[float] | None]:
    """95% scene-bootstrap intervals of mIoU (and mIoU(S), mIoU(U), hIoU on a split).

    Args:
        stats: per-image counts of one evaluation.
        num_samples: resamples (1000 is usual; the interval's ends settle to about 0.1 then).
        seed: seeds the resampling, so the interval is reproducible.
        seen, unseen: the zero-shot split, as in `metrics`.

    Returns:
        {"mIoU_ci95": [low, high][, "mIoU(S)_ci95", "mIoU(U)_ci95", "hIoU_ci95"]}, in percent;
        None where no resample defines the metric.

    Raises:
        ValueError: num_samples < 1, or the counts are not two N x K tensors with N >= 1.
    """
    _check(stats, num_samples)
    weights = resample_weights(stats.intersection.shape[0], num_samples, seed)
    summary = resampled_summary(stats, weights, seen, unseen)
    return {key + CI_SUFFIX: _interval(values) for key, values in summary.items()}


def bootstrap_difference(
    first: ImageStats,
    second: ImageStats,
    num_samples: int,
    seed: int = 0,
    seen: Sequence[int] | None = None,
    unseen: Sequence[int] | None = None,
) -> dict[str, dict]:
    """Paired scene bootstrap of first − second: the difference of each metric, with its interval.

    Both methods must have been evaluated on the same images, in the same order, with the same
    classes; every resample draws the same images for both.

    Args:
        first, second: per-image counts of the two evaluations.
        num_samples, seed, seen, unseen: as in `bootstrap_intervals`.

    Returns:
        {"mIoU": {"difference": first − second, "ci95": [low, high]}[, "mIoU(S)": ..., ...]},
        in percentage points; None where a metric is undefined.

    Raises:
        ValueError: the counts are not for the same images and classes, or as in
            `bootstrap_intervals`.
    """
    for stats in (first, second):
        _check(stats, num_samples)
    if first.intersection.shape != second.intersection.shape:
        raise ValueError(
            f"The two evaluations have per-image counts of shape "
            f"{tuple(first.intersection.shape)} and {tuple(second.intersection.shape)}; a paired "
            f"comparison needs both methods evaluated on the same images and classes."
        )
    weights = resample_weights(first.intersection.shape[0], num_samples, seed)
    samples = [resampled_summary(stats, weights, seen, unseen) for stats in (first, second)]
    points = [iou_summary(class_iou(s.intersection.sum(0), s.union.sum(0)), seen, unseen)
              for s in (first, second)]
    return {
        key: {"difference": optional_float(points[0][key] - points[1][key]),
              "ci95": _interval(samples[0][key] - samples[1][key])}
        for key in points[0]
    }


def compare_results(
    first: Mapping, second: Mapping, num_samples: int = 1000, seed: int = 0
) -> dict[str, dict]:
    """`bootstrap_difference` of two `evaluate(..., bootstrap=N)` results (first − second).

    E.g. ``compare_results(results["maskclip"], results["naive"])["mIoU"]`` gives
    {"difference": 3.2, "ci95": [1.1, 5.0]}: MaskCLIP − naive = +3.2 [1.1, 5.0].

    Args:
        first, second: results of `evaluate` / `run_eval_all` on the same dataset, holding
            their per-image counts.
        num_samples, seed: as in `bootstrap_intervals`.

    Raises:
        ValueError: a result lacks per-image counts, or the two are for different classes or
            splits.
    """
    for key in ("class_names", "seen", "unseen"):
        if first.get(key) != second.get(key):
            raise ValueError(
                f"The two results differ in {key!r}; compare evaluations of the same dataset "
                f"and split."
            )
    return bootstrap_difference(ImageStats.from_result(first), ImageStats.from_result(second),
                                num_samples, seed, first.get("seen"), first.get("unseen"))
