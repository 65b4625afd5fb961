"""Confusion matrices and the metrics computed from them (pure functions, no I/O).

Everything is accumulated in one K x K integer confusion matrix (rows: ground truth, columns:
prediction; pixels whose ground truth is the ignore index are left out), so memory does not grow
with the dataset and sharded runs combine by summing matrices. Metrics follow MMSegmentation's
``IoUMetric`` (``mmseg/evaluation/metrics/iou_metric.py``): per-class IoU = TP / (TP + FP + FN),
Acc = TP / (TP + FN), aAcc = all TP / all labelled pixels; a class whose IoU is undefined (no
ground-truth and no predicted pixel) is left out of the means (nan-mean). On zero-shot splits,
mIoU(S) and mIoU(U) average the seen and unseen classes and hIoU is their harmonic mean
(ZS3Net, arXiv 1906.00817). All values are percentages.

`iou_summary` is the one definition of mIoU, mIoU(S), mIoU(U) and hIoU; `metrics` and the
bootstrap intervals (`zegkit.evaluate.bootstrap`) both call it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from zegkit.data.base import IGNORE_INDEX, display_name

PERCENT = 100.0


def confusion_matrix(
    prediction: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Count (ground truth, prediction) pairs over the labelled pixels.

    Args:
        prediction: integer labels, any shape.
        target: integer ground truth of the same shape; `ignore_index` marks unlabelled pixels.
        num_classes: K.
        ignore_index: the ground-truth value to skip.

    Returns:
        (K, K) int64 matrix; entry [t, p] counts pixels of class t predicted as p.

    Raises:
        ValueError: shapes differ, or a prediction on a labelled pixel is outside [0, K).
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"Prediction shape {tuple(prediction.shape)} differs from ground truth shape "
            f"{tuple(target.shape)}; predictions must be at the mask's resolution."
        )
    labelled = target != ignore_index
    truth = target[labelled].long()
    predicted = prediction[labelled].long()
    if predicted.numel() and (predicted.min() < 0 or predicted.max() >= num_classes):
        bad = predicted[(predicted < 0) | (predicted >= num_classes)].unique()[:5].tolist()
        raise ValueError(
            f"Predicted labels {bad} are outside the {num_classes} classes; the segmenter's "
            f"vocabulary must be the dataset's class list."
        )
    if truth.numel() and (truth.min() < 0 or truth.max() >= num_classes):
        bad = truth[(truth < 0) | (truth >= num_classes)].unique()[:5].tolist()
        raise ValueError(f"Ground-truth labels {bad} are outside the {num_classes} classes.")
    counts = torch.bincount(truth * num_classes + predicted, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def intersection_and_union(conf: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class intersection (TP) and union (TP + FP + FN) pixel counts of a confusion matrix.

    Both are additive over images, so the counts of any set of images are the sums of theirs.

    Args:
        conf: (K, K) counts, rows ground truth, columns prediction.

    Returns:
        (intersection, union), each (K,) int64.
    """
    conf = conf.to(torch.int64)
    true_positive = conf.diagonal()
    return true_positive, conf.sum(dim=1) + conf.sum(dim=0) - true_positive


def _percent(numerator: Tensor, denominator: Tensor) -> Tensor:
    """100 * numerator / denominator in float64; NaN where the denominator is 0 (undefined)."""
    ratio = PERCENT * numerator.double() / denominator.double()
    return torch.where(denominator > 0, ratio, torch.nan)


def class_iou(intersection: Tensor, union: Tensor) -> Tensor:
    """Per-class IoU in percent, NaN for a class with no ground-truth and no predicted pixel.

    Args:
        intersection: (..., K) pixel counts.
        union: (..., K) pixel counts.

    Returns:
        (..., K) float64.
    """
    return _percent(intersection, union)


def class_mean(values: Tensor, classes: Sequence[int] | None = None) -> Tensor:
    """Mean over the classes (last dim) of the defined values; NaN (undefined) ones are left out.

    Args:
        values: (..., K) per-class values, NaN where undefined.
        classes: the class indices to average (default: all).

    Returns:
        (...) float64; NaN where no chosen class is defined.
    """
    if classes is not None:
        values = values[..., list(classes)]
    return values.nanmean(dim=-1)


def _harmonic(seen: Tensor, unseen: Tensor) -> Tensor:
    total = seen + unseen
    return torch.where(total == 0, 0.0, 2.0 * seen * unseen / total)


