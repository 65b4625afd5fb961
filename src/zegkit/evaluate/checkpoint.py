"""Per-rank resume checkpoints of an evaluation, refused when written for other settings.

With ``checkpoint=path``, every `checkpoint_every` images each rank writes its matrix and the
indices it has done (atomically; one file per rank, `rank_checkpoint_path`). A rerun with the
same path and the same settings skips those images and ends with the identical matrix; a
checkpoint written for other settings is refused, naming what changed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from zegkit.data.base import SegmentationDataset
from zegkit.io import atomic_write

CHECKPOINT_FORMAT = 1  # bump when the checkpoint contents change meaning
# Settings that may differ between a run and its resumption (not part of the fingerprint).
VOLATILE_SETTINGS = ("timestamp", "zegkit_version", "checkpoint", "num_workers", "progress")


def rank_checkpoint_path(path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The checkpoint file of one rank: `path` itself for one process, else path.rankR-of-N."""
    path = Path(path).expanduser()
    if world_size == 1:
        return path
    return path.with_name(f"{path.stem}.rank{rank}-of-{world_size}{path.suffix}")


def fingerprint_of(dataset: SegmentationDataset, settings: Mapping, rank: int, world: int) -> dict:
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


def load_checkpoint(path: Path, fingerprint: dict, num_classes: int) -> tuple[Tensor, set[int]]:
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


def save_checkpoint(path: Path, fingerprint: dict, conf: Tensor, done: set[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": fingerprint, "confusion": conf.clone(), "done": sorted(done)}
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)
