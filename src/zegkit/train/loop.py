"""`zegkit train`: train a method's parameters on a frozen CLIP, on one process or many.

Read top to bottom: set up (process group, backbone, method, data, optimiser), maybe resume, then
one loop of optimiser steps, each with gradient accumulation, clipping, the recipe's schedule, a
JSON log line, and at intervals a checkpoint and an evaluation with `zegkit.evaluate`.

Run folder (`out`):
    recipe.json         the resolved recipe (a resumed run must match it)
    log.jsonl           one line per logged step: step, loss terms, lr, images/s; eval lines
    state.pt            everything needed to resume exactly: method tensors, optimiser, step,
                        every rank's RNG states (written atomically, after the method
                        files: the one file resume reads, so it commits a checkpoint)
    last.safetensors    the method checkpoint (`zegkit.methods.checkpoint`), for eval/segment
    step_<N>.safetensors  kept checkpoints (recipe.keep_steps, e.g. the transductive stage's init)
    eval.json           the last evaluation

Data parallelism: under torchrun every process takes its share of each global batch (the
loader's keys depend only on the seed and the step), DDP averages the gradients, and the loss
normalises by counts all-reduced over processes, so N processes compute the one-process step.

Data: segmentation masks (`zegkit.train.data`, batches of `Batch`) or image-caption pairs
(`zegkit.train.captions`, recipes whose dataset is "synthetic-captions" or "captions", batches of
`CaptionBatch`). A caption corpus has no held-out masks: only the proving ground's captions are
evaluated during training; evaluate others with `zegkit eval --checkpoint`.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from zegkit.backbone import ClipBackbone, load_clip
from zegkit.data.worker_errors import raise_caught
from zegkit.distributed import DistributedContext, all_reduce_sum, barrier, init_distributed
from zegkit.hardware import autocast_dtype
from zegkit.io import atomic_write, save_json_atomic
from zegkit.methods import Method, create_method
from zegkit.methods.base import Batch, CaptionBatch
from zegkit.methods.checkpoint import load_method, save_method
from zegkit.text import TextEmbeddings, encode_vocabulary
from zegkit.train.captions import build_caption_loader, is_caption_dataset, load_caption_set
from zegkit.train.data import (
    build_train_loader,
    check_training_set,
    load_training_set,
    seen_class_mask,
    zero_shot_split,
)
from zegkit.train.recipes import Recipe, recipe_from_dict

STATE_FILE = "state.pt"
RECIPE_FILE = "recipe.json"
LOG_FILE = "log.jsonl"
LAST_FILE = "last.safetensors"
HELD_OUT_SEED = 1  # the synthetic held-out scenes (write_dataset seeds; training scenes differ)
HELD_OUT_SCENES = 100  # when the recipe sets no eval_images


class _Loss(nn.Module):
    """A method's loss as `forward`, so DDP can hook it; the frozen backbone stays outside the
    wrapped module (DDP would broadcast its weights)."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, backbone: ClipBackbone, batch: Batch | CaptionBatch,
                text: TextEmbeddings | None) -> dict:
        return self.method.loss(backbone, batch, text)


def learning_rate(step: int, base_lr: float, recipe: Recipe) -> float:
    """The lr of a parameter group with base lr `base_lr` at `step`: (base - min) · poly + min,
    scaled during the warm-up."""
    progress = step / recipe.iterations
    regular = (base_lr - recipe.min_lr) * (1 - progress) ** recipe.poly_power + recipe.min_lr
    if step < recipe.warmup_iterations:
        k = (1 - step / recipe.warmup_iterations) * (1 - recipe.warmup_ratio)
        return regular * (1 - k)
    return regular


def _multiplier(name: str, multipliers: dict[str, float]) -> float:
    """The lr multiplier of parameter `name`: its longest matching prefix's, else 1."""
    matches = [prefix for prefix in multipliers if name == prefix or name.startswith(f"{prefix}.")]
    return multipliers[max(matches, key=len)] if matches else 1.0