def harmonic_mean(seen: float | None, unseen: float | None) -> float | None:
    """hIoU = 2 S U / (S + U) (0 when both are 0; None when either is undefined)."""
    if seen is None or unseen is None:
        return None
    as_tensor = torch.tensor([seen, unseen], dtype=torch.float64)
    return float(_harmonic(as_tensor[0], as_tensor[1]))


def iou_summary(
    iou: Tensor, seen: Sequence[int] | None = None, unseen: Sequence[int] | None = None
) -> dict[str, Tensor]:
    """mIoU and, on a zero-shot split, mIoU(S), mIoU(U) and hIoU: the one definition of each.

    Args:
        iou: (..., K) per-class IoU in percent, NaN where undefined (`class_iou`).
        seen: seen class indices; with `unseen` given, default: every class not unseen.
        unseen: unseen class indices; None for no split.

    Returns:
        {"mIoU"[, "mIoU(S)", "mIoU(U)", "hIoU"]: (...) float64, NaN where undefined}.
    """
    summary = {"mIoU": class_mean(iou)}
    if unseen is not None:
        seen = _default_seen(seen, unseen, iou.shape[-1])
        summary["mIoU(S)"] = class_mean(iou, seen)
        summary["mIoU(U)"] = class_mean(iou, unseen)
        summary["hIoU"] = _harmonic(summary["mIoU(S)"], summary["mIoU(U)"])
    return summary


def _default_seen(seen: Sequence[int] | None, unseen: Sequence[int], num_classes: int) -> list:
    return [i for i in range(num_classes) if i not in unseen] if seen is None else list(seen)


def optional_float(value: Tensor) -> float | None:
    """A 0-d tensor as a float, or None where it is NaN (undefined), as results store it."""
    return None if torch.isnan(value) else float(value)


def metrics(
    conf: Tensor,
    class_names: Sequence[str],
    seen: Sequence[int] | None = None,
    unseen: Sequence[int] | None = None,
) -> dict:
    """Segmentation metrics from a confusion matrix, in percent.

    Args:
        conf: (K, K) counts, rows ground truth, columns prediction.
        class_names: K class entries (display name = first synonym).
        seen: indices of the seen classes of a zero-shot split.
        unseen: indices of the unseen classes.

    Returns:
        {"aAcc", "mIoU", "mAcc", ["mIoU(S)", "mIoU(U)", "hIoU",] "IoU": {class: value},
        "Acc": {class: value}, "class_names", "seen", "unseen", "num_pixels"}. A class's IoU is
        None when it has no ground-truth and no predicted pixel, its Acc None when it has no
        ground-truth pixel; None values are left out of the means.

    Raises:
        ValueError: conf is not K x K for the K names, or the split indices are invalid.
    """
    num_classes = len(class_names)
    if conf.shape != (num_classes, num_classes):
        raise ValueError(
            f"Confusion matrix is {tuple(conf.shape)} but there are {num_classes} class names."
        )
    if unseen is not None:
        seen = _default_seen(seen, unseen, num_classes)
        check_split(seen, unseen, num_classes)
    intersection, union = intersection_and_union(conf)
    ground_truth = conf.to(torch.int64).sum(dim=1)
    iou = class_iou(intersection, union)
    acc = _percent(intersection, ground_truth)
    summary = {key: optional_float(value) for key, value in iou_summary(iou, seen, unseen).items()}
    total = int(ground_truth.sum())
    names = [display_name(name) for name in class_names]
    return {
        "aAcc": None if total == 0 else PERCENT * int(intersection.sum()) / total,
        "mIoU": summary.pop("mIoU"),
        "mAcc": optional_float(class_mean(acc)),
        **summary,
        "IoU": dict(zip(names, map(optional_float, iou), strict=True)),
        "Acc": dict(zip(names, map(optional_float, acc), strict=True)),
        "class_names": list(class_names),
        "seen": None if unseen is None else list(seen),
        "unseen": None if unseen is None else list(unseen),
        "num_pixels": total,
    }


def check_split(seen: Sequence[int], unseen: Sequence[int], num_classes: int) -> None:
    """Raise ValueError unless seen and unseen are disjoint class indices in [0, num_classes)."""
    for kind, indices in (("seen", seen), ("unseen", unseen)):
        if any(not 0 <= i < num_classes for i in indices):
            raise ValueError(
                f"{kind} class indices {list(indices)} out of range 0..{num_classes - 1}."
            )
    if set(seen) & set(unseen):
        raise ValueError(f"Classes {sorted(set(seen) & set(unseen))} are both seen and unseen.")
