"""Runs: what `zegkit eval` calls — build a method's segmenter under a protocol, evaluate it."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from zegkit.data.base import SegmentationDataset
from zegkit.distributed import init_distributed
from zegkit.evaluate.loop import evaluate
from zegkit.evaluate.report import run_record, save_results
from zegkit.hardware import cores_per_process, default_eval_workers
from zegkit.io import jsonable

# What building a method's segmenter raises when the method cannot run here (run_eval_all).
BUILD_ERRORS = (FileNotFoundError, ImportError, RuntimeError, ValueError)


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


def _model_or_default(model: str | os.PathLike | None) -> str | os.PathLike:
    """`model`, or the default CLIP (imported here: `zegkit.backbone` pulls in transformers)."""
    if model is not None:
        return model
    from zegkit.backbone import DEFAULT_MODEL

    return DEFAULT_MODEL


def evaluate_method(
    dataset: SegmentationDataset,
    method: str = "sclip",
    model: str | os.PathLike | None = None,
    *,
    protocol: str | None = None,
    device: str | None = None,
    progress_file: str | os.PathLike | None = None,
    progress_every: int = 50,
    num_workers: int | None = None,
    progress: bool = True,
    limit: int | None = None,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
    **overrides: object,
) -> dict:
    """Build a segmenter for `method` under a protocol and evaluate it on `dataset`.

    The protocol (default: the dataset's, see `zegkit.data.protocols.DEFAULT_PROTOCOLS`) sets the
    InferenceConfig fields it defines and the seen/unseen split; `overrides` (InferenceConfig
    fields, method settings or a trained method's `checkpoint`, None values ignored) win over it.

    Args:
        dataset: from `zegkit.data.load_dataset`.
        method: a name from `zegkit.list_methods()`.
        model: CLIP weights (hub id, directory, checkpoint file or shipped short name);
            None: `zegkit.backbone.DEFAULT_MODEL`.
        protocol: a protocol name, or None for the dataset's default.
        device: where to run (default: the distributed context's device, else CPU/CUDA).
        progress_file, progress_every: `evaluate`'s checkpoint and checkpoint_every (a resumable
            record of the images done so far).
        num_workers: as in `evaluate`; None: `zegkit.hardware.default_eval_workers` for this
            process's cores and the device.
        progress, limit, bootstrap, bootstrap_seed: as in `evaluate`.
        **overrides: e.g. logit_scale=50, refine="pamr", precision="bf16", templates="single",
            checkpoint="runs/zc/last.safetensors" (a trained method's weights).

    Returns:
        The `evaluate` result; its "settings" record method, model, protocol and the
        inference configuration used.
    """
    prepared = _prepare(dataset, method, _model_or_default(model), protocol, device, overrides)
    return _evaluate_prepared(
        prepared, dataset, progress=progress, progress_file=progress_file,
        progress_every=progress_every, num_workers=num_workers, limit=limit,
        bootstrap=bootstrap, bootstrap_seed=bootstrap_seed,
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
    segmenter = load_segmenter(method, model, device=device, protocol=chosen, **overrides)
    seen, unseen = (None, None) if chosen is None else chosen.split_indices(dataset.class_names)
    settings = {
        **segmenter.settings(),
        "protocol_settings": None if chosen is None else chosen.to_dict(),
        "overrides": jsonable(overrides),
        "device": str(device),
    }
    return _Prepared(segmenter, settings, seen, unseen)


def _evaluate_prepared(prepared: _Prepared, dataset: SegmentationDataset, *,
                       progress_file: str | os.PathLike | None = None, progress_every: int = 50,
                       num_workers: int | None = None, **kwargs) -> dict:
    if num_workers is None:
        num_workers = default_eval_workers(cores_per_process(), prepared.settings["device"])
    return evaluate(prepared.segmenter, dataset, settings=prepared.settings,
                    seen=prepared.seen, unseen=prepared.unseen, checkpoint=progress_file,
                    checkpoint_every=progress_every, num_workers=num_workers, **kwargs)


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
        **kwargs: `evaluate_method` arguments (method, model, protocol, device, checkpoint,
            progress_file, ...).

    Returns:
        The result (identical on every rank).
    """
    from zegkit.data.datasets import load_dataset
    from zegkit.data.protocols import fold_protocols

    protocol = kwargs.get("protocol")
    if protocol is not None and fold_protocols(protocol):
        return run_episode_eval(dataset, data_root, kwargs.pop("protocol"), split=split,
                                output=output, **_episode_arguments(kwargs))
    _refuse_proposals(kwargs)
    context = init_distributed(kwargs.pop("device", None))
    data = load_dataset(dataset, data_root, split)
    result = evaluate_method(data, device=context.device, **kwargs)
    if output is not None and context.is_main:
        save_results(output, result)
    return result


FOLD_PLACEHOLDER = "{fold}"  # in a checkpoint path: replaced by each fold's number


def run_episode_eval(
    dataset: str,
    data_root: str | os.PathLike,
    protocol: str,
    *,
    method: str = "sclip",
    model: str | os.PathLike | None = None,
    split: str = "val",
    output: str | os.PathLike | None = None,
    device: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    **overrides: object,
) -> dict:
    """`zegkit eval` with an episode protocol (`zegkit.evaluate.episodes`): a fold set's four
    folds (or one fold), each with its own 1-way episodes, then the mean over folds.

    Args:
        dataset, data_root, split, output: as in `run_eval`.
        protocol: a fold set ("pascal-5i", "coco-20i", "synthetic-4x5") or one fold protocol.
        method, model, device: as in `evaluate_method`.
        checkpoint: a trained method's file; for a fold set it must contain "{fold}", replaced
            by each fold's number (a trained method has one checkpoint per fold).
        progress: progress bars (rank 0).
        **overrides: InferenceConfig fields and method settings (None values ignored), e.g.
            proposals="self" for ClsCLIP+'s zoom-in (`zegkit.zoom`).

    Returns:
        One fold: its episode metrics. A fold set: `fold_mean` of its folds (per-class IoU of
        every fold's classes, mean mIoU and FB-IoU, and each fold's in "folds").

    Raises:
        ValueError: not an episode protocol, or a fold set with one checkpoint for all folds.
    """
    from zegkit.data.datasets import load_dataset
    from zegkit.data.protocols import fold_protocols
    from zegkit.evaluate.episodes import evaluate_episodes, fold_mean, segmenter_predict

    folds = fold_protocols(protocol)
    if not folds:
        raise ValueError(f"Protocol {protocol!r} is not an episode protocol (a fold set: "
                         "pascal-5i, coco-20i, synthetic-4x5, or one of their folds).")
    if checkpoint is not None and len(folds) > 1 and FOLD_PLACEHOLDER not in str(checkpoint):
        raise ValueError(f"{protocol} has {len(folds)} folds, each trained on the others: give "
                         f"one checkpoint per fold with {FOLD_PLACEHOLDER} in the path, e.g. "
                         f"runs/clsclip-synthetic-fold{FOLD_PLACEHOLDER}/last.safetensors.")
    context = init_distributed(device)
    data = load_dataset(dataset, data_root, split)
    results = []
    for fold in folds:
        number = fold.name.rsplit("fold", 1)[1]
        path = None if checkpoint is None else str(checkpoint).replace(FOLD_PLACEHOLDER, number)
        prepared = _prepare(data, method, _model_or_default(model), fold.name, context.device,
                            {**overrides, "checkpoint": path})
        result = evaluate_episodes(segmenter_predict(prepared.segmenter), data, fold,
                                   progress=progress)
        results.append({**result, "settings": prepared.settings})
    combined = results[0] if len(folds) == 1 else {
        **fold_mean(results),
        "settings": {**results[0]["settings"], "protocol": protocol,
                     "checkpoint": None if checkpoint is None else str(checkpoint)},
    }
    if output is not None and context.is_main:
        save_results(output, combined)
    return combined


def _refuse_proposals(kwargs: dict) -> None:
    """Drop the (unset) zoom-in option of a dense evaluation.

    Raises:
        ValueError: proposals were given (the zoom-in is evaluated on episode protocols).
    """
    if kwargs.pop("proposals", None) is not None:
        raise ValueError("--proposals (ClsCLIP+'s zoom-in) is evaluated with an episode "
                         "protocol (--protocol synthetic-4x5, pascal-5i, coco-20i); for one "
                         "image use `zegkit segment --proposals`.")


def _episode_arguments(kwargs: dict) -> dict:
    """`run_eval`'s arguments for `run_episode_eval`: the dense loop's options dropped where
    they are unset or only tune the dense loop (workers, progress-file interval).

    Raises:
        ValueError: a dense-loop option that episodes do not have (progress file, limit,
            bootstrap).
    """
    given = [key for key in ("progress_file", "limit", "bootstrap") if kwargs.get(key)]
    if given:
        raise ValueError(f"{given} are options of the dense evaluation; an episode protocol "
                         "runs its fixed, seeded episodes (drop them).")
    dropped = ("progress_file", "limit", "bootstrap", "num_workers", "progress_every")
    return {key: value for key, value in kwargs.items() if key not in dropped}


def method_progress_file(progress_file: str | os.PathLike | None, method: str) -> Path | None:
    """Per-method progress file for `--method all`: run.pt -> run.<method>.pt."""
    if progress_file is None:
        return None
    path = Path(progress_file).expanduser()
    return path.with_name(f"{path.stem}.{method}{path.suffix}")


def run_eval_all(
    dataset: str,
    data_root: str | os.PathLike,
    *,
    methods: Sequence[str] | None = None,
    split: str = "val",
    output: str | os.PathLike | None = None,
    progress_file: str | os.PathLike | None = None,
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
        progress_file: base progress-file path; each method resumes from its own
            (`method_progress_file`).
        **kwargs: `evaluate_method` arguments shared by all methods (model, protocol, ...).

    Returns:
        {method: result or {"error": message}}.
    """
    from zegkit.data.datasets import load_dataset
    from zegkit.data.protocols import fold_protocols
    from zegkit.methods import METHODS

    if kwargs.get("protocol") and fold_protocols(kwargs["protocol"]):
        raise ValueError("An episode protocol evaluates one method at a time (a trained method "
                         "has a checkpoint per fold): run --method NAME for each.")
    _refuse_proposals(kwargs)
    names = list(METHODS) if methods is None else list(methods)
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; available: {sorted(METHODS)}.")
    context = init_distributed(kwargs.pop("device", None))
    data = load_dataset(dataset, data_root, split)
    run_keys = ("progress", "progress_every", "num_workers", "limit", "bootstrap",
                "bootstrap_seed")
    run_args = {key: kwargs.pop(key) for key in run_keys if key in kwargs}
    model = _model_or_default(kwargs.pop("model", None))
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
            prepared, data, progress_file=method_progress_file(progress_file, name), **run_args
        )
    if output is not None and context.is_main:
        record = run_record({"dataset": dataset, "data_root": str(data_root), "split": split,
                             "methods": names})
        save_results(output, {"results": results, "settings": record})
    return results
