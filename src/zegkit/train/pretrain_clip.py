"""Pretrain the tiny CLIP of the synthetic proving ground, from scratch, on CPU.

A small `transformers` CLIP (ViT with 16-pixel patches at 224 pixels, so sliding-window inference
with 224-pixel crops behaves as with ViT-B/16) and its own byte-level BPE tokenizer are trained with
CLIP's symmetric contrastive loss on (scene, caption) pairs streamed from
`zegkit.data.synthetic` over ALL classes (as OpenAI's CLIP saw every class of the zero-shot
benchmarks during pretraining). Scenes are generated on the fly by a DataLoader worker; sample `i`
is `generate_scene(np.random.default_rng([TRAIN_STREAM, seed, i]))`, so the stream needs no state
to resume. Most steps run at a lower resolution (position embeddings interpolated) because a step
there is about 4x cheaper; the last ones run at the native 224.

    OMP_WAIT_POLICY=PASSIVE python -m zegkit.train.pretrain_clip --out runs/tiny --precision bf16

(the defaults with `--precision bf16` are the recipe of the shipped zegkit/tiny-synthetic: 85 min
on a 2-core AMX Xeon shared with other jobs; on CPUs without native bf16 leave it at fp32, which
takes several times longer there and gives other weights.)

(OMP_WAIT_POLICY=PASSIVE stops OpenMP threads from spinning: on a CPU shared with other jobs,
spinning made each step several times slower.)

A killed run resumes from `<out>/checkpoint.pt` when started again with the same arguments. The
result loads with `CLIPModel.from_pretrained(out)` and `CLIPTokenizer.from_pretrained(out)`;
`MODEL_CARD.md` and `metrics.json` record how it was made and how well it does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionModel

from zegkit.backbone.tokenizer import MIN_VOCAB, check_tokenizer, train_clip_tokenizer
from zegkit.backbone.vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from zegkit.data import synthetic
from zegkit.evaluate import confusion_matrix
from zegkit.evaluate import metrics as segmentation_metrics
from zegkit.hardware import PRECISION_DTYPES
from zegkit.io import atomic_write
from zegkit.text import IMAGENET_TEMPLATES, ensemble_templates

# Seed-sequence prefixes that keep the scene streams apart (and apart from `write_dataset`'s
# two-element `[seed, i]`).
TRAIN_STREAM, EVAL_STREAM, TOKENIZER_STREAM = 7, 8, 9
CHECKPOINT = "checkpoint.pt"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its learned temperature at 100


@dataclass
class PretrainConfig:
    """Everything that determines the trained model (saved in the checkpoint and model card)."""

    steps: int = 2000
    batch_size: int = 96
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.05  # fraction of steps of linear warm-up before the cosine decay
    image_size: int = 224  # native resolution (position-embedding grid 14x14 with patch 16)
    patch_size: int = 16
    low_res: int = 128  # resolution of the first phase; 0 = train at image_size throughout
    low_res_fraction: float = 0.9  # fraction of steps run at low_res
    zoom_min: float = 0.8  # scene zoom drawn log-uniformly in [zoom_min, zoom_max]: things as
    zoom_max: float = 2.0  # seen in whole scenes and in the 2x-magnified sliding-window crops
    template_prob: float = 0.2  # P(caption = an ImageNet template around all the class names)
    # P(caption = the shapes only, "a star and two rings.", half in an ImageNet template): without
    # such captions the loss is met by background and colour words alone and the shapes are never
    # learned. Generator v2's own captions name the shapes only half the time, so that with 0.15
    # here about half of all captions of scenes with things are shapes-only.
    things_prob: float = 0.15
    generator_version: int = synthetic.GENERATOR_VERSION  # scenes of zegkit.data.synthetic
    width: int = 192  # vision tower (DeiT-Tiny's width and heads)
    layers: int = 6
    heads: int = 3
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    embed_dim: int = 128  # joint image-text space
    context_length: int = 77  # CLIP's
    vocab_size: int = 1024  # target size of the BPE vocabulary (may end smaller)
    tokenizer_scenes: int = 2000  # scenes whose captions train the tokenizer
    precision: str = "fp32"  # "fp32" | "bf16" (autocast; slower than fp32 on CPUs without bf16)
    # Weight of a second CLIP loss between the caption and the mean of the last-layer patch
    # tokens (post_layernorm + visual_projection), beside the [CLS] one. The [CLS] loss alone never
    # reaches the patch tokens of the last layer, and on this ground they drifted away from the
    # joint space as training went on (generator v2, 1500 steps: naive dense mIoU 8.0, where v1's
    # 600 steps gave 15.7). Mean-pooled image towers are a CLIP variant of their own (OpenCLIP's
    # average pooling); the model stays a transformers CLIPModel pooled by [CLS].
    patch_loss: float = 0.5

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(
                f"steps must be >= 1 and batch_size >= 2 (the contrastive loss needs negatives), "
                f"got steps={self.steps}, batch_size={self.batch_size}."
            )
        if self.image_size % self.patch_size or (self.low_res and self.low_res % self.patch_size):
            raise ValueError(
                f"image_size ({self.image_size}) and low_res ({self.low_res}) must be multiples "
                f"of patch_size ({self.patch_size})."
            )
        if self.vocab_size <= MIN_VOCAB:
            raise ValueError(
                f"vocab_size must exceed {MIN_VOCAB} (BOS, EOS and the 512 byte symbols with and "
                f"without </w>) to leave room for merges, got {self.vocab_size}."
            )
        if self.precision not in PRECISION_DTYPES:
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}.")
        if self.generator_version not in synthetic.VERSIONS:
            raise ValueError(
                f"generator_version must be one of {list(synthetic.VERSIONS)}, got "
                f"{self.generator_version!r}."
            )
        if not (math.isfinite(self.patch_loss) and self.patch_loss >= 0):
            raise ValueError(f"patch_loss must be a finite weight >= 0, got {self.patch_loss}.")
        if not 0 < self.zoom_min <= self.zoom_max:
            raise ValueError(
                f"Need 0 < zoom_min <= zoom_max, got {self.zoom_min} and {self.zoom_max}."
            )

    def resolution(self, step: int) -> int:
        """Training resolution of `step` (0-based)."""
        low_steps = int(self.steps * self.low_res_fraction) if self.low_res else 0
        return self.low_res if step < low_steps else self.image_size


# --- model and tokenizer ------------------------------------------------------------------------
def model_config(cfg: PretrainConfig, vocab_size: int) -> CLIPConfig:
    """The tiny CLIP's `transformers` config; BOS/EOS ids match `train_clip_tokenizer` (0/1)."""
    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.context_length, bos_token_id=0, eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=cfg.width, intermediate_size=4 * cfg.width, num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        ),
        projection_dim=cfg.embed_dim,
    )


