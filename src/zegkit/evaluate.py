"""Evaluation: confusion matrices, mIoU and friends, sharded across processes and resumable.

Everything is accumulated in one K x K integer confusion matrix (rows: ground truth, columns:
prediction; pixels whose ground truth is the ignore index are left out), so memory does not grow
with the dataset and sharded runs combine by summing matrices. Metrics follow MMSegmentation's
``IoUMetric`` (``mmseg/evaluation/metrics/iou_metric.py``): per-class IoU = TP / (TP + FP + FN),
Acc = TP / (TP + FN), aAcc = all TP / all labelled pixels; a class whose IoU is undefined (no
ground-truth and no predicted pixel) is left out of the means (nan-mean). On zero-shot splits,
mIoU(S) and mIoU(U) average the seen and unseen classes and hIoU is their harmonic mean
(ZS3Net, arXiv 1906.00817). All values are percentages.

Sharding (``torchrun --nproc-per-node N -m zegkit eval ...``): `init_distributed` joins the
process group torchrun describes in the environment (gloo on CPU, nccl on GPU); rank r evaluates
images r, r + N, r + 2N, ...; the confusion matrices are all-reduced. The result is exactly the
single-process one, because integer counts add up the same in any order.

Resuming: with ``checkpoint=path``, every `checkpoint_every` images each rank writes its matrix
and the indices it has done (atomically; one file per rank). A rerun with the same path and the
same settings skips those images and ends with the identical matrix; a checkpoint written for
other settings is refused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from zegkit.data.base import IGNORE_INDEX, SegmentationDataset, display_name
from zegkit.io import atomic_write, save_json_atomic

PERCENT = 100.0
DEFAULT_MODEL = "openai/clip-vit-base-patch16"
CHECKPOINT_FORMAT = 1  # bump when the checkpoint contents change meaning
SUMMARY_KEYS = ("aAcc", "mIoU", "mAcc", "mIoU(S)", "mIoU(U)", "hIoU")
# What building a method's segmenter raises when the method cannot run here (run_eval_all).
BUILD_ERRORS = (FileNotFoundError, ImportError, RuntimeError, ValueError)
# Settings that may differ between a run and its resumption (not part of the fingerprint).
VOLATILE_SETTINGS = ("timestamp", "zegkit_version", "checkpoint", "num_workers", "progress")


# --------------------------------------------------------------------------------------------
# Confusion matrix and metrics


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


# --------------------------------------------------------------------------------------------
# Tables and JSON


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _rows_to_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(cells)

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _split_mark(index: int, result: Mapping) -> str:
    if result.get("unseen") is None:
        return ""
    return "unseen" if index in result["unseen"] else "seen" if index in result["seen"] else ""


def format_table(result: Mapping, *, per_class: bool = True) -> str:
    """A result of `metrics`/`evaluate` as a text table: per-class IoU/Acc, then the summary."""
    parts = []
    if per_class:
        split = result.get("unseen") is not None
        header = ["class", "IoU", "Acc"] + (["split"] if split else [])
        rows = []
        for index, name in enumerate(result["IoU"]):
            row = [name, _cell(result["IoU"][name]), _cell(result["Acc"][name])]
            rows.append(row + ([_split_mark(index, result)] if split else []))
        parts.append(_rows_to_text(header, rows))
    keys = [key for key in SUMMARY_KEYS if key in result]
    parts.append(_rows_to_text(keys, [[_cell(result[key]) for key in keys]]))
    title = _title(result)
    return "\n\n".join(([title] if title else []) + parts)


def _title(result: Mapping) -> str:
    settings = result.get("settings") or {}
    bits = [f"{key}={settings[key]}" for key in ("dataset", "method", "model", "protocol")
            if settings.get(key) is not None]
    if "num_images" in result:
        bits.append(f"images={result['num_images']}")
    return ", ".join(bits)


def format_comparison(results: Mapping[str, Mapping], *, per_class: bool = True) -> str:
    """Several results (e.g. one per method) side by side: per-class IoU, then the summary.

    Args:
        results: {column name (e.g. method): result of `evaluate`}; a result holding only
            {"error": message} (a method that could not run) gets "-" and a footnote.
        per_class: include the per-class IoU rows.
    """
    columns = list(results)
    ran = [results[c] for c in columns if "error" not in results[c]]
    if not ran:
        return "\n".join(f"{c}: {results[c]['error']}" for c in columns)
    rows = []
    if per_class:
        for name in ran[0]["IoU"]:
            rows.append([name, *(_cell(results[c].get("IoU", {}).get(name)) for c in columns)])
        rows.append([""] * (len(columns) + 1))
    for key in SUMMARY_KEYS:
        if any(key in result for result in ran):
            rows.append([key, *(_cell(results[c].get(key)) for c in columns)])
    notes = [f"{c}: {results[c]['error']}" for c in columns if "error" in results[c]]
    header = ["IoU" if per_class else "metric", *columns]
    return "\n".join([_rows_to_text(header, rows), *notes])


def _zegkit_version() -> str:
    from zegkit import __version__

    return __version__


def run_record(settings: Mapping[str, object] | None = None) -> dict[str, object]:
    """Settings plus the UTC timestamp and zegkit version, as recorded with a result."""
    record = dict(settings or {})
    record["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record["zegkit_version"] = _zegkit_version()
    return record


def save_results(path: str | os.PathLike, result: Mapping) -> Path:
    """Write a result (or {name: result}) as JSON, atomically, creating the parent folder.

    Returns:
        The path written.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json_atomic(dict(result), path)
    return path


