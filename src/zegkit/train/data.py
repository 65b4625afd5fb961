"""Training data: training splits, zero-shot label mapping, checks, and a deterministic loader.

Training splits (`load_training_set`): the readers of `zegkit.data.datasets` at their training
split (VOC 2012 ``train_aug`` = train + SBD, Pascal Context ``train``, COCO-Stuff 164k
``train2017``), or the synthetic proving ground generated on the fly (`SyntheticTrainingSet`).

Zero-shot labels: labels keep the dataset's class indices (the vocabulary is the full class list;
the loss gets `seen_class_mask` separately). Pixels of unseen classes become 255 for inductive
training (`zero_shot_labels`), after augmentation, as ZegCLIP's released code relabels them in the
model: the crop's ``cat_max_ratio`` check still counts unseen classes. ZegCLIP's code keeps every
image; ``drop_unseen_images=True`` drops images showing any unseen class (its paper's wording).

Determinism: a training item is addressed by a key ``(dataset index, draw)``. Draw ``d`` is the
d-th item of the whole run: step ``s`` of global batch ``B`` holds draws ``s*B .. s*B + B-1``;
the dataset index of draw ``d`` is ``permutation(epoch = d // N)[d % N]``, a permutation seeded by
(seed, epoch); and every random number of its augmentation comes from ``draw_rng(seed, d)``. So
the items of a step depend on nothing but (seed, step): not on workers, processes or restarts.
Rank ``r`` of ``W`` takes the global positions ``r, r + W, r + 2W, ...`` of each step (strided),
so the ranks' shares are disjoint and their union is the one-process batch.

    dataset = load_training_set("voc20", "~/data/VOCdevkit/VOC2012")
    check_training_set(dataset)
    seen, unseen = zero_shot_split(dataset, "zegclip-voc-15-5")
    loader = build_train_loader(dataset, AugmentConfig(), unseen=unseen, batch_size=16, seed=0,
                                num_steps=20000, start_step=step, rank=rank, world_size=world)
    for images, labels in loader:   # (16 / world, 3, 512, 512) in [0, 1], (16 / world, 512, 512)
        ...
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from zegkit.data import synthetic
from zegkit.data.base import IGNORE_INDEX, SegmentationDataset
from zegkit.data.datasets import VOC_TRAIN_AUG, canonical_name, load_dataset
from zegkit.data.protocols import get_protocol
from zegkit.data.worker_errors import CaughtErrors, collate_caught
from zegkit.train.augment import AugmentConfig, augment

PathLike = str | os.PathLike
# The training split of each benchmark (MMSegmentation's / ZegCLIP's training configs).
TRAIN_SPLITS = {
    "voc21": VOC_TRAIN_AUG,
    "voc20": VOC_TRAIN_AUG,
    "context60": "train",
    "context59": "train",
    "coco_stuff171": "train",
    "coco_object": "train",
    "coco20i": "train",
    "cityscapes19": "train",
    "ade150": "train",
}
# numpy SeedSequence spawn keys of zegkit's training streams. `write_dataset` (the evaluation
# sets) seeds scene i with ``SeedSequence([seed, i])`` and no spawn key, and pretrain_clip with
# 3-word entropy, so a spawn-keyed ``SeedSequence([seed, i], spawn_key=(KEY,))`` (whose assembled
# entropy is [seed, i, 0, 0, KEY]) is none of their scenes for any seed below 2**96.
SCENE_STREAM = 0x5CE4E  # synthetic training scenes
ORDER_STREAM = 0x04DE4  # per-epoch permutations of the dataset
AUGMENT_STREAM = 0xA06  # per-draw augmentation
DEFAULT_SYNTHETIC_SCENES = 10_000
# Label of unseen pixels for transductive self-training (ZegCLIP's code marks them -1 and
# replaces them by pseudo-labels in the model); inductive training uses IGNORE_INDEX.
PSEUDO_LABEL = -1
# How many masks `check_training_set` opens by default (about a minute for COCO-sized masks on
# one core); None opens all.
DEFAULT_CHECK_SAMPLE = 2000
# How many problems a `check_training_set` error lists.
PROBLEMS_SHOWN = 5


def _spawned_rng(stream: int, *words: int) -> np.random.Generator:
    for word in words:
        if isinstance(word, bool) or not isinstance(word, (int, np.integer)) or word < 0:
            raise ValueError(f"Seeds, indices and draws must be non-negative ints, got {word!r}.")
    return np.random.default_rng(np.random.SeedSequence(list(words), spawn_key=(stream,)))


def draw_rng(seed: int, draw: int) -> np.random.Generator:
    """The generator of every random choice of draw `draw`'s augmentation (a pure function)."""
    return _spawned_rng(AUGMENT_STREAM, seed, draw)


def permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the dataset in `epoch` (a pure function of num_items, seed and epoch)."""
    return _spawned_rng(ORDER_STREAM, seed, epoch).permutation(num_items)


class SyntheticTrainingSet(Dataset):
    """Proving-ground training scenes generated on the fly: the item contract of
    `SegmentationDataset` (image uint8 (3, H, W), mask int64 (H, W), name), with the classes
    and seen/unseen split of `zegkit.data.synthetic`.

    Scene i is ``generate_scene(SeedSequence([seed, i], spawn_key=(SCENE_STREAM,)), size)``:
    the same for every call, and never a scene of a `write_dataset` evaluation set (see
    SCENE_STREAM).

    Args:
        num_scenes: the dataset's length (one epoch).
        seed: the scene seed.
        size: square scene size in pixels.
        version: generator version (`synthetic.GENERATOR_VERSION` by default).
    """

    ignore_index = IGNORE_INDEX
    reduce_zero_label = False

    def __init__(self, num_scenes: int = DEFAULT_SYNTHETIC_SCENES, seed: int = 0,
                 size: int = 224, version: int = synthetic.GENERATOR_VERSION) -> None:
        if isinstance(num_scenes, bool) or not isinstance(num_scenes, int) or num_scenes < 1:
            raise ValueError(f"num_scenes must be a positive int, got {num_scenes!r}.")
        _spawned_rng(SCENE_STREAM, seed)  # validates the seed
        self.num_scenes, self.seed, self.size, self.version = num_scenes, seed, size, version
        self.name = "synthetic"
        self.split = "train"
        self.class_names = list(synthetic.CLASSES)
        self.seen = [synthetic.CLASS_ID[name] for name in synthetic.SEEN]
        self.unseen = [synthetic.CLASS_ID[name] for name in synthetic.UNSEEN]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.num_scenes

    def __repr__(self) -> str:
        return (f"SyntheticTrainingSet(num_scenes={self.num_scenes}, seed={self.seed}, "
                f"size={self.size}, version={self.version})")

    def _scene_rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.num_scenes:
            raise IndexError(f"index {index} out of range for {self.num_scenes} scenes")
        return _spawned_rng(SCENE_STREAM, self.seed, index)

    def scene(self, index: int) -> synthetic.Scene:
        """The generated scene `index`."""
        return synthetic.generate_scene(self._scene_rng(index), self.size, version=self.version)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        scene = self.scene(index)
        image = torch.from_numpy(scene.image).permute(2, 0, 1).contiguous()  # (3, H, W)
        return image, torch.from_numpy(scene.mask.astype(np.int64)), f"train-{index:06d}"

    def read_checked_mask(self, index: int) -> np.ndarray:
        """The mask of scene `index` (valid by construction), without rendering its image."""
        mask = synthetic.scene_mask(self._scene_rng(index), self.size, version=self.version)
        return mask.astype(np.int64)


TrainingSet = SegmentationDataset | SyntheticTrainingSet


def load_training_set(name: str, root: PathLike | None = None, split: str | None = None, *,
                      num_scenes: int = DEFAULT_SYNTHETIC_SCENES, seed: int = 0,
                      size: int = 224) -> TrainingSet:
    """A dataset's training split from its on-disk layout, or generated synthetic scenes.

    Args:
        name: a dataset name of `zegkit.data.load_dataset` (aliases accepted).
        root: the data root; for "synthetic", None generates scenes (a folder written by
            ``zegkit synth`` is read instead when given).
        split: default `TRAIN_SPLITS[name]` (VOC: "train_aug", others: "train").
        num_scenes, seed, size: the generated synthetic set (see `SyntheticTrainingSet`);
            only used when name is "synthetic" and root is None.

    Raises:
        ValueError: unknown dataset, or a root missing for an on-disk dataset.
        FileNotFoundError: the layout, split file or masks are missing (see `load_dataset`).
    """
    key = canonical_name(name)
    if key == "synthetic" and root is None:
        return SyntheticTrainingSet(num_scenes, seed, size)
    if root is None:
        raise ValueError(f"{key}: a data root is needed (--data-root); only 'synthetic' can be "
                         f"generated without one.")
    return load_dataset(key, root, split or TRAIN_SPLITS.get(key, "train"))


def zero_shot_split(dataset: TrainingSet, protocol: str | None = None
                    ) -> tuple[list[int], list[int]]:
    """(seen, unseen) class indices of a named zero-shot protocol in the dataset's classes.

    Args:
        dataset: the training set.
        protocol: e.g. "zegclip-voc-15-5"; None (or a protocol without classes, such as
            "zegkit-synthetic") uses the split the dataset defines (synthetic's split.json).

    Raises:
        ValueError: unknown protocol, a protocol for another dataset, or no split at all.
    """
    if protocol is not None:
        named = get_protocol(protocol)
        if named.dataset != dataset.name:
            raise ValueError(
                f"Protocol {protocol!r} is for {named.dataset}, not {dataset.name}; choose one of "
                f"{dataset.name}'s protocols (zegkit.data.list_protocols() lists them all)."
            )
        seen, unseen = named.split_indices(dataset.class_names)
        if unseen is not None:
            return seen, unseen
    if dataset.unseen is None:
        raise ValueError(f"{dataset.name} defines no seen/unseen split; name a zero-shot "
                         f"protocol (e.g. zegclip-voc-15-5 for voc20).")
    return list(dataset.seen), list(dataset.unseen)


def seen_class_mask(num_classes: int, seen: Sequence[int]) -> torch.Tensor:
    """Bool (num_classes,): True for the classes the loss trains."""
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[list(seen)] = True
    return mask


def zero_shot_labels(mask: torch.Tensor, unseen: Sequence[int],
                     fill: int = IGNORE_INDEX) -> torch.Tensor:
    """A copy of `mask` (any shape, int) with the pixels of `unseen` classes set to `fill`
    (IGNORE_INDEX for inductive training, PSEUDO_LABEL for transductive self-training)."""
    labels = mask.clone()
    labels[torch.isin(mask, torch.as_tensor(list(unseen), dtype=mask.dtype))] = fill
    return labels


def _check_indices(num_items: int, sample: int | None) -> np.ndarray:
    if sample is None or sample >= num_items:
        return np.arange(num_items)
    if sample < 1:
        raise ValueError(f"sample must be a positive int or None (all), got {sample}.")
    return np.unique(np.linspace(0, num_items - 1, sample).round().astype(int))


def check_training_set(dataset: TrainingSet, sample: int | None = DEFAULT_CHECK_SAMPLE) -> None:
    """Open masks before training starts and fail naming every bad file found.

    Readers already refuse missing masks when they are built; this reads masks as training
    will (`read_checked_mask`, the checks of `SegmentationDataset.__getitem__`): a mask deleted
    since, unreadable, with values outside the classes, or of another size than its image.
    Generated synthetic scenes have no files and are valid by construction: nothing is opened.

    Args:
        dataset: the training set.
        sample: how many masks to open, evenly spaced over the dataset (all when the dataset
            is smaller); None opens every mask. Image pixels are not decoded, only their size.

    Raises:
        ValueError: some masks are bad; the message lists up to 5 problems, each naming its
            file, and how many there are.
    """
    if isinstance(dataset, SyntheticTrainingSet):
        return
    problems = []
    for index in _check_indices(len(dataset), sample):
        try:
            dataset.read_checked_mask(int(index))
        except (FileNotFoundError, ValueError) as error:
            problems.append(str(error))
    if problems:
        shown = "\n  ".join(problems[:PROBLEMS_SHOWN])
        raise ValueError(f"{dataset.name}: {len(problems)} bad training items; fix or remove "
                         f"them before training:\n  {shown}")


def images_without(dataset: TrainingSet, classes: Sequence[int]) -> list[int]:
    """Indices of the images whose masks show none of `classes` (opens every mask).

    Raises:
        ValueError: no image is left.
    """
    wanted = np.asarray(list(classes))
    kept = [index for index in range(len(dataset))
            if not np.isin(dataset.read_checked_mask(index), wanted).any()]
    if not kept:
        raise ValueError(f"{dataset.name}: every image shows one of the classes {list(classes)}; "
                         f"nothing is left to train on.")
    return kept


class StepSampler(Sampler):
    """Batch sampler: for each step from `start_step` to `num_steps`, this rank's keys
    ``(dataset index, draw)`` of the step's global batch (see the module docstring).

    Args:
        indices: the dataset indices to draw from (an int n means range(n)).
        batch_size: the global batch size B (all ranks together); divisible by world_size.
        seed: seeds the per-epoch order.
        num_steps: the step after the last one (the run's total steps).
        start_step: the first step (a resumed run's checkpointed step).
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, indices: Sequence[int] | int, batch_size: int, *, seed: int,
                 num_steps: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.indices = np.arange(indices) if isinstance(indices, int) else np.asarray(indices)
        if len(self.indices) == 0:
            raise ValueError("StepSampler needs at least one dataset index.")
        if batch_size < 1 or world_size < 1 or batch_size % world_size:
            raise ValueError(f"The global batch size ({batch_size}) must be a positive multiple "
                             f"of the number of processes ({world_size}).")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}.")
        if not 0 <= start_step <= num_steps:
            raise ValueError(f"start_step {start_step} must be in 0..num_steps ({num_steps}).")
        self.batch_size, self.seed = batch_size, seed
        self.num_steps, self.start_step = num_steps, start_step
        self.rank, self.world_size = rank, world_size
        self._epoch, self._permutation = -1, self.indices  # the latest epoch's order, cached

    def __len__(self) -> int:
        return self.num_steps - self.start_step

    def step_keys(self, step: int) -> list[tuple[int, int]]:
        """This rank's ``(dataset index, draw)`` keys of global step `step`."""
        count = len(self.indices)
        first = step * self.batch_size
        draws = range(first + self.rank, first + self.batch_size, self.world_size)
        keys = []
        for draw in draws:
            epoch, position = divmod(draw, count)
            order = self._order(epoch)
            keys.append((int(self.indices[order[position]]), draw))
        return keys

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            self._epoch, self._permutation = epoch, permutation(len(self.indices), self.seed, epoch)
        return self._permutation

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.num_steps):
            yield self.step_keys(step)


class AugmentedTrainingSet(Dataset):
    """Training items by key: ``(index, draw)`` -> (image float32 (3, h, w) in [0, 1], labels
    int64 (h, w)), with (h, w) the crop size.

    Args:
        dataset: the training set.
        cfg: the augmentation.
        seed: seeds the augmentation (with the draw, see `draw_rng`).
        unseen: classes whose pixels become `fill` after augmentation (empty: none).
        fill: IGNORE_INDEX (inductive) or PSEUDO_LABEL (transductive self-training).
    """

    def __init__(self, dataset: TrainingSet, cfg: AugmentConfig, *, seed: int,
                 unseen: Sequence[int] = (), fill: int = IGNORE_INDEX) -> None:
        self.dataset, self.cfg, self.seed = dataset, cfg, seed
        self.unseen, self.fill = list(unseen), fill

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, draw = key
        image, mask, _ = self.dataset[index]
        image, labels = augment(image, mask, self.cfg, draw_rng(self.seed, draw))
        if self.unseen:
            labels = zero_shot_labels(labels, self.unseen, self.fill)
        return image, labels


def build_train_loader(
    dataset: TrainingSet,
    cfg: AugmentConfig,
    *,
    batch_size: int,
    seed: int,
    num_steps: int,
    start_step: int = 0,
    unseen: Sequence[int] = (),
    fill: int = IGNORE_INDEX,
    drop_unseen_images: bool = False,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> DataLoader:
    """The loader of a training run: one item per step, this rank's share of the global batch.

    Each item is ``(images float32 (B / world_size, 3, H, W) in [0, 1], labels int64
    (B / world_size, H, W))`` with (H, W) = ``cfg.crop_size``; labels are class indices of the
    dataset's full class list, ``unseen`` pixels and padding `fill` / 255. The sequence depends
    only on (seed, step), so a run resumed at `start_step` or split over processes sees exactly
    the items of one uninterrupted process. A bad training item (a corrupt file, a mask of
    another size) makes its step's item that error: `zegkit.data.worker_errors.raise_caught`
    raises it as it was, without torch's "Caught ValueError in DataLoader worker" wrapper.

    Args:
        dataset: the training set (see `load_training_set`).
        cfg: the augmentation.
        batch_size: the global batch size (all processes together).
        seed: seeds the order and the augmentation.
        num_steps: the run's total number of steps; the loader ends there.
        start_step: the first step to yield (resume).
        unseen: the unseen classes (inductive: their pixels become `fill`).
        fill: IGNORE_INDEX, or PSEUDO_LABEL for transductive self-training.
        drop_unseen_images: train only on images without unseen classes (reads every mask
            once, before the first step); default False, as ZegCLIP's code.
        rank, world_size: this process and the number of processes.
        num_workers: DataLoader worker processes (kept alive across steps when > 0).
        device: where the batches go; pinned memory when it is CUDA.
    """
    indices = images_without(dataset, unseen) if drop_unseen_images and unseen else len(dataset)
    sampler = StepSampler(indices, batch_size, seed=seed, num_steps=num_steps,
                          start_step=start_step, rank=rank, world_size=world_size)
    items = AugmentedTrainingSet(dataset, cfg, seed=seed, unseen=unseen, fill=fill)
    return DataLoader(
        CaughtErrors(items),
        batch_sampler=sampler,
        collate_fn=collate_caught,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=num_workers > 0,
    )