def parameter_groups(method: Method, recipe: Recipe) -> list[dict[str, Any]]:
    """AdamW groups by (lr multiplier, decay): LayerNorm weights and biases get no decay."""
    norms = {id(p) for m in method.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, parameter in method.named_parameters():
        if parameter.requires_grad:
            key = (_multiplier(name, recipe.lr_multipliers), id(parameter) not in norms)
            groups.setdefault(key, []).append(parameter)
    return [
        {"params": params, "base_lr": recipe.lr * mult, "lr": recipe.lr * mult,
         "weight_decay": recipe.weight_decay if decay else 0.0}
        for (mult, decay), params in sorted(groups.items())
    ]


def _method_settings(recipe: Recipe, seen_names: list[str]) -> dict[str, Any]:
    """The recipe's method settings, plus the seen classes for methods that record them."""
    from zegkit.methods import METHODS

    settings = dict(recipe.method_settings)
    config_fields = {f.name for f in fields(METHODS[recipe.method][0])}
    if "seen_classes" in config_fields and "seen_classes" not in settings:
        settings["seen_classes"] = tuple(seen_names)
    return settings


def _held_out(recipe: Recipe, data_root: str | os.PathLike | None, out: Path,
              context: DistributedContext):
    """The evaluation split: the benchmark's val split, or generated synthetic scenes (also for
    the proving ground's captions); None for a caption corpus (no masks)."""
    from zegkit.data import load_dataset
    from zegkit.data.synthetic import write_dataset

    if is_caption_dataset(recipe.dataset):
        if recipe.dataset != "synthetic-captions":
            return None
    elif recipe.dataset != "synthetic" or data_root is not None:
        return load_dataset(recipe.dataset, data_root, "val")
    folder = out / "held_out"
    if context.is_main and not (folder / "split.json").exists():
        write_dataset(folder, recipe.eval_images or HELD_OUT_SCENES, seed=HELD_OUT_SEED,
                      size=recipe.crop)
    barrier()
    return load_dataset("synthetic", folder)


def _evaluate(method: Method, backbone: ClipBackbone, recipe: Recipe, held_out,
              seen: list[int], unseen: list[int]) -> dict:
    """Evaluate the method as it is now with the recipe's protocol, through `zegkit.evaluate`."""
    from zegkit.data.protocols import get_protocol
    from zegkit.evaluate import evaluate
    from zegkit.evaluate.episodes import evaluate_episodes, segmenter_predict
    from zegkit.inference import InferenceConfig
    from zegkit.segmenter import Segmenter

    protocol = get_protocol(recipe.protocol) if recipe.protocol else None
    config = InferenceConfig(**(protocol.inference_overrides() if protocol else {}))
    method.eval()
    segmenter = Segmenter(backbone, method, config, protocol=recipe.protocol)
    if protocol is not None and protocol.episodes:  # a fold protocol: its 1-way episodes
        result = evaluate_episodes(segmenter_predict(segmenter), held_out, protocol,
                                   progress=False)
    else:
        result = evaluate(segmenter, held_out, progress=False, num_workers=0, seen=seen,
                          unseen=unseen, limit=recipe.eval_images)
    method.train()
    keys = ("mIoU", "mIoU(S)", "mIoU(U)", "hIoU", "FB-IoU", "aAcc", "num_images",
            "num_episodes")
    return {key: result[key] for key in keys if key in result}


def _save_state(out: Path, method: Method, optimizer: torch.optim.Optimizer, step: int,
                context: DistributedContext) -> None:
    """Write state.pt (rank 0; every rank's RNG gathered) atomically."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    states = [rng]
    if context.world_size > 1:
        states = [None] * context.world_size
        dist.all_gather_object(states, rng)
    if context.is_main:
        state = {"step": step, "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng": states}
        with atomic_write(out / STATE_FILE, "wb") as handle:
            torch.save(state, handle)


def _restore_state(out: Path, method: Method, optimizer: torch.optim.Optimizer,
                   context: DistributedContext) -> int:
    """Load state.pt; returns the step to continue from."""
    state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=False)
    if len(state["rng"]) != context.world_size:
        raise RuntimeError(
            f"{out / STATE_FILE} was written by {len(state['rng'])} processes; resume it with "
            f"the same number (torchrun --nproc-per-node {len(state['rng'])}), or the data and "
            "dropout streams would differ."
        )
    method.load_state_dict(state["method"])
    optimizer.load_state_dict(state["optimizer"])
    rng = state["rng"][context.rank]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"])


def _prepare_out(out: Path, recipe: Recipe, resume: bool, context: DistributedContext) -> None:
    """Create the run folder, or check that a resumed run is the same recipe.

    Raises:
        FileExistsError: a run is there and `resume` is False.
        ValueError: resuming with a different recipe (the differing fields are named).
    """
    has_run = (out / STATE_FILE).exists()
    if has_run and not resume:
        raise FileExistsError(
            f"{out} already holds a training run; continue it with --resume, or pass another --out."
        )
    if has_run:
        saved = recipe_from_dict(json.loads((out / RECIPE_FILE).read_text())).to_dict()
        current = recipe.to_dict()
        differ = sorted(key for key in current if saved.get(key) != current[key])
        if differ:
            raise ValueError(
                f"--resume: the run in {out} used another recipe (fields {differ} differ); "
                "resume with the same --recipe and --set values, or pass another --out."
            )
    elif context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_json_atomic(recipe.to_dict(), out / RECIPE_FILE)
    barrier()


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written by a run that was killed after its last checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line and json.loads(line).get("step", 0) <= step]
    with atomic_write(path, "w") as handle:
        handle.write("".join(f"{line}\n" for line in kept))


def _log(out: Path, record: dict[str, Any]) -> None:
    with open(out / LOG_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def train(
    recipe: Recipe,
    out: str | os.PathLike,
    *,
    data_root: str | os.PathLike | None = None,
    device: str | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    num_workers: int = 2,
    log_every: int = 10,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `recipe.method` as the recipe says; write the run folder (module docstring).

    Args:
        recipe: the resolved recipe (see `zegkit.train.recipes`).
        out: the run folder.
        data_root: the training dataset's root (None for the generated synthetic ground).
        device: where to compute (None: the distributed context's choice).
        max_steps: stop after this many steps of this invocation's schedule position (the
            schedule stays the recipe's); None: run to `recipe.iterations`.
        resume: continue the run in `out` exactly where its last checkpoint left it.
        num_workers: data-loading worker processes per process.
        log_every: steps between log lines.
        progress: show a progress bar on rank 0.

    Returns:
        {"step": last step, "seconds": ..., "images_per_second": ..., "eval": last evaluation}.
    """
    out = Path(out).expanduser()
    context = init_distributed(device)
    _prepare_out(out, recipe, resume, context)
    torch.manual_seed(recipe.seed)

    backbone = load_clip(recipe.model, device=context.device)
    captions = is_caption_dataset(recipe.dataset)
    if captions:
        dataset = load_caption_set(recipe.dataset, data_root, size=recipe.crop, seed=recipe.seed)
        dataset.check()
    else:
        dataset = load_training_set(recipe.dataset, data_root, size=recipe.crop)
        check_training_set(dataset)
    seen, unseen = zero_shot_split(dataset, recipe.protocol) if dataset.class_names else ([], [])
    seen_names = [dataset.class_names[i].split(";")[0].strip() for i in seen]
    settings = _method_settings(recipe, seen_names)
    if recipe.init_from:
        method = load_method(recipe.init_from, backbone, method=recipe.method, **settings)
    else:
        method = create_method(recipe.method, **settings)
        method.build(backbone)
    method = method.to(context.device).train()
    text = (encode_vocabulary(backbone, dataset.class_names,
                              templates=method.default_templates())
            if dataset.class_names else None)
    seen_mask = seen_class_mask(len(dataset.class_names), seen).to(context.device)
    self_training = bool(getattr(method.config, "self_training", False))

    optimizer = torch.optim.AdamW(parameter_groups(method, recipe), lr=recipe.lr,
                                  betas=recipe.betas, weight_decay=recipe.weight_decay)
    step = _restore_state(out, method, optimizer, context) if resume and (
        out / STATE_FILE).exists() else 0
    if context.is_main:
        _trim_log(out / LOG_FILE, step)
    wrapped = _Loss(method)
    if context.world_size > 1:
        device_ids = [context.local_rank] if context.backend == "nccl" else None
        wrapped = DistributedDataParallel(wrapped, device_ids=device_ids)

    end = recipe.iterations if max_steps is None else min(recipe.iterations, step + max_steps)
    accumulation = recipe.accumulation
    shared = dict(batch_size=recipe.batch_size // accumulation, seed=recipe.seed,
                  num_steps=end * accumulation, start_step=step * accumulation,
                  rank=context.rank, world_size=context.world_size, num_workers=num_workers,
                  device=context.device)
    if captions:
        loader = build_caption_loader(dataset, crop=recipe.crop, **shared)
    else:
        loader = build_train_loader(dataset, recipe.augment(),
                                    unseen=() if self_training else unseen,
                                    drop_unseen_images=recipe.drop_unseen_images, **shared)
    dtype = autocast_dtype(recipe.precision, context.device)
    device_type = torch.device(context.device).type
    held_out = _held_out(recipe, data_root, out, context)
    show = progress and context.is_main
    bar = tqdm(total=end, initial=step, desc=recipe.name, disable=not show)
    batches = iter(loader)
    started, images_done, evaluation = time.perf_counter(), 0, None
    while step < end:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, group["base_lr"], recipe)
        terms = _accumulated_step(wrapped, backbone, batches, accumulation, text,
                                  None if captions else seen_mask, dtype, device_type, context)
        if recipe.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(method.trainable_parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        images_done += recipe.batch_size
        rate = images_done / (time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(loss=f"{terms['loss']:.4f}", img_s=f"{rate:.1f}")
        if context.is_main and (step % log_every == 0 or step == end):
            _log(out, {"step": step, **terms, "lr": optimizer.param_groups[0]["lr"],
                       "images_per_second": round(rate, 2)})
        if step % recipe.checkpoint_every == 0 or step == end or step in recipe.keep_steps:
            _checkpoint(out, method, optimizer, step, backbone, recipe, context)
        if held_out is not None and (step == end or (recipe.eval_every
                                                     and step % recipe.eval_every == 0)):
            evaluation = _evaluate(method, backbone, recipe, held_out, seen, unseen)
            if context.is_main:
                _log(out, {"step": step, "eval": evaluation})
                save_json_atomic({"step": step, **evaluation}, out / "eval.json")
                bar.write(f"step {step}: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in evaluation.items()
                    if k != "num_images" and v is not None))
    bar.close()
    seconds = time.perf_counter() - started
    return {"step": step, "seconds": round(seconds, 2),
            "images_per_second": round(images_done / seconds, 2) if images_done else None,
            "eval": evaluation}


def _accumulated_step(wrapped: nn.Module, backbone: ClipBackbone, batches, accumulation: int,
                      text: TextEmbeddings | None, seen: Tensor | None, dtype: torch.dtype,
                      device_type: str, context: DistributedContext) -> dict[str, float]:
    """Forward and backward `accumulation` micro-batches; returns the mean loss terms.

    `seen` None: the loader yields (images, captions) pairs (a `CaptionBatch`), else (images,
    labels) (a `Batch` with the seen-class mask).
    """
    totals: dict[str, float] = {}
    for micro in range(accumulation):
        images, targets = raise_caught(next(batches))  # a worker's data error raised here
        images = images.to(context.device, non_blocking=True)
        parallel = isinstance(wrapped, DistributedDataParallel)
        method = (wrapped.module if parallel else wrapped).method
        pixels = method.normalize(backbone, images)
        batch = CaptionBatch(pixels, list(targets)) if seen is None else Batch(
            pixels, targets.to(context.device, non_blocking=True), seen)
        # DDP averages gradients on the last micro-batch's backward only
        last = micro == accumulation - 1
        with wrapped.no_sync() if parallel and not last else nullcontext():
            with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
                terms = wrapped(backbone, batch, text)
            (terms["loss"] / accumulation).backward()
        for key, value in terms.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach()) / accumulation
    if context.world_size == 1:
        return totals
    # each rank's terms are its share of the global loss: their mean is the global batch's
    reduced = all_reduce_sum(torch.tensor(list(totals.values()), dtype=torch.float64))
    return dict(zip(totals, (reduced / context.world_size).tolist(), strict=True))


def _checkpoint(out: Path, method: Method, optimizer: torch.optim.Optimizer, step: int,
                backbone: ClipBackbone, recipe: Recipe, context: DistributedContext) -> None:
    """The method file(s) for eval/segment first, state.pt (what resume reads) last.

    state.pt commits the checkpoint: a kill before it leaves the previous state.pt, and the
    resumed run redoes these steps and rewrites the same files. Written first, a kill between
    it and a kept step_<N> file would lose that file for good (resume starts past step N).
    """
    if context.is_main:
        save_method(method, out / LAST_FILE, backbone)
        if step in recipe.keep_steps:
            save_method(method, out / f"step_{step}.safetensors", backbone)
    _save_state(out, method, optimizer, step, context)
    barrier()