# --------------------------------------------------------------------------------------------
# Distributed


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly one-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistributedContext:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or report a single process.

    Uses nccl when CUDA is available and `device` is not "cpu", gloo otherwise; with nccl each
    process uses GPU LOCAL_RANK. Safe to call twice: an initialised group is reused.

    Args:
        device: "cpu" forces gloo and CPU; None picks CUDA when available.

    Returns:
        rank, world size, local rank, backend and the device this process should compute on.
    """
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
    elif int(os.environ.get("WORLD_SIZE", 1)) > 1:
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    else:
        return DistributedContext(device=device or ("cuda" if use_cuda else "cpu"))
    compute = f"cuda:{local_rank}" if backend == "nccl" else (device or "cpu")
    return DistributedContext(
        dist.get_rank(), dist.get_world_size(), local_rank, str(backend), compute
    )


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    if _world()[1] == 1:
        return tensor
    on_gpu = dist.get_backend() == "nccl"  # nccl reduces CUDA tensors only
    reduced = tensor.to(f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


# --------------------------------------------------------------------------------------------
# Checkpoints


def rank_checkpoint_path(path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The checkpoint file of one rank: `path` itself for one process, else path.rankR-of-N."""
    path = Path(path).expanduser()
    if world_size == 1:
        return path
    return path.with_name(f"{path.stem}.rank{rank}-of-{world_size}{path.suffix}")


def _fingerprint(dataset: SegmentationDataset, settings: Mapping, rank: int, world: int) -> dict:
    stable = {k: v for k, v in settings.items() if k not in VOLATILE_SETTINGS}
    return {
        "format": CHECKPOINT_FORMAT,
        "dataset": dataset.name,
        "root": str(dataset.root),
        "split": dataset.split,
        "num_images": len(dataset),
        "class_names": list(dataset.class_names),
        "rank": rank,
        "world_size": world,
        "settings": _jsonable(stable),
    }


def _jsonable(value: object) -> object:
    """Settings as plain JSON values (so fingerprints compare equal after a save/load)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _load_checkpoint(path: Path, fingerprint: dict, num_classes: int) -> tuple[Tensor, set[int]]:
    if not path.exists():
        return torch.zeros(num_classes, num_classes, dtype=torch.int64), set()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved, conf, done = state["fingerprint"], state["confusion"], set(state["done"])
    except Exception as error:  # any unreadable file gets the same advice
        raise RuntimeError(
            f"Checkpoint {path} cannot be read ({error}). Delete it to start over."
        ) from error
    if saved != fingerprint:
        changes = _differences(saved, fingerprint)
        raise RuntimeError(
            f"Checkpoint {path} was written by a run with different settings ({changes}); "
            f"resuming would mix two evaluations. Delete it, or pass another checkpoint path, "
            f"to start this evaluation from the beginning."
        )
    return conf, done


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


def _save_checkpoint(path: Path, fingerprint: dict, conf: Tensor, done: set[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": fingerprint, "confusion": conf.clone(), "done": sorted(done)}
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)


# --------------------------------------------------------------------------------------------
# The evaluation loop


class _Indexed(Dataset):
    """Items of `dataset` at `indices`, each tagged with its dataset index."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, tuple[Tensor, Tensor, str]]:
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


