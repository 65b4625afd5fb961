"""ClsCLIP — "[CLS] Token is All You Need for Zero-Shot Semantic Segmentation", Wu, Zhang,
Jiang, Yang, Jin, Zeng, 2023 (arXiv 2304.06212). No public code; notes in
shared/research/clsclip.md (the paper's method through a summary (K), and Jiaguang-NEU/ESDA (E),
the closest public code on the same benchmark).

What the paper changes. For a target class A the text encoder's global token T = F_t(A) (the
EOT "[CLS]" embedding) is mapped by a linear layer L_i to the vision width and *replaces* the
visual [CLS] token at the input of the shallow layers N1 <= i < N2 (best: layers 2, 3, 4 of
ViT-B/16); the frozen encoder's patch tokens attend to the injected class token, and a light
K-layer transformer decoder (K = 2) turns the last layer's tokens E_N into a binary mask for A.
One pass answers one (image, class) pair, as in the 1-way PASCAL-5i / COCO-20i episodes the
paper evaluates (`zegkit.evaluate.episodes`). L_i and the decoder are trained on the seen folds
(inductive); CLIP stays frozen. ClsCLIP+ (local zoom-in on region proposals) is `zegkit.zoom`.

Choices the paper leaves open (each a field of `ClsCLIPConfig` unless fixed here):
- Text token: CLIP's projected, L2-normalised text embedding averaged over `templates` (fixed:
  it is what zegkit's text encoder caches; (E) also uses the projected EOT embedding; for
  ViT-B/16 text width and joint dimension are both 512, so the paper's T in R^d does not say).
- `templates`: the 80 ImageNet templates ((E) uses the bare class name; averaging is CLIP's own
  zero-shot recipe and zegkit's default).
- `shared_projection`: False, one L_i per replaced layer, as the paper's notation writes L_i
  ((E) shares one).
- `cls_after`: "continue", the [CLS] slot carries on from the last replaced layer's output, as
  (E) does; "restore" puts the unmodified image [CLS] back after the replaced layers.
- `decoder_dim` / `decoder_depth` / `decoder_heads`: 64 / 2 / 4. Depth 2 is the paper's K; the
  width and heads follow CLIPSeg's light decoder (LayerNorm + linear reduction, pre-norm
  transformer layers over [CLS] + patches, a linear foreground logit per patch); logits at patch
  resolution, bilinearly upsampled to the labels in the loss and to the image at inference.
- Loss: `bce_weight` x binary cross-entropy (mean over a pair's labelled pixels) + `dice_weight`
  x soft dice, both 1, averaged over the (image, class) pairs of the batch.
- `present_per_image` / `absent_per_image`: 1 / 0, per training image one seen class that is in
  it (the 1-way episode) and no absent class; absent pairs teach "not here", which multi-class
  use needs and episodes never ask.
- Multi-class use (`segment`, the standard benchmarks): a sigmoid per class, each from its own
  pass; a vocabulary class named "background" gets no pass (no "background" token is ever
  injected) and the constant probability `background_probability`, so a pixel is background
  where no class reaches it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zegkit.backbone import ClipBackbone
from zegkit.backbone.attention import check_attention
from zegkit.data.base import IGNORE_INDEX
from zegkit.distributed import all_reduce_sum, rank_and_world
from zegkit.methods.base import Batch, Method
from zegkit.methods.cls_injection import (
    encoder_floor,
    image_major_pairs,
    injected_passes,
    layer_inputs,
    replaced_layers,
    scored_rows,
)
from zegkit.scores import Activation
from zegkit.text import TextEmbeddings

CLS_AFTER = ("continue", "restore")


@dataclass
class ClsCLIPConfig:
    """ClsCLIP settings (the module docstring gives each open choice and why).

    Attributes:
        layers: encoder layers (0-based) whose input [CLS] is replaced by the class token. None:
            the paper's 2, 3, 4 for a 12-layer encoder, scaled to the depth (4..9 of 24).
        shared_projection: one L_i for all replaced layers ((E)) instead of one per layer.
        cls_after: "continue" or "restore" (the [CLS] slot after the replaced layers).
        templates: prompt templates of the class text embeddings.
        decoder_dim: decoder width (CLIPSeg's 64).
        decoder_depth: decoder transformer layers (the paper's K = 2).
        decoder_heads: decoder attention heads (4).
        bce_weight: weight of the binary cross-entropy term (1).
        dice_weight: weight of the dice term (1).
        present_per_image: training pairs per image with a seen class present in it (1).
        absent_per_image: training pairs per image with a seen class absent from it (0).
        background_probability: probability of a vocabulary class named "background" (0.5).
        last_block_attention: attention variant of the last block ("vanilla": the paper's).
        pair_batch: (image, class) pairs per backbone call; bounds memory.
    """

    layers: tuple[int, ...] | None = None
    shared_projection: bool = False
    cls_after: str = "continue"
    templates: str = "imagenet"
    decoder_dim: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 4
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    present_per_image: int = 1
    absent_per_image: int = 0
    background_probability: float = 0.5
    last_block_attention: str = "vanilla"
    pair_batch: int = 32

    def __post_init__(self) -> None:
        if self.cls_after not in CLS_AFTER:
            raise ValueError(f"cls_after must be one of {CLS_AFTER}, got {self.cls_after!r}.")
        if not 0 < self.background_probability < 1:
            raise ValueError(f"background_probability must be in (0, 1), got "
                             f"{self.background_probability}.")
        if self.pair_batch < 1 or self.decoder_depth < 1 or self.decoder_dim % self.decoder_heads:
            raise ValueError(
                f"pair_batch and decoder_depth must be >= 1 and decoder_dim divisible by "
                f"decoder_heads; got {self.pair_batch}, {self.decoder_depth}, "
                f"{self.decoder_dim} / {self.decoder_heads}."
            )
        if self.present_per_image < 0 or self.absent_per_image < 0 or not (
                self.present_per_image or self.absent_per_image):
            raise ValueError("present_per_image and absent_per_image must be >= 0, not both 0.")
        check_attention(self.last_block_attention)
        if self.layers is not None:
            self.layers = tuple(self.layers)


class ClsCLIPDecoder(nn.Module):
    """The light transformer decoder: last-layer tokens (N, 1 + h*w, C) -> foreground logits.

    Args:
        width: vision width C.
        dim: decoder width.
        depth: transformer layers.
        heads: attention heads per layer.
    """

    def __init__(self, width: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.reduce = nn.Linear(width, dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.out = nn.Linear(dim, 1)

    def forward(self, hidden: Tensor, grid: tuple[int, int]) -> Tensor:
        """Foreground logits (N, h, w) from tokens (N, 1 + h*w, C) ([CLS] slot first)."""
        x = self.reduce(self.norm(hidden))  # (N, T, dim)
        for block in self.blocks:
            x = block(x)
        return self.out(x[:, 1:]).squeeze(-1).reshape(-1, *grid)


class ClsCLIPHead(nn.Module):
    """ClsCLIP's trained parts: the maps L_i (text dim D -> vision width C) and the decoder.

    Args:
        embed_dim: D, the text embeddings' dimension.
        width: C, the vision width.
        num_replaced: the number of replaced layers.
        config: sizes and whether one L_i is shared.
    """

    def __init__(self, embed_dim: int, width: int, num_replaced: int,
                 config: ClsCLIPConfig) -> None:
        super().__init__()
        self.shared = config.shared_projection
        maps = 1 if self.shared else num_replaced
        self.token_proj = nn.ModuleList(nn.Linear(embed_dim, width) for _ in range(maps))
        self.decoder = ClsCLIPDecoder(width, config.decoder_dim, config.decoder_depth,
                                      config.decoder_heads)

    def token(self, slot: int, text: Tensor) -> Tensor:
        """L_slot(text): class tokens (n, C) for the slot-th replaced layer from text (n, D)."""
        return self.token_proj[0 if self.shared else slot](text)


def training_pairs(labels: Tensor, candidates: Tensor, present: int, absent: int
                   ) -> tuple[Tensor, Tensor]:
    """Random (image, class) training pairs of a batch (torch's global RNG, so a resumed run
    draws the same ones). Each process draws for its own share of the batch, so a run on N
    processes draws other pairs than one process would (the same distribution, not the same
    numbers): unlike ZegCLIP's loss, it is not bit-identical across process counts.

    Args:
        labels: (B, H, W) class indices, IGNORE_INDEX unlabelled.
        candidates: (K,) bool, the classes that may be queried (seen, not background).
        present: pairs per image with a candidate class shown in the image (fewer if it shows
            fewer).
        absent: pairs per image with a candidate class not shown in it.

    Returns:
        (image indices, class indices), each (P,) int64 on the labels' device.
    """
    images, rows = [], []
    allowed = candidates.nonzero().flatten().cpu()
    for index in range(labels.shape[0]):
        shown = torch.isin(allowed, labels[index].unique().cpu())
        for pool, count in ((allowed[shown], present), (allowed[~shown], absent)):
            chosen = pool[torch.randperm(pool.numel())[:count]]
            rows.append(chosen)
            images.append(torch.full_like(chosen, index))
    return torch.cat(images).to(labels.device), torch.cat(rows).to(labels.device)


def binary_mask_loss(logits: Tensor, targets: Tensor, valid: Tensor, *, bce_weight: float,
                     dice_weight: float) -> dict[str, Tensor]:
    """Binary CE + soft dice over P binary masks, averaged over the pairs of all processes.

    Each term is per pair (BCE: mean over its valid pixels; dice: 1 - (2 sum(p t) + 1) /
    (sum p + sum t + 1) over its valid pixels), summed and divided by the global number of pairs
    over the world size, so that DDP's gradient average equals the one-process loss.

    Args:
        logits: (P, H, W) foreground logits.
        targets: (P, H, W) 0/1 foreground.
        valid: (P, H, W) bool, the labelled pixels.
    """
    logits, targets, valid = logits.float(), targets.float(), valid.float()
    pixels = valid.sum(dim=(1, 2)).clamp(min=1)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    bce = (bce * valid).sum(dim=(1, 2)) / pixels  # (P,)
    probabilities = logits.sigmoid() * valid
    intersection = (probabilities * targets).sum(dim=(1, 2))
    dice = 1 - (2 * intersection + 1) / (probabilities.sum(dim=(1, 2)) + (
        targets * valid).sum(dim=(1, 2)) + 1)
    _, world = rank_and_world()
    count = all_reduce_sum(torch.tensor(float(logits.shape[0]))).to(logits.device) / world
    count = count.clamp(min=1)
    bce_term, dice_term = bce.sum() / count, dice.sum() / count
    return {"loss": bce_weight * bce_term + dice_weight * dice_term,
            "bce": bce_term.detach(), "dice": dice_term.detach()}


class ClsCLIP(Method):
    """One-way [CLS] navigation: each class's text token steers a full pass of the vision tower,
    a trained decoder reads a binary mask out of it."""

    description = ("ClsCLIP (trained): text [CLS] through trained L_i replaces the visual [CLS] "
                   "in shallow layers, 2-layer decoder, a pass per class; needs --checkpoint")
    rows = "classes"

    def activation(self) -> Activation:
        """Foreground logits: a sigmoid per class (each pass answers one class)."""
        return Activation("sigmoid")

    def default_templates(self) -> str:
        return self.config.templates

    def build(self, backbone: ClipBackbone) -> None:
        layers = replaced_layers(self.config.layers, backbone.num_layers)
        self.head = ClsCLIPHead(backbone.embed_dim, backbone.width, len(layers), self.config)

    def _require_built(self) -> None:
        if not hasattr(self, "head"):
            raise RuntimeError(
                "ClsCLIP has trained parts (the maps L_i and the decoder); load them with "
                "--checkpoint runs/<name>/last.safetensors, written by e.g. `zegkit train "
                "--recipe clsclip-synthetic-fold0 --out runs/clsclip-synthetic-fold0` (PASCAL-5i: "
                "--recipe clsclip-pascal-5i-fold0 --data-root VOCdevkit/VOC2012). The untrained "
                "approximation is --method clsclip_standin."
            )

    def pair_logits(self, backbone: ClipBackbone, pixels: Tensor, classes: Tensor,
                    image: Tensor, row: Tensor) -> Tensor:
        """Foreground logits (n, h, w) of the pairs (image[i], row[i]) of crops (B, 3, H, W)
        and class embeddings (K, D)."""
        self._require_built()
        layers = replaced_layers(self.config.layers, backbone.num_layers)
        dtype = self.head.token_proj[0].weight.dtype
        classes = classes.to(device=pixels.device, dtype=dtype)
        after = layers[-1] + 1  # "restore": the image [CLS] entering this layer goes back in
        restore = self.config.cls_after == "restore" and after < backbone.num_layers
        inputs = layer_inputs(backbone, pixels, [layers[0], after] if restore else layers[:1])
        extra = {after: inputs[after][:, 0]} if restore else {}

        def tokens(slot: int, images: Tensor, rows: Tensor) -> Tensor:
            return self.head.token(slot, classes[rows])

        def readout(hidden: Tensor, grid: tuple[int, int], images: Tensor, rows: Tensor) -> Tensor:
            return self.head.decoder(hidden, grid)

        return injected_passes(backbone, inputs[layers[0]], backbone.grid_size(pixels), image,
                               row, layers, tokens, readout, pair_batch=self.config.pair_batch,
                               surgery=self.config.last_block_attention, extra_cls=extra)

    def forward_floor(self, backbone: ClipBackbone, text: TextEmbeddings) -> float:
        """Plain encoder forwards per crop that `forward` needs at least (`encoder_floor`)."""
        layers = replaced_layers(self.config.layers, backbone.num_layers)
        return encoder_floor(layers, backbone.num_layers, len(scored_rows(text)))

    def forward(self, backbone: ClipBackbone, pixels: Tensor, text: TextEmbeddings) -> Tensor:
        """Foreground logits (B, K, h, w) of crops (B, 3, H, W) for each class row of `text`;
        a "background" row holds the logit of `background_probability`."""
        rows = scored_rows(text)
        grid = backbone.grid_size(pixels)
        p = self.config.background_probability
        logits = pixels.new_full((pixels.shape[0], text.num_classes, *grid), math.log(p / (1 - p)),
                                 dtype=torch.float32)
        if rows:
            image, row = image_major_pairs(pixels.shape[0], rows, pixels.device)
            scored = self.pair_logits(backbone, pixels, text.embeddings, image, row)
            logits[:, rows] = scored.float().reshape(pixels.shape[0], len(rows), *grid)
        return logits

    def loss(self, backbone: ClipBackbone, batch: Batch, text: TextEmbeddings
             ) -> dict[str, Tensor]:
        """Binary CE + dice of the decoder's masks for random (image, seen class) pairs."""
        self._require_built()
        device = batch.labels.device
        candidates = torch.zeros(text.num_classes, dtype=torch.bool, device=device)
        candidates[scored_rows(text)] = True
        if batch.seen is not None:
            candidates &= batch.seen.to(device)
        image, row = training_pairs(batch.labels, candidates, self.config.present_per_image,
                                    self.config.absent_per_image)
        size = batch.labels.shape[-2:]
        if image.numel():
            logits = self.pair_logits(backbone, batch.pixels, text.embeddings, image, row)
            logits = F.interpolate(logits[:, None].float(), size=size, mode="bilinear",
                                   align_corners=False)[:, 0]
        else:  # no seen class in this share of the batch
            logits = batch.pixels.new_zeros((0, *size), dtype=torch.float32)
        labels = batch.labels[image]
        terms = binary_mask_loss(logits, labels == row[:, None, None], labels != IGNORE_INDEX,
                                 bce_weight=self.config.bce_weight,
                                 dice_weight=self.config.dice_weight)
        if not image.numel():  # a zero that reaches every parameter, for DDP's gradient hooks
            terms["loss"] = terms["loss"] + sum(p.sum() for p in self.trainable_parameters()) * 0
        return terms
