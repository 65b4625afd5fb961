"""1-way episodes: the evaluation of the few-shot / inductive zero-shot benchmarks (PASCAL-5i,
COCO-20i, and the proving ground's folds; protocols in `zegkit.data.protocols.FOLD_SETS`).

An episode is one (image, class) pair with the class in the image. The method sees the image and
the vocabulary [background, class] and answers a binary mask: class or not (ClsCLIP scores the
class with its sigmoid against a constant background; a softmax method, e.g. `naive`, compares
the class's text with the background's, the zero-shot readout of LSeg / CLIPSeg on these
benchmarks). Episodes are drawn uniformly, with replacement, from every (val image, fold class)
pair whose class covers at least `episode_min_pixels` pixels, by a generator seeded with the
protocol's `episode_seed`, so every method and every run sees the same episodes.

Metrics (as PFENet / HSNet compute them): per fold class, IoU = the foreground intersection
summed over its episodes / the union summed over them; a fold's mIoU is the mean over its
classes; FB-IoU is the mean of the foreground IoU and the background IoU, each summed over all
of the fold's episodes; a fold set reports the mean of its folds' mIoU and FB-IoU. Pixels
labelled ignore (255) count in neither. Under torchrun, rank r takes episodes r, r + N, ...;
the counts are all-reduced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from zegkit.data.base import SegmentationDataset, display_name
from zegkit.data.protocols import Protocol
from zegkit.distributed import all_reduce_sum, rank_and_world
from zegkit.hardware import follow_load
from zegkit.inference import BACKGROUND_NAME

# (image uint8 (3, H, W), image name, vocabulary [background, class]) -> labels (H, W), 1 = the
# class.
EpisodePredict = Callable[[Tensor, str, list[str]], Tensor]
# Columns of the per-class count table.
FG_INTERSECTION, FG_UNION, BG_INTERSECTION, BG_UNION = range(4)


@dataclass(frozen=True)
class Episode:
    """One 1-way episode: an image of the dataset and a class shown in it (dataset indices)."""

    image: int
    label: int


def episode_candidates(dataset: SegmentationDataset, classes: Sequence[int],
                       min_pixels: int = 0) -> list[Episode]:
    """Every (image, class) pair with a class of `classes` covering >= max(min_pixels, 1)
    pixels of the image, in dataset order (opens every mask once).

    Raises:
        ValueError: no image shows any of the classes.
    """
    wanted = np.asarray(sorted(classes))
    candidates = []
    for index in range(len(dataset)):
        mask = dataset.read_checked_mask(index)
        values, counts = np.unique(mask, return_counts=True)
        for value, count in zip(values, counts, strict=True):
            if value in wanted and count >= max(min_pixels, 1):
                candidates.append(Episode(index, int(value)))
    if not candidates:
        names = [display_name(dataset.class_names[c]) for c in classes]
        raise ValueError(f"{dataset.name}: no image shows one of {names} with at least "
                         f"{max(min_pixels, 1)} pixels; no episode can be drawn.")
    return candidates


def sample_episodes(candidates: Sequence[Episode], num: int, seed: int) -> list[Episode]:
    """`num` episodes drawn uniformly with replacement from `candidates` (a pure function of
    the candidates, num and seed)."""
    if num < 1:
        raise ValueError(f"The number of episodes must be >= 1, got {num}.")
    picks = np.random.default_rng(seed).integers(0, len(candidates), size=num)
    return [candidates[i] for i in picks]


def episode_counts(foreground: Tensor, mask: Tensor, label: int, ignore_index: int) -> Tensor:
    """int64 (4,): foreground intersection, union, background intersection, union of a binary
    prediction `foreground` (H, W) bool against `mask` (H, W) == label, ignore pixels left out."""
    valid = mask != ignore_index
    truth = (mask == label) & valid
    predicted = foreground & valid
    background, predicted_background = valid & ~truth, valid & ~predicted
    return torch.stack([(predicted & truth).sum(), (predicted | truth).sum(),
                        (predicted_background & background).sum(),
                        (predicted_background | background).sum()]).to(torch.int64)


def episode_metrics(counts: Tensor, names: Sequence[str]) -> dict:
    """mIoU, per-class IoU and FB-IoU (percent) of per-class counts (C, 4) of a fold's classes.

    A class without episodes has IoU None and is left out of the mean.
    """
    per_class = {}
    for name, row in zip(names, counts.tolist(), strict=True):
        union = row[FG_UNION]
        per_class[name] = 100.0 * row[FG_INTERSECTION] / union if union else None
    scored = [value for value in per_class.values() if value is not None]
    total = counts.sum(dim=0).tolist()
    fb = [total[i] / total[u] for i, u in ((FG_INTERSECTION, FG_UNION),
                                            (BG_INTERSECTION, BG_UNION)) if total[u]]
    return {"IoU": per_class, "Acc": dict.fromkeys(per_class),
            "mIoU": sum(scored) / len(scored) if scored else None,
            "FB-IoU": 100.0 * sum(fb) / len(fb) if fb else None}


def fold_mean(folds: Sequence[dict]) -> dict:
    """A fold set's result: every fold's classes, the mean of the folds' mIoU and FB-IoU."""
    per_class = {name: value for fold in folds for name, value in fold["IoU"].items()}
    return {"IoU": per_class, "Acc": dict.fromkeys(per_class),
            "mIoU": float(np.mean([fold["mIoU"] for fold in folds])),
            "FB-IoU": float(np.mean([fold["FB-IoU"] for fold in folds])),
            "num_episodes": sum(fold["num_episodes"] for fold in folds),
            "folds": [{key: fold[key] for key in ("protocol", "mIoU", "FB-IoU", "num_episodes")}
                      for fold in folds]}