def tokenizer_corpus(cfg: PretrainConfig) -> list[str]:
    """Captions of held-apart scenes, class names, colour words and the templates around them."""
    texts = []
    for index in range(cfg.tokenizer_scenes):
        rng = np.random.default_rng([TOKENIZER_STREAM, cfg.seed, index])
        texts += synthetic.generate_scene(rng, 64, version=cfg.generator_version).captions
    words = list(synthetic.CLASSES) + list(synthetic.COLOURS)
    texts += [template.format(word) for template in IMAGENET_TEMPLATES for word in words]
    return texts


def build_tokenizer(cfg: PretrainConfig) -> CLIPTokenizer:
    """The run's tokenizer, a deterministic function of `cfg` (seed, vocab_size, ...)."""
    tokenizer = train_clip_tokenizer(tokenizer_corpus(cfg), cfg.vocab_size, cfg.context_length)
    check_tokenizer(tokenizer, cfg.vocab_size, "the freshly trained tokenizer")
    return tokenizer


def build_model(cfg: PretrainConfig, vocab_size: int) -> CLIPModel:
    torch.manual_seed(cfg.seed)
    return CLIPModel(model_config(cfg, vocab_size))


# --- data ---------------------------------------------------------------------------------------
def scene_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 normalised with CLIP's mean and std."""
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


def training_scene(cfg: PretrainConfig, index: int,
                   size: int) -> tuple[synthetic.Scene, np.random.Generator]:
    """Scene `index` of the training stream (random zoom), and the generator to go on with."""
    rng = np.random.default_rng([TRAIN_STREAM, cfg.seed, index])
    zoom = float(np.exp(rng.uniform(np.log(cfg.zoom_min), np.log(cfg.zoom_max))))
    return synthetic.generate_scene(rng, size, zoom=zoom, version=cfg.generator_version), rng


def training_sample(cfg: PretrainConfig, index: int, size: int) -> tuple[np.ndarray, str]:
    """Sample `index` of the training stream: (image, caption)."""
    scene, rng = training_scene(cfg, index, size)
    draw = rng.random()
    shapes = [t.name for t in scene.things if t.name in scene.present_classes]
    if draw < cfg.template_prob:
        names = [str(name) for name in rng.permutation(scene.present_classes)]
        caption = str(rng.choice(IMAGENET_TEMPLATES)).format(synthetic.join_words(names))
    elif draw < cfg.template_prob + cfg.things_prob and shapes:
        caption = shapes_caption(rng, shapes)
    else:
        caption = str(rng.choice(scene.captions))
    return scene.image, caption


def shapes_caption(rng: np.random.Generator, shapes: Sequence[str]) -> str:
    """'a star and two rings.' (or that inside an ImageNet template): shape names and counts
    only, no colours and no background, so that matching it needs the shapes to be recognised."""
    counts = {name: shapes.count(name) for name in dict.fromkeys(shapes)}
    templated = rng.random() < 0.5  # the template brings its own article: "a photo of a {}."
    phrases = [(name if templated else f"{synthetic.article(name)} {name}") if count == 1
               else f"{synthetic.NUMBER_WORDS[count]} {synthetic.plural(name)}"
               for name, count in counts.items()]
    text = synthetic.join_words([phrases[i] for i in rng.permutation(len(phrases))])
    return str(rng.choice(IMAGENET_TEMPLATES)).format(text) if templated else text + "."


def presence_vector(present: Sequence[str]) -> np.ndarray:
    """(K,) bool over synthetic.CLASSES: which classes are in the scene."""
    return np.isin(np.asarray(synthetic.CLASSES), list(present))


class SceneBatches(IterableDataset):
    """Batches `start, start + 1, ...` of the training stream: (pixels (B,3,H,W), captions), or
    with `labels` (pixels, (B, K) float presence targets over synthetic.CLASSES).

    With several DataLoader workers, worker k makes the batches b with b % workers == k; the
    DataLoader takes them round-robin, so the order is the same for any number of workers.
    """

    def __init__(self, cfg: PretrainConfig, start: int, stop: int, labels: bool = False):
        self.cfg, self.start, self.stop, self.labels = cfg, start, stop, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for batch in range(self.start + worker, self.stop, workers):
            size = self.cfg.resolution(batch)
            first = batch * self.cfg.batch_size
            if self.labels:
                scenes = [training_scene(self.cfg, first + i, size)[0]
                          for i in range(self.cfg.batch_size)]
                yield (torch.stack([scene_to_tensor(scene.image) for scene in scenes]),
                       torch.from_numpy(np.stack([presence_vector(scene.present_classes)
                                                  for scene in scenes])).float())
                continue
            samples = [training_sample(self.cfg, first + i, size)
                       for i in range(self.cfg.batch_size)]
            pixels = torch.stack([scene_to_tensor(image) for image, _ in samples])
            yield pixels, [caption for _, caption in samples]


