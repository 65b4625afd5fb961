"""Confusion matrices and the metrics computed from them (pure functions, no I/O).

Everything is accumulated in one K x K integer confusion matrix (rows: ground truth, columns:
prediction; pixels whose ground truth is the ignore index are left out), so memory does not grow
with the dataset and sharded runs combine by summing matrices. Metrics follow MMSegmentation's
``IoUMetric`` (``mmseg/evaluation/metrics/iou_metric.py``): per-class IoU = TP / (TP + FP + FN),
Acc = TP / (TP + FN), aAcc = all TP / all labelled pixels; a class whose IoU is undefined (no
ground-truth and no predicted pixel) is left out of the means (nan-mean). On zero-shot splits,
mIoU(S) and mIoU(U) average the seen and unseen classes and hIoU is their harmonic mean
(ZS3Net, arXiv 1906.00817). All values are percentages.
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


def _percent(numerator: Tensor, denominator: Tensor) -> list[float | None]:
    return [
        None if d == 0 else PERCENT * float(n) / float(d)
        for n, d in zip(numerator.tolist(), denominator.tolist(), strict=True)
    ]


def _nan_mean(values: Sequence[float | None]) -> float | None:
    defined = [value for value in values if value is not None]
    return sum(defined) / len(defined) if defined else None


def harmonic_mean(seen: float | None, unseen: float | None) -> float | None:
    """hIoU = 2 S U / (S + U) (0 when both are 0; None when either is undefined)."""
    if seen is None or unseen is None:
        return None
    return 0.0 if seen + unseen == 0 else 2.0 * seen * unseen / (seen + unseen)


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
    conf = conf.to(torch.int64)
    true_positive = conf.diagonal()
    ground_truth = conf.sum(dim=1)
    predicted = conf.sum(dim=0)
    iou = _percent(true_positive, ground_truth + predicted - true_positive)
    acc = _percent(true_positive, ground_truth)
    names = [display_name(name) for name in class_names]
    total = int(ground_truth.sum())
    result: dict = {
        "aAcc": None if total == 0 else PERCENT * int(true_positive.sum()) / total,
        "mIoU": _nan_mean(iou),
        "mAcc": _nan_mean(acc),
    }
    if unseen is not None:
        seen = [i for i in range(num_classes) if i not in unseen] if seen is None else seen
        _check_split(seen, unseen, num_classes)
        result["mIoU(S)"] = _nan_mean([iou[i] for i in seen])
        result["mIoU(U)"] = _nan_mean([iou[i] for i in unseen])
        result["hIoU"] = harmonic_mean(result["mIoU(S)"], result["mIoU(U)"])
    result.update(
        IoU=dict(zip(names, iou, strict=True)),
        Acc=dict(zip(names, acc, strict=True)),
        class_names=list(class_names),
        seen=None if unseen is None else list(seen),
        unseen=None if unseen is None else list(unseen),
        num_pixels=total,
    )
    return result


def _check_split(seen: Sequence[int], unseen: Sequence[int], num_classes: int) -> None:
    for kind, indices in (("seen", seen), ("unseen", unseen)):
        if any(not 0 <= i < num_classes for i in indices):
            raise ValueError(
                f"{kind} class indices {list(indices)} out of range 0..{num_classes - 1}."
            )
    if set(seen) & set(unseen):
        raise ValueError(f"Classes {sorted(set(seen) & set(unseen))} are both seen and unseen.")
