"""Per-rank resume checkpoints of an evaluation, refused when written for other settings.

With ``checkpoint=path``, every `checkpoint_every` images each rank writes its `Tally` (its
confusion matrix, the per-image counts of the images it has done and their indices; atomically;
one file per rank, `rank_checkpoint_path`). A rerun with the
same path and the same settings skips those images and ends with the identical matrix; a
checkpoint written for other settings is refused, naming what changed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from zegkit.data.base import SegmentationDataset
from zegkit.evaluate.bootstrap import ImageStats
from zegkit.evaluate.metrics import intersection_and_union
from zegkit.io import atomic_write, jsonable

CHECKPOINT_FORMAT = 2  # bump when the checkpoint contents change meaning
# Settings that may differ between a run and its resumption (not part of the fingerprint).
VOLATILE_SETTINGS = ("timestamp", "zegkit_version", "checkpoint", "num_workers", "progress")
# Inference settings that change how the model runs, not what it computes (compile: the same
# operations, fused and rounded differently).
VOLATILE_INFERENCE = ("compile",)


@dataclass
class Tally:
    """What one rank has counted so far.

    The per-image rows make scene-bootstrap intervals possible; they are small (N x K) next to
    the images, and zero for the images other ranks do, so ranks combine by summing.
    """

    confusion: Tensor  # (K, K) int64, rows ground truth, columns prediction
    intersection: Tensor  # (N, K) int64; row i: image i's per-class intersection
    union: Tensor  # (N, K) int64; row i: image i's per-class union
    done: set[int] = field(default_factory=set)  # indices of the images counted

    @classmethod
    def empty(cls, num_images: int, num_classes: int) -> Tally:
        """Nothing counted yet, for `num_images` images of `num_classes` classes."""
        return cls(torch.zeros(num_classes, num_classes, dtype=torch.int64),
                   torch.zeros(num_images, num_classes, dtype=torch.int64),
                   torch.zeros(num_images, num_classes, dtype=torch.int64))

    def add(self, index: int, conf: Tensor) -> None:
        """Count image `index`, whose (K, K) confusion matrix is `conf`."""
        self.confusion += conf
        self.intersection[index], self.union[index] = intersection_and_union(conf)
        self.done.add(index)

    def image_stats(self) -> ImageStats:
        """The per-image counts (rows of images not counted here are zero)."""
        return ImageStats(self.intersection, self.union)


def rank_checkpoint_path(path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The checkpoint file of one rank: `path` itself for one process, else path.rankR-of-N."""
    path = Path(path).expanduser()
    if world_size == 1:
        return path
    return path.with_name(f"{path.stem}.rank{rank}-of-{world_size}{path.suffix}")


def fingerprint_of(dataset: SegmentationDataset, settings: Mapping, rank: int, world: int) -> dict:
    """What a checkpoint must have been written for to be resumed: the dataset, the sharding and
    the settings, VOLATILE_SETTINGS left out (see `_computed_settings` for the inference)."""
    stable = _computed_settings({k: v for k, v in settings.items() if k not in VOLATILE_SETTINGS})
    return {
        "format": CHECKPOINT_FORMAT,
        "dataset": dataset.name,
        "root": str(dataset.root),
        "split": dataset.split,
        "num_images": len(dataset),
        "class_names": list(dataset.class_names),
        "rank": rank,
        "world_size": world,
        "settings": jsonable(stable),
    }


def _computed_settings(settings: dict) -> dict:
    """`settings` as what they compute: the inference precision as it resolved here (their
    "resolved_precision", `Segmenter.settings`: "auto" is bf16 or fp32 by the hardware), the
    way checkpoints written before "auto" recorded it, so a run resumes a checkpoint of the same
    dtype whichever name chose it; VOLATILE_INFERENCE left out."""
    inference = settings.get("inference")
    if not isinstance(inference, Mapping):
        return settings
    inference = {k: v for k, v in inference.items() if k not in VOLATILE_INFERENCE}
    if "resolved_precision" in settings:
        inference["precision"] = settings.pop("resolved_precision")
    return {**settings, "inference": inference}


def load_checkpoint(path: Path, fingerprint: dict, num_images: int, num_classes: int) -> Tally:
    """The tally saved at `path` (empty if there is none), refused if written for other settings.

    Raises:
        RuntimeError: the file cannot be read, or its fingerprint differs from `fingerprint`.
    """
    tally = Tally.empty(num_images, num_classes)
    if not path.exists():
        return tally
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["fingerprint"]
    except Exception as error:  # any unreadable file gets the same advice
        raise _unreadable(path, error) from error
    if saved != fingerprint:
        changes = _differences(saved, fingerprint)
        raise RuntimeError(
            f"Checkpoint {path} was written by a run with different settings ({changes}); "
            f"resuming would mix two evaluations. Delete it, or pass another checkpoint path, "
            f"to start this evaluation from the beginning."
        )
    try:
        done = list(state["done"])
        tally.confusion += state["confusion"]
        tally.intersection[done], tally.union[done] = state["intersection"], state["union"]
    except Exception as error:
        raise _unreadable(path, error) from error
    tally.done.update(done)
    return tally


def _unreadable(path: Path, error: Exception) -> RuntimeError:
    return RuntimeError(f"Checkpoint {path} cannot be read ({error}). Delete it to start over.")


def _differences(old: Mapping, new: Mapping, prefix: str = "") -> str:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            inner = _differences(a, b, f"{prefix}{key}.")
            changes.extend([inner] if inner else [])
        elif a != b:
            changes.append(f"{prefix}{key}: {str(a)[:60]} -> {str(b)[:60]}")
    return "; ".join(changes)


def save_checkpoint(path: Path, fingerprint: dict, tally: Tally) -> None:
    """Write the tally atomically: the matrix, and the per-image rows of the images done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done = sorted(tally.done)
    state = {"fingerprint": fingerprint, "confusion": tally.confusion.clone(), "done": done,
             "intersection": tally.intersection[done], "union": tally.union[done]}
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)