# --- optimisation -------------------------------------------------------------------------------
def build_optimizer(model: CLIPModel, cfg: PretrainConfig):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "embedding" not in name else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,  # CLIP's betas/eps for transformers
    )
    warmup = max(1, int(cfg.warmup * cfg.steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def train_step(model: CLIPModel, tokenizer, optimizer, scheduler, pixels: torch.Tensor,
               captions: list[str], cfg: PretrainConfig) -> float:
    """One contrastive step; returns the loss."""
    tokens = tokenizer(captions, padding=True, truncation=True, max_length=cfg.context_length,
                       return_tensors="pt")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=pixels, return_loss=True,
                    interpolate_pos_encoding=pixels.shape[-1] != cfg.image_size)
        loss = out.loss
        if cfg.patch_loss:
            loss = loss + cfg.patch_loss * patch_contrastive_loss(model, out)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return loss.item()


def patch_contrastive_loss(model: CLIPModel, out) -> torch.Tensor:
    """CLIP's symmetric loss between the captions and the images' mean projected patch tokens."""
    vision = model.vision_model
    patches = model.visual_projection(vision.post_layernorm(
        out.vision_model_output.last_hidden_state[:, 1:]))
    image = F.normalize(patches.mean(1), dim=-1)
    logits = model.logit_scale.exp() * image @ out.text_embeds.T  # text_embeds: normalised
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


# --- checkpoints --------------------------------------------------------------------------------
def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_write(path) as handle:
        torch.save(obj, handle)


def _atomic_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, cfg: PretrainConfig,
                    losses: list[float], elapsed: float, curve: list[dict] | None = None) -> None:
    _atomic_torch_save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "step": step, "config": dataclasses.asdict(cfg),
        "losses": losses, "elapsed": elapsed, "torch_rng": torch.get_rng_state(),
        "curve": json.dumps(curve or []),
    }, path)


def load_checkpoint(path: Path, model, optimizer, scheduler, cfg: PretrainConfig):
    """Restore a checkpoint in place; returns (step, losses, elapsed seconds, curve)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["config"]
    changed = {k: (saved.get(k), v) for k, v in dataclasses.asdict(cfg).items()
               if saved.get(k) != v}
    if changed:
        raise ValueError(
            f"{path} was written by a run with other settings ({changed}, as (saved, now)). "
            "Resume with the same arguments, or use another --out (or delete the checkpoint) to "
            "start afresh."
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return (state["step"], list(state["losses"]), float(state["elapsed"]),
            json.loads(state.get("curve", "[]")))


def checked_config(**settings: object) -> PretrainConfig:
    """A validated PretrainConfig from keyword settings.

    Raises:
        ValueError: a setting that is not a PretrainConfig field (the fields are listed), or an
            invalid value.
    """
    valid = sorted(f.name for f in dataclasses.fields(PretrainConfig))
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ValueError(f"Unknown setting(s) {unknown}; the settings are {valid}.")
    cfg = PretrainConfig(**settings)
    cfg.validate()
    return cfg


# --- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def class_text_embeddings(model: CLIPModel, tokenizer, classes: Sequence[str],
                          templates: Sequence[str] = IMAGENET_TEMPLATES) -> torch.Tensor:
    """(K, D) L2-normalised class embeddings, ensembled over `templates` exactly as
    `zegkit.text.encode_vocabulary` does (one shared implementation, `ensemble_templates`)."""

    def encode(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        return model.get_text_features(**tokens).pooler_output

    return ensemble_templates(encode, classes, templates, name="the tiny CLIP's text tower")


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half), NaN when a label is
    constant."""
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    sorted_scores = scores[order]
    for value in np.unique(sorted_scores[:-1][np.diff(sorted_scores) == 0]):  # average tied ranks
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def presence_report(scores: np.ndarray, present: np.ndarray) -> dict:
    """Zero-shot classification quality from image-class scores of held-out scenes.

    Args:
        scores: (N, K) image-class scores (any monotone scale: cosines, logits) over
            synthetic.CLASSES.
        present: (N, K) bool, class k is in scene n.

    Returns:
        dict with
        `top1_present`: fraction of scenes whose highest-scoring class is present;
        `presence_auc`: mean over classes of the ROC AUC of the class score for "present", and
        its means over stuff and thing classes (`presence_auc_stuff` / `_things`);
        `presence_auc_things_centred`: the things' mean AUC of the score minus the scene's mean
        thing score. If every shape shared one text embedding, the common part of the thing
        scores would follow the number of classes in a scene (a crowded scene scores lower on all
        of them) and the plain AUC could fall below 0.5 with no shape knowledge at all; centring
        removes that common score, so only what tells the shapes apart counts;
        `single_shape_top1`: over scenes with exactly one thing class, the fraction whose
        highest-scoring thing class is that one (chance 1/11), with `single_shape_scenes`;
        `per_class_auc`.
    """
    classes = synthetic.CLASSES
    things = [synthetic.CLASS_ID[c] for c in synthetic.THINGS]
    stuff = [synthetic.CLASS_ID[c] for c in synthetic.STUFF]
    top1 = present[np.arange(len(scores)), scores.argmax(1)].mean()
    aucs = [_auc(scores[:, c], present[:, c]) for c in range(len(classes))]
    thing_scores = scores[:, things]
    centred = thing_scores - thing_scores.mean(1, keepdims=True)
    centred_aucs = [_auc(centred[:, j], present[:, c]) for j, c in enumerate(things)]
    single = present[:, things].sum(1) == 1
    hits = (thing_scores[single].argmax(1) == present[single][:, things].argmax(1))
    return {
        "top1_present": float(top1),
        "presence_auc": float(np.nanmean(aucs)),
        "presence_auc_stuff": float(np.nanmean([aucs[c] for c in stuff])),
        "presence_auc_things": float(np.nanmean([aucs[c] for c in things])),
        "presence_auc_things_centred": float(np.nanmean(centred_aucs)),
        "min_class_auc": float(np.nanmin(aucs)),
        "single_shape_top1": float(hits.mean()) if single.any() else float("nan"),
        "single_shape_scenes": int(single.sum()),
        "per_class_auc": {c: round(float(aucs[i]), 4) for i, c in enumerate(classes)},
    }