def evaluate(
    segmenter: object,
    dataset: SegmentationDataset,
    *,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    num_workers: int = 2,
    settings: Mapping[str, object] | None = None,
    seen: Sequence[int] | None = None,
    unseen: Sequence[int] | None = None,
    limit: int | None = None,
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
        num_workers: DataLoader worker processes decoding images (0: decode in this process).
        settings: what produced the result (method, model, protocol, ...); recorded with it and
            part of the checkpoint fingerprint.
        seen: seen class indices (default: the dataset's).
        unseen: unseen class indices (default: the dataset's).
        limit: evaluate only the first `limit` images.

    Returns:
        `metrics` of the summed confusion matrix, plus "confusion" (K x K list), "num_images",
        "resumed_images", "world_size", "seconds", "images_per_second" and "settings".

    Raises:
        ValueError: the dataset has no masks, bad arguments, or predictions out of range.
        RuntimeError: the checkpoint belongs to other settings or cannot be read, or predict
            returned the wrong shape.
    """
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
    rank, world = _world()
    settings = dict(settings or {})
    settings["limit"] = limit
    total = len(dataset) if limit is None else min(limit, len(dataset))
    mine = list(range(rank, total, world))
    fingerprint = _fingerprint(dataset, settings, rank, world)
    path = None if checkpoint is None else rank_checkpoint_path(checkpoint, rank, world)
    num_classes = dataset.num_classes
    if path is None:
        conf, done = torch.zeros(num_classes, num_classes, dtype=torch.int64), set()
    else:
        conf, done = _load_checkpoint(path, fingerprint, num_classes)
    resumed = len(done)
    todo = [index for index in mine if index not in done]

    if hasattr(segmenter, "set_vocabulary"):
        segmenter.set_vocabulary(dataset.class_names)
    loader = DataLoader(
        _Indexed(dataset, todo), batch_size=None, shuffle=False, num_workers=num_workers
    )
    bar = tqdm(total=len(mine), initial=resumed, unit="img", desc=dataset.name,
               disable=not progress or rank != 0, dynamic_ncols=True)
    start, since_save = time.perf_counter(), 0
    with torch.inference_mode(), bar:
        for index, (image, mask, name) in loader:
            bar.set_postfix_str(name, refresh=False)
            conf += confusion_matrix(_predict(segmenter, image), mask, num_classes,
                                     dataset.ignore_index)
            done.add(index)
            since_save += 1
            bar.update()
            if path is not None and since_save >= checkpoint_every:
                _save_checkpoint(path, fingerprint, conf, done)
                since_save = 0
    if path is not None and (since_save or not path.exists()):
        _save_checkpoint(path, fingerprint, conf, done)
    seconds = time.perf_counter() - start

    conf = _all_reduce_sum(conf)
    counts = _all_reduce_sum(torch.tensor([len(done), resumed, len(todo)], dtype=torch.int64))
    seen = dataset.seen if seen is None and unseen is None else seen
    unseen = dataset.unseen if unseen is None else unseen
    result = metrics(conf, dataset.class_names, seen, unseen)
    processed = int(counts[2])
    result.update(
        confusion=conf.tolist(),
        num_images=int(counts[0]),
        resumed_images=int(counts[1]),
        world_size=world,
        seconds=seconds,
        images_per_second=processed / seconds if seconds > 0 and processed else None,
        settings=run_record({**settings, "dataset": dataset.name, "data_root": str(dataset.root),
                             "split": dataset.split}),
    )
    return result



# --------------------------------------------------------------------------------------------
# Runs: what `zegkit eval` calls


def _protocol_for(dataset: SegmentationDataset, protocol: str | None):
    from zegkit.data.protocols import default_protocol, get_protocol

    if protocol is None:
        return default_protocol(dataset.name)
    chosen = get_protocol(protocol)
    if chosen.dataset != dataset.name:
        raise ValueError(
            f"Protocol {chosen.name!r} is for dataset {chosen.dataset!r}, not {dataset.name!r}; "
            f"pick a {dataset.name} protocol (zegkit.data.protocols.list_protocols())."
        )
    return chosen


def evaluate_method(
    dataset: SegmentationDataset,
    method: str = "sclip",
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    protocol: str | None = None,
    device: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    num_workers: int = 2,
    progress: bool = True,
    limit: int | None = None,
    **overrides: object,
) -> dict:
    """Build a segmenter for `method` under a protocol and evaluate it on `dataset`.

    The protocol (default: the dataset's, see `zegkit.data.protocols.DEFAULT_PROTOCOLS`) sets the
    InferenceConfig fields it defines and the seen/unseen split; `overrides` (InferenceConfig
    fields or method settings, None values ignored) win over it.

    Args:
        dataset: from `zegkit.data.load_dataset`.
        method: a name from `zegkit.list_methods()`.
        model: CLIP weights (hub id, directory, checkpoint file or shipped short name).
        protocol: a protocol name, or None for the dataset's default.
        device: where to run (default: the distributed context's device, else CPU/CUDA).
        checkpoint, checkpoint_every, num_workers, progress, limit: as in `evaluate`.
        **overrides: e.g. logit_scale=50, refine="pamr", precision="bf16".

    Returns:
        The `evaluate` result; its "settings" record method, model, protocol and the
        inference configuration used.
    """
    prepared = _prepare(dataset, method, model, protocol, device, overrides)
    return _evaluate_prepared(
        prepared, dataset, progress=progress, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, num_workers=num_workers, limit=limit,
    )


@dataclass
class _Prepared:
    segmenter: object
    settings: dict
    seen: list[int] | None
    unseen: list[int] | None


def _prepare(
    dataset: SegmentationDataset,
    method: str,
    model: str | os.PathLike,
    protocol: str | None,
    device: str | None,
    overrides: Mapping[str, object],
) -> _Prepared:
    """Load the segmenter a protocol asks for (the step that fails for missing weights)."""
    from zegkit.segmenter import load_segmenter

    chosen = _protocol_for(dataset, protocol)
    overrides = {key: value for key, value in overrides.items() if value is not None}
    device = device or init_distributed().device
    inference = None
    if chosen is not None:
        from zegkit.inference import InferenceConfig

        inference = InferenceConfig(**chosen.inference_overrides())
    segmenter = load_segmenter(method, model, device=device, inference=inference, **overrides)
    seen, unseen = (None, None) if chosen is None else chosen.split_indices(dataset.class_names)
    settings = {
        "method": method,
        "model": str(model),
        "protocol": None if chosen is None else chosen.name,
        "protocol_settings": None if chosen is None else chosen.to_dict(),
        "inference": asdict(segmenter.config),
        "overrides": overrides,
        "device": str(device),
    }
    return _Prepared(segmenter, settings, seen, unseen)


def _evaluate_prepared(prepared: _Prepared, dataset: SegmentationDataset, **kwargs) -> dict:
    return evaluate(prepared.segmenter, dataset, settings=prepared.settings,
                    seen=prepared.seen, unseen=prepared.unseen, **kwargs)


def run_eval(
    dataset: str,
    data_root: str | os.PathLike,
    *,
    split: str = "val",
    output: str | os.PathLike | None = None,
    **kwargs: object,
) -> dict:
    """`zegkit eval` for one method: load the dataset, evaluate, save JSON on rank 0.

    Args:
        dataset: a `zegkit.data.load_dataset` name.
        data_root: its root folder.
        split: the dataset split.
        output: JSON file for the result (written by rank 0 only, atomically).
        **kwargs: `evaluate_method` arguments (method, model, protocol, device, checkpoint, ...).

    Returns:
        The result (identical on every rank).
    """
    from zegkit.data.datasets import load_dataset

    context = init_distributed(kwargs.pop("device", None))
    data = load_dataset(dataset, data_root, split)
    result = evaluate_method(data, device=context.device, **kwargs)
    if output is not None and context.is_main:
        save_results(output, result)
    return result


def method_checkpoint(checkpoint: str | os.PathLike | None, method: str) -> Path | None:
    """Per-method checkpoint path for `--method all`: run.pt -> run.<method>.pt."""
    if checkpoint is None:
        return None
    path = Path(checkpoint).expanduser()
    return path.with_name(f"{path.stem}.{method}{path.suffix}")


def run_eval_all(
    dataset: str,
    data_root: str | os.PathLike,
    *,
    methods: Sequence[str] | None = None,
    split: str = "val",
    output: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    **kwargs: object,
) -> dict[str, dict]:
    """`zegkit eval --method all`: every method (default: all of zegkit.methods.METHODS).

    A method that cannot be built (weights not downloaded, an optional dependency missing, a
    shared override it does not have) is recorded as {"error": message} and the others still
    run; errors while evaluating are not caught. Print the outcome with `format_comparison`.

    Args:
        dataset, data_root, split: as in `run_eval`.
        methods: the method names to run, in column order.
        output: one JSON file holding {"results": {method: result}, "settings": ...}.
        checkpoint: base checkpoint path; each method resumes from its own (`method_checkpoint`).
        **kwargs: `evaluate_method` arguments shared by all methods (model, protocol, ...).

    Returns:
        {method: result or {"error": message}}.
    """
    from zegkit.data.datasets import load_dataset
    from zegkit.methods import METHODS

    names = list(METHODS) if methods is None else list(methods)
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; available: {sorted(METHODS)}.")
    context = init_distributed(kwargs.pop("device", None))
    data = load_dataset(dataset, data_root, split)
    run_keys = ("progress", "checkpoint_every", "num_workers", "limit")
    run_args = {key: kwargs.pop(key) for key in run_keys if key in kwargs}
    model = kwargs.pop("model", DEFAULT_MODEL)
    protocol = kwargs.pop("protocol", None)
    _protocol_for(data, protocol)  # a wrong protocol fails once, before any method runs
    results: dict[str, dict] = {}
    for name in names:
        try:
            prepared = _prepare(data, name, model, protocol, context.device, kwargs)
        except BUILD_ERRORS as error:  # e.g. weights not downloaded, a setting it lacks
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        results[name] = _evaluate_prepared(
            prepared, data, checkpoint=method_checkpoint(checkpoint, name), **run_args
        )
    if output is not None and context.is_main:
        record = run_record({"dataset": dataset, "data_root": str(data_root), "split": split,
                             "methods": names})
        save_results(output, {"results": results, "settings": record})
    return results