def background_entry(class_names: Sequence[str]) -> str:
    """The vocabulary entry of the episodes' background: the dataset's own background class
    (with its synonyms) when it has one, else the word "background"."""
    for entry in class_names:
        if display_name(entry).casefold() == BACKGROUND_NAME:
            return entry
    return BACKGROUND_NAME


def segmenter_predict(segmenter: object) -> EpisodePredict:
    """An episode's answer from a Segmenter: label 1 where the class wins over background,
    with ClsCLIP+'s zoom-in when its config names proposals (`zegkit.zoom`)."""
    proposals = segmenter.config.proposals

    def predict(image: Tensor, name: str, vocabulary: list[str]) -> Tensor:
        segmenter.set_vocabulary(vocabulary)
        images = image[None].float() / 255
        if proposals is None:
            return segmenter.predict(images)[0].cpu()
        from zegkit.zoom import zoom_probabilities

        return segmenter.decide(zoom_probabilities(segmenter, images, proposals, name))[0].cpu()

    return predict


def evaluate_episodes(predict: EpisodePredict, dataset: SegmentationDataset, protocol: Protocol,
                      *, progress: bool = True) -> dict:
    """Run a fold protocol's episodes and return its metrics.

    Args:
        predict: answers an episode (see `segmenter_predict`).
        dataset: the fold's evaluation images (the protocol's dataset).
        protocol: a fold protocol (`episodes` set; its `unseen` classes are the fold's).
        progress: show a progress bar (rank 0).

    Returns:
        `episode_metrics` plus "protocol", "num_episodes", "seed".

    Raises:
        ValueError: not an episode protocol, or the dataset lacks its classes.
    """
    if not protocol.episodes:
        raise ValueError(f"Protocol {protocol.name!r} is not an episode protocol.")
    _, classes = protocol.split_indices(dataset.class_names)
    candidates = episode_candidates(dataset, classes, protocol.episode_min_pixels)
    episodes = sample_episodes(candidates, protocol.episodes, protocol.episode_seed)
    background = background_entry(dataset.class_names)
    rank, world = rank_and_world()
    row = {label: position for position, label in enumerate(classes)}
    counts = torch.zeros(len(classes), 4, dtype=torch.int64)
    mine = episodes[rank::world]
    with torch.inference_mode():
        for episode in tqdm(mine, desc=protocol.name, unit="episode",
                            disable=not progress or rank != 0):
            image, mask, name = dataset[episode.image]
            labels = predict(image, name, [background, dataset.class_names[episode.label]])
            counts[row[episode.label]] += episode_counts(labels == 1, mask, episode.label,
                                                         dataset.ignore_index)
            follow_load()
    counts = all_reduce_sum(counts)
    names = [display_name(dataset.class_names[c]) for c in classes]
    return {**episode_metrics(counts, names), "protocol": protocol.name,
            "num_episodes": len(episodes), "seed": protocol.episode_seed}