def thing_text_similarity(text: torch.Tensor) -> dict:
    """How apart the 11 thing classes' text embeddings are.

    Args:
        text: (K, D) L2-normalised class embeddings over synthetic.CLASSES.

    Returns:
        {"thing_cosine_mean", "thing_cosine_max", "thing_cosine_max_pair"}: mean and largest
        cosine over the 55 pairs of thing classes, and the pair with the largest.
    """
    things = text[[synthetic.CLASS_ID[c] for c in synthetic.THINGS]]
    cosine = (things @ things.T).numpy()
    i, j = np.triu_indices(len(synthetic.THINGS), k=1)
    worst = int(np.argmax(cosine[i, j]))
    return {
        "thing_cosine_mean": float(cosine[i, j].mean()),
        "thing_cosine_max": float(cosine[i, j].max()),
        "thing_cosine_max_pair": [synthetic.THINGS[i[worst]], synthetic.THINGS[j[worst]]],
    }


def heldout_scenes(num_scenes: int, seed: int, size: int,
                   version: int = synthetic.GENERATOR_VERSION) -> list[synthetic.Scene]:
    """Scenes 0..num_scenes-1 of the held-out stream (one training never draws from)."""
    return [synthetic.generate_scene(np.random.default_rng([EVAL_STREAM, seed, i]), size,
                                     version=version)
            for i in range(num_scenes)]


@torch.no_grad()
def evaluate(model: CLIPModel, tokenizer, num_scenes: int = 200, seed: int = 0,
             size: int | None = None, batch_size: int = 25, dense: bool = True,
             scenes: Sequence[synthetic.Scene] | None = None,
             version: int = synthetic.GENERATOR_VERSION) -> dict:
    """Zero-shot quality of a CLIP on held-out synthetic scenes (a stream training never sees).

    Args:
        model, tokenizer: the CLIP.
        num_scenes: held-out scenes (ignored when `scenes` is given).
        seed: held-out stream seed.
        size: scene side in pixels; None = the model's native image size.
        batch_size: scenes per forward pass.
        dense: also measure the naive dense segmentation.
        scenes: evaluate on these scenes instead of generating them.
        version: generator version of the generated scenes.

    Returns:
        dict with `presence_report`'s keys, `thing_text_similarity`'s keys, and with `dense`
        `naive_dense_miou` (with `_seen` / `_unseen`) and `naive_dense_pixel_acc`, in percent,
        computed by `zegkit.evaluate.metrics` (the definition `zegkit eval` uses: a class absent
        from both truth and prediction is left out of the mean) from the summed confusion matrix
        of the per-patch argmax of last-layer patch tokens (post_layernorm + visual_projection),
        upsampled bilinearly; `per_class_iou`.
    """
    model.eval()
    size = size or model.config.vision_config.image_size
    if scenes is None:
        scenes = heldout_scenes(num_scenes, seed, size, version)
    size = scenes[0].image.shape[0]
    classes = synthetic.CLASSES
    text = class_text_embeddings(model, tokenizer, classes)  # (K, D)
    k = len(classes)
    scores, confusion = [], torch.zeros((k, k), dtype=torch.int64)
    for first in range(0, len(scenes), batch_size):
        batch = scenes[first:first + batch_size]
        pixels = torch.stack([scene_to_tensor(s.image) for s in batch])
        vision = model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True)
        image = F.normalize(model.visual_projection(vision.pooler_output), dim=-1)
        scores.append((image @ text.T).numpy())
        if not dense:
            continue
        patches = model.visual_projection(model.vision_model.post_layernorm(
            vision.last_hidden_state[:, 1:]))  # (B, h*w, D)
        grid = size // model.config.vision_config.patch_size
        logits = F.normalize(patches, dim=-1) @ text.T  # (B, h*w, K)
        logits = logits.transpose(1, 2).reshape(len(batch), k, grid, grid)  # (B, K, h, w)
        labels = F.interpolate(logits, size=(size, size), mode="bilinear").argmax(1)
        for scene, label in zip(batch, labels, strict=True):
            confusion += confusion_matrix(label, torch.from_numpy(scene.mask.astype(np.int64)), k)
    present = np.stack([presence_vector(s.present_classes) for s in scenes])
    result = {"scenes": len(scenes), "size": size,
              **presence_report(np.concatenate(scores), present),
              **thing_text_similarity(text)}
    if dense:
        seg = segmentation_metrics(confusion, list(classes),
                                   unseen=[synthetic.CLASS_ID[c] for c in synthetic.UNSEEN])
        things_iou = [seg["IoU"][c] for c in synthetic.THINGS if seg["IoU"][c] is not None]
        result.update({
            "naive_dense_miou": seg["mIoU"], "naive_dense_miou_seen": seg["mIoU(S)"],
            "naive_dense_miou_unseen": seg["mIoU(U)"],
            "naive_dense_miou_things": float(np.mean(things_iou)) if things_iou else None,
            "naive_dense_pixel_acc": seg["aAcc"],
            "per_class_iou": {c: None if v is None else round(v, 2)
                              for c, v in seg["IoU"].items()},
        })
    return result


