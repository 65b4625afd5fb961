"""The evaluation loop: one segmenter over a labelled dataset, sharded and resumable.

Sharding (``torchrun --nproc-per-node N -m zegkit eval ...``): `zegkit.distributed` joins the
process group torchrun describes; rank r evaluates images r, r + N, r + 2N, ...; the confusion
matrices (and, for bootstrap intervals, the per-image counts) are all-reduced. The result is
exactly the single-process one, because integer counts add up the same in any order.
Resuming: see `zegkit.evaluate.checkpoint`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from zegkit.data.base import SegmentationDataset
from zegkit.data.worker_errors import CaughtErrors, raise_caught
from zegkit.distributed import all_reduce_sum, rank_and_world
from zegkit.evaluate.bootstrap import ImageStats, bootstrap_intervals
from zegkit.evaluate.checkpoint import (
    Tally,
    fingerprint_of,
    load_checkpoint,
    rank_checkpoint_path,
    save_checkpoint,
)
from zegkit.evaluate.metrics import confusion_matrix, metrics
from zegkit.evaluate.report import run_record
from zegkit.hardware import follow_load, usable_cores


class _Indexed(Dataset):
    """Items of `dataset` at `indices`, each tagged with its dataset index; a user-data error
    reading an item (a mask whose size differs from its image's, a corrupt file) comes back as
    the item (`CaughtErrors`), for `raise_caught` to raise in the main process as it was."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = CaughtErrors(dataset), list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, tuple[Tensor, Tensor, str] | Exception]:
        index = self.indices[position]
        return index, self.dataset[index]


def _predict(segmenter: object, image: Tensor) -> Tensor:
    labels = segmenter.predict(image[None].float() / 255)  # (1, H, W)
    if not isinstance(labels, Tensor) or labels.shape != (1, *image.shape[-2:]):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise RuntimeError(
            f"segmenter.predict must return labels of shape (1, H, W) = (1, "
            f"{image.shape[-2]}, {image.shape[-1]}) for one image; got {shape}."
        )
    return labels[0].cpu()


@dataclass
class _Clock:
    """Where the loop's wall time goes: waiting for the next image (its decoding, when there are
    no loader workers) and in the model (`segmenter.predict`: backbone, stitching, decision)."""

    data: float = 0.0
    model: float = 0.0

    def waited(self, loader: Iterable) -> Iterator:
        """`loader`'s items, the wait for each (the workers' start included) added to `data`."""
        start = time.perf_counter()
        items = iter(loader)
        while True:
            try:
                item = next(items)
            except StopIteration:
                self.data += time.perf_counter() - start
                return
            self.data += time.perf_counter() - start
            yield item
            start = time.perf_counter()


def _throughput(clock: _Clock, images: int, seconds: float, num_workers: int) -> dict:
    """Images/s of this run (resumed images not counted) and the fractions of the wall time in
    the model and waiting for data, over all ranks: seconds are summed, so images/s is that of
    the ranks together and the fractions are of their summed time."""
    world = rank_and_world()[1]
    totals = torch.tensor([images, seconds, clock.model, clock.data], dtype=torch.float64)
    images, wall, model, data = all_reduce_sum(totals).tolist()
    timed = wall > 0 and images > 0
    return {
        "images": int(images),
        "seconds": round(wall / world, 3),  # the mean rank's
        "images_per_second": round(images * world / wall, 2) if timed else None,
        "model_fraction": round(model / wall, 3) if timed else None,
        "data_wait_fraction": round(data / wall, 3) if timed else None,
        "num_workers": num_workers,
        "torch_threads": torch.get_num_threads(),
        "usable_cores": usable_cores(),
    }


def evaluate(
    segmenter: object,
    dataset: SegmentationDataset,
    *,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    num_workers: int = 0,
    settings: Mapping[str, object] | None = None,
    seen: Sequence[int] | None = None,
    unseen: Sequence[int] | None = None,
    limit: int | None = None,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
) -> dict:
    """Evaluate a segmenter on a labelled dataset; sharded if torch.distributed is initialised.

    The segmenter's vocabulary is set to ``dataset.class_names`` first (if it has
    ``set_vocabulary``); then each image goes through ``segmenter.predict(image[None] / 255)``,
    which must return (1, H, W) labels at the image's resolution.

    Args:
        segmenter: anything with ``predict(images (B, 3, H, W) float in [0, 1]) -> (B, H, W)``.
        dataset: a `SegmentationDataset` with masks.
        progress: show a progress bar with images/s (on rank 0).
        checkpoint: file to checkpoint to and resume from (one file per rank when sharded).
        checkpoint_every: images between checkpoints.
        num_workers: DataLoader worker processes decoding images ahead of the model (0: decode
            in this process, `zegkit.hardware.default_eval_workers` for a model on the CPU).
            torch runs each worker on one thread; the model's threads are the caller's
            (`zegkit eval` sets them with `zegkit.hardware.planned_threads`).
        settings: what produced the result (method, model, protocol, ...); recorded with it and
            part of the checkpoint fingerprint.
        seen: seen class indices (default: the dataset's).
        unseen: unseen class indices (default: the dataset's).
        limit: evaluate only the first `limit` images.
        bootstrap: resamples for 95% scene-bootstrap intervals (`zegkit.evaluate.bootstrap`);
            0 for none.
        bootstrap_seed: seeds the resampling.

    Returns:
        `metrics` of the summed confusion matrix, plus "confusion" (K x K list), "num_images",
        "resumed_images", "world_size", "throughput" (of this run, resumed images not counted:
        "images", "seconds", "images_per_second", the fractions of the wall time in
        `segmenter.predict` ("model_fraction") and waiting for the next image
        ("data_wait_fraction"), "num_workers", "torch_threads", "usable_cores") and "settings".
        With `bootstrap`, also "mIoU_ci95" (and "mIoU(S)_ci95", "mIoU(U)_ci95", "hIoU_ci95" on a
        split), "bootstrap" ({"samples", "seed"}) and "per_image" (the N x K intersection and
        union counts, for `compare_results`).

    Raises:
        ValueError: the dataset has no masks, bad arguments, or predictions out of range.
        RuntimeError: the checkpoint belongs to other settings or cannot be read, or predict
            returned the wrong shape.
    """
    _check_arguments(dataset, checkpoint_every, num_workers, limit, bootstrap)
    rank, world = rank_and_world()
    settings = dict(settings or {})
    settings["limit"] = limit
    total = len(dataset) if limit is None else min(limit, len(dataset))
    mine = list(range(rank, total, world))
    fingerprint = fingerprint_of(dataset, settings, rank, world)
    path = None if checkpoint is None else rank_checkpoint_path(checkpoint, rank, world)
    if path is None:
        tally = Tally.empty(total, dataset.num_classes)
    else:
        tally = load_checkpoint(path, fingerprint, total, dataset.num_classes)
    resumed = len(tally.done)
    todo = [index for index in mine if index not in tally.done]

    if hasattr(segmenter, "set_vocabulary"):
        segmenter.set_vocabulary(dataset.class_names)
    loader = DataLoader(
        _Indexed(dataset, todo), batch_size=None, shuffle=False, num_workers=num_workers
    )
    bar = tqdm(total=len(mine), initial=resumed, unit="img", desc=dataset.name,
               disable=not progress or rank != 0, dynamic_ncols=True)
    clock = _Clock()
    start, since_save = time.perf_counter(), 0
    with torch.inference_mode(), bar:
        for index, item in clock.waited(loader):
            image, mask, name = raise_caught(item)
            bar.set_postfix_str(name, refresh=False)
            model_start = time.perf_counter()
            labels = _predict(segmenter, image)
            clock.model += time.perf_counter() - model_start
            follow_load()
            tally.add(index, confusion_matrix(labels, mask, dataset.num_classes,
                                              dataset.ignore_index))
            since_save += 1
            bar.update()
            if path is not None and since_save >= checkpoint_every:
                save_checkpoint(path, fingerprint, tally)
                since_save = 0
    if path is not None and (since_save or not path.exists()):
        save_checkpoint(path, fingerprint, tally)
    seconds = time.perf_counter() - start

    conf = all_reduce_sum(tally.confusion)
    counts = all_reduce_sum(torch.tensor([len(tally.done), resumed], dtype=torch.int64))
    seen = dataset.seen if seen is None and unseen is None else seen
    unseen = dataset.unseen if unseen is None else unseen
    result = metrics(conf, dataset.class_names, seen, unseen)
    result.update(
        confusion=conf.tolist(),
        num_images=int(counts[0]),
        resumed_images=int(counts[1]),
        world_size=world,
        throughput=_throughput(clock, len(todo), seconds, num_workers),
        settings=run_record({**settings, "dataset": dataset.name, "data_root": str(dataset.root),
                             "split": dataset.split}),
    )
    if bootstrap:
        result.update(_bootstrapped(tally, bootstrap, bootstrap_seed, result))
    return result


def _check_arguments(
    dataset: SegmentationDataset, checkpoint_every: int, num_workers: int, limit: int | None,
    bootstrap: int,
) -> None:
    if not dataset.has_masks:
        raise ValueError(
            f"{dataset.name} at {dataset.root} has no ground-truth masks; evaluation needs them "
            f"(for a folder: masks/<id>.png next to images/)."
        )
    if checkpoint_every < 1 or num_workers < 0 or (limit is not None and limit < 1):
        raise ValueError(
            f"checkpoint_every must be >= 1, num_workers >= 0 and limit None or >= 1; got "
            f"{checkpoint_every}, {num_workers}, {limit}."
        )
    if not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(
            f"bootstrap must be a whole number of resamples >= 0 (0: no intervals; 1000 is "
            f"usual); got {bootstrap!r}."
        )


def _bootstrapped(tally: Tally, num_samples: int, seed: int, result: Mapping) -> dict:
    """Intervals, settings and per-image counts of the all-ranks tally, to add to a result.

    Each image is counted by exactly one rank and its rows are zero elsewhere, so summing the
    ranks' per-image counts gathers them.
    """
    stats = ImageStats(all_reduce_sum(tally.intersection), all_reduce_sum(tally.union))
    intervals = bootstrap_intervals(stats, num_samples, seed, result["seen"], result["unseen"])
    return {**intervals, "bootstrap": {"samples": num_samples, "seed": seed},
            "per_image": stats.to_dict()}