# --- the supervised probe (a cheap gate on the data) ------------------------------------------
def supervised_probe(out_dir: str | os.PathLike | None = None, *, steps: int = 100,
                     batch_size: int = 96, seed: int = 0, num_workers: int = 1,
                     eval_scenes: int = 200, log_every: int = 10, **overrides) -> dict:
    """Train the tiny CLIP's vision tower on class-presence labels directly, then measure it.

    A gate on the data before any long contrastive run: if a ViT of this size cannot learn
    which classes a scene holds from the labels themselves within a few hundred steps, captions
    will not teach it either (measured on generator v1: things AUC 0.50-0.56 after 100-200
    steps, stuff 0.97+). Same architecture, resolution schedule, zoom and scene stream as
    `pretrain_clip`; a linear head on the pooled output, binary cross-entropy per class.

    Args:
        out_dir: where to write probe.json (None = nowhere).
        steps, batch_size, seed, num_workers, log_every: as for `pretrain_clip`.
        eval_scenes: held-out scenes, generated at the probe's last training resolution.
        **overrides: other `PretrainConfig` fields (lr, width, low_res, generator_version, ...).

    Returns:
        dict with `presence_report`'s keys, `steps`, `seconds`, `losses`, `size` and `config`.
    """
    cfg = checked_config(steps=steps, batch_size=batch_size, seed=seed, **overrides)
    torch.manual_seed(cfg.seed)
    vision_config = model_config(cfg, MIN_VOCAB + 1).vision_config
    tower = CLIPVisionModel(vision_config)
    head = torch.nn.Linear(vision_config.hidden_size, len(synthetic.CLASSES))
    model = torch.nn.ModuleDict({"tower": tower, "head": head})
    optimizer, scheduler = build_optimizer(model, cfg)
    loader = DataLoader(SceneBatches(cfg, 0, cfg.steps, labels=True), batch_size=None,
                        num_workers=num_workers,
                        prefetch_factor=2 if num_workers else None)
    started, losses = time.time(), []
    model.train()
    for step, (pixels, targets) in enumerate(loader, start=1):
        pooled = tower(pixel_values=pixels,
                       interpolate_pos_encoding=pixels.shape[-1] != cfg.image_size).pooler_output
        loss = F.binary_cross_entropy_with_logits(head(pooled), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == cfg.steps:
            print(f"probe step {step}/{cfg.steps} bce {np.mean(losses[-log_every:]):.4f} "
                  f"elapsed {_fmt_time(time.time() - started)}", flush=True)
    seconds = time.time() - started
    size = cfg.resolution(cfg.steps - 1)
    model.eval()
    scenes = heldout_scenes(eval_scenes, cfg.seed, size, cfg.generator_version)
    scores = []
    with torch.no_grad():
        for first in range(0, len(scenes), 50):
            pixels = torch.stack([scene_to_tensor(s.image) for s in scenes[first:first + 50]])
            pooled = tower(pixel_values=pixels,
                           interpolate_pos_encoding=size != cfg.image_size).pooler_output
            scores.append(head(pooled).numpy())
    present = np.stack([presence_vector(s.present_classes) for s in scenes])
    result = {"steps": cfg.steps, "seconds": round(seconds, 1), "size": size,
              "eval_scenes": eval_scenes, **presence_report(np.concatenate(scores), present),
              "losses": losses, "config": dataclasses.asdict(cfg)}
    print("probe: " + json.dumps({k: v for k, v in result.items()
                                  if k not in ("losses", "config", "per_class_auc")}), flush=True)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        _atomic_text(Path(out_dir) / "probe.json", json.dumps(result, indent=2) + "\n")
    return result


# --- the run ------------------------------------------------------------------------------------
def _fmt_time(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def curve_point(model: CLIPModel, tokenizer, scenes: Sequence[synthetic.Scene], step: int,
                losses: Sequence[float], since: int) -> dict:
    """One point of the training curve: the mean loss of steps `since`..`step`, how apart the
    thing classes' text embeddings are, and how well the image embedding finds the shapes on
    `scenes` (held-out), the numbers that showed generator v1's collapse of the shapes, and the
    naive dense mIoU (all classes, things)."""
    quality = evaluate(model, tokenizer, scenes=scenes)
    model.train()
    keys = ("thing_cosine_mean", "thing_cosine_max", "single_shape_top1", "presence_auc_stuff",
            "presence_auc_things", "presence_auc_things_centred", "naive_dense_miou",
            "naive_dense_miou_things")
    return {"step": step, "scenes": len(scenes),
            "loss": round(float(np.mean(losses[since:step])), 4),
            **{key: round(quality[key], 4) for key in keys}}


def pretrain_clip(out_dir: str | os.PathLike, *, steps: int = 2000, batch_size: int = 96,
                  seed: int = 0, num_workers: int = 1, checkpoint_every: int = 25,
                  log_every: int = 10, eval_scenes: int = 200, keep_checkpoint: bool = False,
                  command: str | None = None, stop_after: int | None = None,
                  curve_every: int = 100, curve_scenes: int = 200, **overrides) -> dict:
    """Train (or resume) the tiny CLIP and save it as a Hugging Face directory.

    Args:
        out_dir: where the model, tokenizer, image processor config, MODEL_CARD.md, metrics.json
            and (while training) checkpoint.pt go.
        steps: optimizer steps.
        batch_size: (scene, caption) pairs per step.
        seed: seeds the weights, the tokenizer corpus and the scene stream.
        num_workers: DataLoader worker processes generating scenes (0 = in the main process).
        checkpoint_every: steps between checkpoints.
        log_every: steps between progress lines.
        eval_scenes: held-out scenes for the final evaluation (0 = skip).
        keep_checkpoint: keep checkpoint.pt after the final save.
        command: the command line recorded in the model card.
        stop_after: stop (after checkpointing) once this step is reached, without the final save;
            for tests of resuming.
        curve_every: steps between points of the training curve (`curve_point`; 0 = none);
            the curve goes into the log, the checkpoint, metrics.json and the model card.
        curve_scenes: held-out scenes (at the native resolution) of each curve point.
        **overrides: other `PretrainConfig` fields (lr, width, layers, low_res, ...).

    Returns:
        dict with the final `step`, `loss` (mean of the last 10 steps), `losses`, `seconds` and,
        when evaluated, the `evaluate` metrics.
    """
    cfg = checked_config(steps=steps, batch_size=batch_size, seed=seed, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / CHECKPOINT

    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, len(tokenizer))
    optimizer, scheduler = build_optimizer(model, cfg)
    step, losses, elapsed, curve = 0, [], 0.0, []
    if checkpoint.exists():
        step, losses, elapsed, curve = load_checkpoint(checkpoint, model, optimizer, scheduler,
                                                       cfg)
        print(f"pretrain-clip: resuming {checkpoint} at step {step}/{cfg.steps}", flush=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"pretrain-clip: {params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}, "
          f"{cfg.steps} steps x {cfg.batch_size}, out={out}", flush=True)

    model.train()
    last = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    loader = DataLoader(SceneBatches(cfg, step, last), batch_size=None, num_workers=num_workers,
                        prefetch_factor=2 if num_workers else None)
    curve_set = (heldout_scenes(curve_scenes, cfg.seed, cfg.image_size, cfg.generator_version)
                 if curve_every and curve_scenes else None)
    started, window_start, window_images = time.time() - elapsed, time.time(), 0
    for pixels, captions in loader:
        losses.append(train_step(model, tokenizer, optimizer, scheduler, pixels, captions, cfg))
        step += 1
        window_images += len(captions)
        if step % log_every == 0 or step == last:
            rate = window_images / max(time.time() - window_start, 1e-9)
            spent = time.time() - started
            eta = (cfg.steps - step) * cfg.batch_size / max(rate, 1e-9)
            print(f"step {step}/{cfg.steps} loss {np.mean(losses[-log_every:]):.4f} "
                  f"lr {scheduler.get_last_lr()[0]:.2e} res {pixels.shape[-1]} "
                  f"T {model.logit_scale.exp().item():.1f} {rate:.1f} img/s "
                  f"elapsed {_fmt_time(spent)} eta {_fmt_time(eta)}", flush=True)
            window_start, window_images = time.time(), 0
        if curve_set is not None and (step % curve_every == 0 or step == cfg.steps):
            since = curve[-1]["step"] if curve else 0
            curve.append(curve_point(model, tokenizer, curve_set, step, losses, since))
            print("curve " + json.dumps(curve[-1]), flush=True)
        if step % checkpoint_every == 0 or step == last:
            save_checkpoint(checkpoint, model, optimizer, scheduler, step, cfg, losses,
                            time.time() - started, curve)
    seconds = time.time() - started
    result = {"step": step, "loss": float(np.mean(losses[-10:])) if losses else float("nan"),
              "losses": losses, "seconds": seconds, "curve": curve}
    if step < cfg.steps:
        return result

    result["metrics"] = save_model(out, model, tokenizer, cfg, step=step, loss=result["loss"],
                                   seconds=seconds, command=command, eval_scenes=eval_scenes,
                                   curve=curve)
    if not keep_checkpoint:
        checkpoint.unlink(missing_ok=True)
    print(f"pretrain-clip: saved {out} ({_fmt_time(seconds)})", flush=True)
    return result


def save_model(out: Path, model: CLIPModel, tokenizer, cfg: PretrainConfig, *, step: int,
               loss: float, seconds: float, command: str | None, eval_scenes: int,
               curve: Sequence[dict] = ()) -> dict | None:
    """Save weights (safetensors), tokenizer, image processor config, metrics.json, MODEL_CARD.md.

    Returns:
        The `evaluate` metrics, or None when `eval_scenes` is 0.
    """
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _atomic_text(out / "preprocessor_config.json",
                 json.dumps(image_processor_config(cfg), indent=2) + "\n")
    metrics = None
    if eval_scenes:
        print(f"pretrain-clip: evaluating on {eval_scenes} held-out scenes", flush=True)
        metrics = evaluate(model, tokenizer, eval_scenes, cfg.seed)
        print(json.dumps({k: v for k, v in metrics.items() if not k.startswith("per_class")}),
              flush=True)
    summary = {"config": dataclasses.asdict(cfg), "steps": step, "final_loss": loss,
               "train_seconds": round(seconds, 1), "curve": list(curve),
               "parameters": sum(p.numel() for p in model.parameters()),
               "command": command, "torch": torch.__version__, "metrics": metrics,
               "hardware": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"}
    _atomic_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    _atomic_text(out / "MODEL_CARD.md", model_card(summary))
    return metrics


def export_checkpoint(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                      eval_scenes: int = 0, command: str | None = None) -> dict | None:
    """Save the model of a (possibly unfinished) run's checkpoint.pt as a loadable directory.

    Args:
        run_dir: the `out_dir` of a `pretrain_clip` run that holds checkpoint.pt.
        out_dir: where to save (as `pretrain_clip` does at the end).
        eval_scenes: held-out scenes to evaluate on (0 = skip).
        command: the training command recorded in the model card.

    Returns:
        The metrics, or None.

    Raises:
        FileNotFoundError: there is no checkpoint.pt in `run_dir`.
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(
            f"No {CHECKPOINT} in {run_dir}; pass the --out directory of a pretrain-clip run that "
            "is still going or was run with --keep-checkpoint."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = PretrainConfig(**state["config"])
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, len(tokenizer))
    model.load_state_dict(state["model"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    losses = state["losses"]
    return save_model(out, model, tokenizer, cfg, step=state["step"],
                      loss=float(np.mean(losses[-10:])) if losses else float("nan"),
                      seconds=float(state["elapsed"]), command=command, eval_scenes=eval_scenes,
                      curve=json.loads(state.get("curve", "[]")))


def image_processor_config(cfg: PretrainConfig) -> dict:
    """preprocessor_config.json of a CLIPImageProcessor (resize, centre crop, CLIP mean/std)."""
    return {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True,
        "size": {"shortest_edge": cfg.image_size}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": cfg.image_size, "width": cfg.image_size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True,
    }


def model_card(summary: dict) -> str:
    """MODEL_CARD.md text: what the model is, how it was made, how well it does."""
    cfg, metrics = summary["config"], summary.get("metrics") or {}
    lines = [
        "# zegkit/tiny-synthetic",
        "",
        "A tiny CLIP (transformers `CLIPModel`) trained from scratch on zegkit's synthetic proving",
        "ground (`zegkit.data.synthetic`): procedurally generated scenes of stuff textures and",
        "coloured shapes, with captions. It exists so that every zegkit method can run end to end,",
        "offline, with real (synthetic) mIoU numbers. It knows nothing about natural images.",
        "",
        "## Architecture",
        f"- vision: ViT, patch {cfg['patch_size']}, image {cfg['image_size']},"
        f" width {cfg['width']}, {cfg['layers']} layers, {cfg['heads']} heads",
        f"- text: width {cfg['text_width']}, {cfg['text_layers']} layers,"
        f" {cfg['text_heads']} heads, context {cfg['context_length']}; byte-level BPE tokenizer"
        " in CLIP's format trained on the captions, class names and CLIP's 80 ImageNet prompt"
        " templates",
        f"- joint embedding dim {cfg['embed_dim']}; {summary['parameters'] / 1e6:.2f}M parameters",
        "- pixel normalisation: OpenAI CLIP's mean/std",
        "",
        "## Training",
        *([f"- INTERIM: exported at step {summary['steps']} of {cfg['steps']}"]
          if summary["steps"] < cfg["steps"] else []),
        f"- command: `{summary['command']}`",
        f"- seed {cfg['seed']}, {summary['steps']} steps x batch {cfg['batch_size']}, AdamW lr"
        f" {cfg['lr']} (warm-up {cfg['warmup']:.0%}, cosine), weight decay {cfg['weight_decay']},"
        f" {cfg['precision']}",
        f"- resolution {cfg['low_res']} for the first {cfg['low_res_fraction']:.0%} of steps"
        f" (position embeddings interpolated), then {cfg['image_size']}; scene zoom"
        f" {cfg['zoom_min']}-{cfg['zoom_max']}; scenes of generator version"
        f" {cfg.get('generator_version', 1)}; captions: {cfg['template_prob']:.0%} all class"
        f" names in an ImageNet template, {cfg['things_prob']:.0%} shape names only (half in a"
        " template), the rest the scene's own captions (from version 2 half of them name the"
        " shapes only)",
        "- CLIP symmetric contrastive loss over (scene, caption) pairs of ALL classes",
        f"- final loss (mean of last 10 steps) {summary['final_loss']:.4f};"
        f" training time {summary['train_seconds'] / 60:.1f} min on"
        f" {summary.get('hardware', 'the CPU it ran on')}"
        f" (torch {summary['torch']})",
        "",
        "## Zero-shot quality (held-out synthetic scenes)",
    ]
    if metrics:
        def pct(value):
            return "-" if value is None else f"{value:.1f}"

        lines += [
            f"- {metrics['scenes']} scenes (generator v{cfg.get('generator_version', 1)}) at"
            f" {metrics['size']} px, class prompts = the 80 ImageNet templates",
            f"- top-1 class present in the scene: {metrics['top1_present']:.3f}",
            f"- mean per-class presence ROC AUC: {metrics['presence_auc']:.3f}"
            f" (stuff {metrics['presence_auc_stuff']:.3f}, things"
            f" {metrics['presence_auc_things']:.3f}; lowest class {metrics['min_class_auc']:.3f})",
            f"- things' AUC centred on each scene's mean thing score (removes a score common to"
            f" all shapes): {metrics['presence_auc_things_centred']:.3f}",
            f"- single-shape top-1 (scenes with one thing class, argmax over the 11 things; chance"
            f" 0.09): {metrics['single_shape_top1']:.3f} on {metrics['single_shape_scenes']}"
            " scenes",
            f"- thing text embeddings: mean pairwise cosine {metrics['thing_cosine_mean']:.3f},"
            f" largest {metrics['thing_cosine_max']:.3f}"
            f" ({' / '.join(metrics['thing_cosine_max_pair'])})",
            "- naive dense (last-layer patch tokens, argmax per patch) mIoU (%, zegkit.evaluate's"
            " definition: classes absent from truth and prediction left out):"
            f" {pct(metrics['naive_dense_miou'])} (things"
            f" {pct(metrics['naive_dense_miou_things'])}, seen"
            f" {pct(metrics['naive_dense_miou_seen'])}, unseen"
            f" {pct(metrics['naive_dense_miou_unseen'])}), pixel accuracy"
            f" {pct(metrics['naive_dense_pixel_acc'])}",
            "",
            "| class | split | presence AUC | naive IoU (%) |",
            "|---|---|---|---|",
        ]
        lines += [f"| {c} | {'unseen' if c in synthetic.UNSEEN else 'seen'} |"
                  f" {metrics['per_class_auc'][c]:.3f} | {pct(metrics['per_class_iou'][c])} |"
                  for c in synthetic.CLASSES]
    else:
        lines.append("- not evaluated")
    curve = summary.get("curve") or []
    if curve:
        lines += [
            "",
            "## Training curve",
            f"Every {curve[0]['step']} steps on {curve[0]['scenes']} held-out"
            " scenes: mean loss since the last point, the thing text embeddings' mean and largest"
            " pairwise cosine, single-shape top-1 and the presence AUCs.",
            "",
            "| step | loss | thing cos mean | thing cos max | single-shape top-1 | AUC stuff |"
            " AUC things | AUC things centred |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [f"| {p['step']} | {p['loss']:.3f} | {p['thing_cosine_mean']:.3f} |"
                  f" {p['thing_cosine_max']:.3f} | {p['single_shape_top1']:.3f} |"
                  f" {p['presence_auc_stuff']:.3f} | {p['presence_auc_things']:.3f} |"
                  f" {p['presence_auc_things_centred']:.3f} |" for p in curve]
    lines += [
        "",
        "## Classes",
        f"- seen ({len(synthetic.SEEN)}): {', '.join(synthetic.SEEN)}",
        f"- unseen ({len(synthetic.UNSEEN)}): {', '.join(synthetic.UNSEEN)}",
        "(the CLIP saw all of them, as OpenAI's CLIP saw every benchmark class; the split is for",
        "the trained segmentation methods)",
        "",
    ]
    return "\n".join(lines)


# --- command line (`zegkit pretrain-clip`) ------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `zegkit pretrain-clip`."""
    defaults = PretrainConfig()
    parser.add_argument("--out", required=True, help="output directory (required)")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help=f"optimizer steps (default: {defaults.steps})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help=f"pairs per step (default: {defaults.batch_size})")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help=f"seed (default: {defaults.seed})")
    parser.add_argument("--lr", type=float, default=None, help=f"peak lr (default: {defaults.lr})")
    parser.add_argument("--low-res", type=int, default=None,
                        help=f"first-phase resolution, 0 = none (default: {defaults.low_res})")
    parser.add_argument("--low-res-fraction", type=float, default=None,
                        help="fraction of steps at --low-res "
                        f"(default: {defaults.low_res_fraction})")
    parser.add_argument("--precision", choices=tuple(PRECISION_DTYPES), default=None,
                        help=f"training precision (default: {defaults.precision})")
    parser.add_argument("--things-prob", type=float, default=None,
                        help=f"P(shapes-only caption) (default: {defaults.things_prob})")
    parser.add_argument("--patch-loss", type=float, default=None,
                        help="weight of the patch-mean CLIP loss beside the [CLS] one "
                        f"(default: {defaults.patch_loss})")
    parser.add_argument("--workers", type=int, default=1,
                        help="scene-generating DataLoader workers (default: 1)")
    parser.add_argument("--eval-scenes", type=int, default=200,
                        help="held-out scenes for the final evaluation (default: 200)")
    parser.add_argument("--checkpoint-every", type=int, default=25,
                        help="steps between checkpoints (default: 25)")
    parser.add_argument("--keep-checkpoint", action="store_true",
                        help="keep checkpoint.pt after the final save (default: delete it)")
    parser.add_argument("--supervised-probe", action="store_true",
                        help="instead of pretraining, train the vision tower on class labels for "
                        "--steps and write <out>/probe.json: a cheap gate on the data (default: "
                        "off)")


def _command_line() -> str:
    policy = os.environ.get("OMP_WAIT_POLICY")
    env = [f"OMP_WAIT_POLICY={policy}"] if policy else []
    if Path(sys.argv[0]).name == "zegkit":
        return shlex.join([*env, "zegkit", *sys.argv[1:]])
    return shlex.join([*env, "python", "-m", "zegkit.train.pretrain_clip", *sys.argv[1:]])


def run(args: argparse.Namespace) -> int:
    """Run `zegkit pretrain-clip` with parsed arguments; returns the exit code."""
    overrides = {name: getattr(args, name) for name in ("lr", "low_res", "low_res_fraction",
                                                        "precision", "things_prob", "patch_loss")
                 if getattr(args, name) is not None}
    if args.supervised_probe:
        supervised_probe(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                         num_workers=args.workers, eval_scenes=args.eval_scenes, **overrides)
        return 0
    pretrain_clip(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                  num_workers=args.workers, checkpoint_every=args.checkpoint_every,
                  eval_scenes=args.eval_scenes, keep_checkpoint=args.keep_checkpoint,
                  command=_command_line(), **overrides)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zegkit pretrain-clip",
                                     description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
