"""ZegCLIP's parts, written once for the methods built on it (ZegCLIP, Cascade-CLIP, CLIP-RC).

A frozen CLIP adapted by deep prompts (`DeepPrompts`); class queries from the relationship
descriptor q_c = W_q [g ⊙ t_c ; t_c] (`RelationshipDescriptor`); decoders whose mask logits are
cross-attention scores of the queries over the patch tokens (`ATMDecoder`); the
non-mutually-exclusive loss (`nel_loss`) and the seen-class penalty at inference
(`seen_penalty_scores`). `PromptedDecoderMethod` is the method contract they share: the pixel
normalisation, sigmoid scores, prompts, loss over the seen classes and the transductive stage;
each method adds its head (`build_head`) and its decoding pass (`decode`).

Released code followed: ZiqinZhou66/ZegCLIP @ 9ba4bb5 (shared/research/zegclip.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zegkit.backbone import ClipBackbone, Intermediates, TokenInjection
from zegkit.backbone.vision import IMAGENET_MEAN, IMAGENET_STD, normalize_pixels
from zegkit.data.base import IGNORE_INDEX
from zegkit.distributed import all_reduce_sum, rank_and_world
from zegkit.methods.base import Batch, Method
from zegkit.scores import Activation
from zegkit.text import TextEmbeddings

PIXEL_NORMALIZATIONS = ("imagenet", "backbone")
IGNORE_MODES = ("negative", "ignore")


@dataclass
class ZegCLIPConfig:
    """ZegCLIP's settings; defaults are the released VOC 15/5 config's.

    Attributes:
        prompt_tokens: M, deep prompt tokens per layer (VOC 10, COCO-Stuff 100).
        prompt_dropout: dropout on the prompt tokens after the shared linear map.
        decoder_layers: layers of the ATM decoder (3).
        decoder_heads: attention heads of the decoder (8).
        decoder_dim: decoder width; None = the backbone's joint dimension (512 for ViT-B/16).
        ffn_ratio: decoder feed-forward width as a multiple of decoder_dim (4).
        dropout: decoder dropout (attention and feed-forward; 0.1).
        seen_penalty: subtracted from the sigmoid score of every class in `seen_classes` at
            inference (released inductive configs: 0.1; 0 = off, as for transductive models).
        seen_classes: display names of the classes the model was trained on (set by training;
            the penalty applies to vocabulary classes of these names).
        templates: the prompt templates of the text embeddings ("zegclip-single" for VOC,
            "zegclip-multi" for COCO-Stuff); inference uses the same unless told otherwise.
        pixel_normalization: "imagenet" (the released code's mean/std) or "backbone" (CLIP's).
        focal_weight: weight of the focal term (100 in the released zero-shot configs).
        dice_weight: weight of the dice term (1).
        focal_alpha: focal loss alpha (0.25).
        focal_gamma: focal loss gamma (2).
        ignore: how pixels labelled 255 (and unseen pixels in inductive training) enter the loss:
            "negative" (the released code: an all-zero target) or "ignore" (left out).
        self_training: transductive stage: every class has a query, and pixels whose ground
            truth is an unseen class take the unseen class the model predicts as their target.
    """

    prompt_tokens: int = 10
    prompt_dropout: float = 0.1
    decoder_layers: int = 3
    decoder_heads: int = 8
    decoder_dim: int | None = None
    ffn_ratio: int = 4
    dropout: float = 0.1
    seen_penalty: float = 0.1
    seen_classes: tuple[str, ...] = ()
    templates: str = "zegclip-single"
    pixel_normalization: str = "imagenet"
    focal_weight: float = 100.0
    dice_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    ignore: str = "negative"
    self_training: bool = False

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0 or self.decoder_layers < 1:
            raise ValueError(
                f"prompt_tokens must be >= 0 and decoder_layers >= 1, got {self.prompt_tokens} "
                f"and {self.decoder_layers}."
            )
        if self.pixel_normalization not in PIXEL_NORMALIZATIONS:
            raise ValueError(
                f"pixel_normalization must be one of {PIXEL_NORMALIZATIONS}, "
                f"got {self.pixel_normalization!r}."
            )
        if self.ignore not in IGNORE_MODES:
            raise ValueError(f"ignore must be one of {IGNORE_MODES}, got {self.ignore!r}.")
        if not 0 <= self.seen_penalty < 1:
            raise ValueError(f"seen_penalty is a probability offset in [0, 1), got "
                             f"{self.seen_penalty}.")
        self.seen_classes = tuple(self.seen_classes)


class DeepPrompts(nn.Module):
    """VPT-deep prompts: per layer M tokens, one shared linear map and dropout (ZegCLIP §3.3).

    Layer 0's tokens are inserted after [CLS]; each later layer's replace the previous layer's
    prompt outputs (see `TokenInjection.prompts`).
    """

    def __init__(self, num_layers: int, tokens: int, width: int, dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num_layers, tokens, width))
        nn.init.xavier_uniform_(self.tokens.view(-1, width))
        self.proj = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.proj.weight, a=0, mode="fan_out")
        nn.init.zeros_(self.proj.bias)
        self.dropout = nn.Dropout(dropout)

    def injection(self) -> TokenInjection:
        """The prompts of every layer as a backbone token injection."""
        prompts = self.dropout(self.proj(self.tokens))
        return TokenInjection(prompts=dict(enumerate(prompts)))


class RelationshipDescriptor(nn.Module):
    """Class queries q_c = W_q [g ⊙ t_c ; t_c] from the global embedding g and text t_c."""

    def __init__(self, embed_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * embed_dim, dim)

    def inputs(self, global_embedding: Tensor, text: Tensor) -> Tensor:
        """The projection's input [g ⊙ t_c ; t_c] (B, K, 2D) from g (B, D) and text (K, D)."""
        text = text.to(global_embedding.dtype).expand(global_embedding.shape[0], -1, -1)
        return torch.cat([global_embedding[:, None] * text, text], dim=-1)

    def forward(self, global_embedding: Tensor, text: Tensor) -> Tensor:
        """Queries (B, K, dim) from g (B, D) and text rows (K, D)."""
        return self.proj(self.inputs(global_embedding, text))


class MaskAttention(nn.Module):
    """The mask logits of ATM: head-averaged pre-softmax cross-attention scores of class queries
    over patch tokens (the last decoder layer is only this: its updated queries are unused)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"decoder width {dim} is not divisible by {heads} heads.")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)

    def heads_of(self, x: Tensor) -> Tensor:
        """(B, N, dim) -> (B, heads, N, dim / heads)."""
        return x.view(*x.shape[:2], self.heads, -1).transpose(1, 2)

    def scores(self, queries: Tensor, memory: Tensor) -> Tensor:
        """Per-head scores (B, heads, K, N) of queries (B, K, dim) over memory (B, N, dim)."""
        q, k = self.heads_of(self.q(queries)), self.heads_of(self.k(memory))
        return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])

    def forward(self, queries: Tensor, memory: Tensor) -> Tensor:
        """Mask logits (B, K, N)."""
        return self.scores(queries, memory).mean(dim=1)


class CrossAttentionLayer(MaskAttention):
    """One ATM layer: queries cross-attend to patch tokens (post-norm), then a feed-forward block.

    Returns the updated queries and the layer's mask logits.
    """

    def __init__(self, dim: int, heads: int, ffn_ratio: int, dropout: float) -> None:
        super().__init__(dim, heads)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.attention_dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_ratio * dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(ffn_ratio * dim, dim),
        )
        self.ffn_dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        """queries (B, K, dim), memory (B, N, dim) -> (queries (B, K, dim), logits (B, K, N))."""
        scores = self.scores(queries, memory)
        mixed = self.attention_dropout(scores.softmax(dim=-1)) @ self.heads_of(self.v(memory))
        queries = self.norm1(queries + self.out(mixed.transpose(1, 2).flatten(2)))
        queries = self.norm2(queries + self.ffn_dropout(self.ffn(queries)))
        return queries, scores.mean(dim=1)


class ATMDecoder(nn.Module):
    """SegViT's attention-to-mask decoder as ZegCLIP uses it: cross-attention layers update the
    class queries; the mask logits are the last layer's attention scores. The last layer's own
    value path and feed-forward block (present, never used, in the released code) are left out."""

    def __init__(self, dim: int, layers: int, heads: int, ffn_ratio: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            CrossAttentionLayer(dim, heads, ffn_ratio, dropout) for _ in range(layers - 1)
        )
        self.mask = MaskAttention(dim, heads)

    def forward(self, queries: Tensor, memory: Tensor) -> Tensor:
        """Mask logits (B, K, N) of queries (B, K, dim) over patch tokens (B, N, dim)."""
        for layer in self.layers:
            queries, _ = layer(queries, memory)
        return self.mask(queries, memory)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """Per-element sigmoid focal loss (Lin et al.), same shape as `logits`."""
    probabilities = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return weight * (1 - p_t) ** gamma * ce


def nel_loss(logits: Tensor, labels: Tensor, classes: Tensor, *, focal_weight: float,
             dice_weight: float, alpha: float, gamma: float, ignore: str) -> dict[str, Tensor]:
    """ZegCLIP's non-mutually-exclusive loss over per-class mask logits.

    Every (image, class) map gets a sigmoid focal term averaged over its pixels; maps of classes
    present in their image get a dice term. Both are summed and divided by the number of present
    (image, class) maps, all-reduced over processes and divided by the world size (so that data
    parallelism averages gradients to exactly the one-process loss).

    Args:
        logits: (B, Q, H, W) mask logits at label resolution.
        labels: (B, H, W) vocabulary indices; values not in `classes` have no positive target.
        classes: (Q,) the vocabulary index each logit map stands for.
        ignore: "negative": every pixel counts (a label outside `classes`, 255 included, is a
            negative for all); "ignore": pixels labelled IGNORE_INDEX are left out.
    """
    targets = (labels[:, None] == classes[:, None, None]).to(logits.dtype)  # (B, Q, H, W)
    valid = torch.ones_like(labels, dtype=logits.dtype)
    if ignore == "ignore":
        valid = (labels != IGNORE_INDEX).to(logits.dtype)
    valid = valid[:, None]
    pixels = valid.sum(dim=(2, 3)).clamp(min=1)  # (B, 1)
    focal = sigmoid_focal_loss(logits.float(), targets, alpha, gamma) * valid
    focal = focal.sum(dim=(2, 3)) / pixels  # (B, Q)
    probabilities = logits.float().sigmoid() * valid
    intersection = (probabilities * targets).sum(dim=(2, 3))
    total = probabilities.sum(dim=(2, 3)) + targets.sum(dim=(2, 3))
    dice = 1 - (2 * intersection + 1) / (total + 1)
    present = targets.flatten(2).amax(dim=2)  # (B, Q) 1 where the class is in the image
    _, world = rank_and_world()
    num_masks = all_reduce_sum(present.sum().detach().clone()).to(logits.device) / world
    num_masks = num_masks.clamp(min=1)
    focal_term = focal.sum() / num_masks
    dice_term = (dice * present).sum() / num_masks
    loss = focal_weight * focal_term + dice_weight * dice_term
    return {"loss": loss, "focal": focal_term.detach(), "dice": dice_term.detach()}


def seen_penalty_scores(logits: Tensor, text: TextEmbeddings, seen_classes: tuple[str, ...],
                        penalty: float) -> Tensor:
    """Inference scores of the released inductive models: sigmoid(logits) minus `penalty` for
    every vocabulary class named in `seen_classes` (B, K, h, w)."""
    scores = logits.float().sigmoid()
    seen = torch.tensor([name in seen_classes for name in text.class_names], device=scores.device)
    if penalty and seen.any():
        scores = scores - penalty * seen.to(scores.dtype)[None, :, None, None]
    return scores


def self_training_labels(logits: Tensor, labels: Tensor, seen: Tensor) -> Tensor:
    """Transductive targets: at pixels whose ground truth is an unseen class (or marked unseen
    with any value that is neither a seen class nor IGNORE_INDEX, e.g. the data's PSEUDO_LABEL),
    the unseen class with the highest predicted score; elsewhere the ground truth.

    Args:
        logits: (B, K, H, W) logits of every vocabulary class.
        labels: (B, H, W) vocabulary indices (IGNORE_INDEX kept).
        seen: (K,) bool.
    """
    seen = seen.to(labels.device)
    unseen = (~seen).nonzero().flatten()
    if unseen.numel() == 0:
        return labels
    in_vocabulary = (labels >= 0) & (labels < seen.numel())
    is_seen = torch.zeros_like(labels, dtype=torch.bool)
    is_seen[in_vocabulary] = seen[labels[in_vocabulary]]
    at_unseen = (labels != IGNORE_INDEX) & ~is_seen
    pseudo = unseen[logits[:, unseen].argmax(dim=1)]
    return torch.where(at_unseen, pseudo, labels)


class PromptedDecoderMethod(Method):
    """The contract of ZegCLIP and the methods built on it.

    Subclasses create their head in `build_head` and implement `decode`: mask logits at patch
    resolution plus any auxiliary loss terms of their own (weighted, computed in training mode).
    """

    rows = "classes"

    def activation(self) -> Activation:
        """Scores are sigmoid probabilities already (less the seen penalty): identity."""
        return Activation("identity")

    def default_templates(self) -> str:
        return self.config.templates

    def normalize(self, backbone: ClipBackbone, images: Tensor) -> Tensor:
        if self.config.pixel_normalization == "imagenet":
            return normalize_pixels(images, IMAGENET_MEAN, IMAGENET_STD)
        return backbone.normalize(images)

    def build(self, backbone: ClipBackbone) -> None:
        config = self.config
        self.prompts = DeepPrompts(
            backbone.num_layers, config.prompt_tokens, backbone.width, config.prompt_dropout
        )
        self.prompt_norm = nn.LayerNorm(backbone.width, eps=1e-6)
        self.build_head(backbone, config.decoder_dim or backbone.embed_dim)

    def build_head(self, backbone: ClipBackbone, dim: int) -> None:
        """Create the method's head (decoders, descriptors) for decoder width `dim`."""
        raise NotImplementedError

    def decode(self, backbone: ClipBackbone, pixels: Tensor,
               text_rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Mask logits (B, Q, h, w) of the text rows (Q, D) at patch resolution, and auxiliary
        loss terms {name: weighted scalar} (empty at inference)."""
        raise NotImplementedError

    def make_decoder(self, dim: int) -> ATMDecoder:
        """One ATM decoder of width `dim` with this config's depth, heads and dropout."""
        config = self.config
        return ATMDecoder(dim, config.decoder_layers, config.decoder_heads, config.ffn_ratio,
                          config.dropout)

    def injection(self, suffix: TokenInjection | None = None) -> TokenInjection | None:
        """The deep prompts as a backbone injection (with `suffix`'s extra tokens, if any)."""
        if not self.config.prompt_tokens:
            return suffix
        prompts = self.prompts.injection()
        if suffix is None:
            return prompts
        return TokenInjection(prompts=prompts.prompts, suffix=suffix.suffix,
                              suffix_layer=suffix.suffix_layer,
                              attention_mask=suffix.attention_mask)

    def joint_outputs(self, backbone: ClipBackbone, out: Intermediates) -> tuple[Tensor, Tensor]:
        """L2-normalised patch embeddings (B, N, D) and global embedding (B, D) of the last
        layer: prompt LayerNorm, then CLIP's ln_post and projection."""
        hidden = self.prompt_norm(out.hidden)
        patches = F.normalize(backbone.project(out.patches(hidden)), dim=-1)
        global_embedding = F.normalize(backbone.project(hidden[:, 0]), dim=-1)
        return patches, global_embedding

    def _require_built(self) -> None:
        if not hasattr(self, "prompt_norm"):
            name = type(self).__name__
            raise RuntimeError(
                f"{name} has trained parts: load them with --checkpoint "
                "runs/<name>/last.safetensors (written by `zegkit train --recipe "
                "<method>-synthetic ...`; `zegkit train --help` lists the recipes)."
            )

    def mask_logits(self, backbone: ClipBackbone, pixels: Tensor, text_rows: Tensor) -> Tensor:
        """Mask logits (B, Q, h, w) of the text rows (Q, D) at patch resolution."""
        self._require_built()
        return self.decode(backbone, pixels, text_rows)[0]

    def forward(self, backbone: ClipBackbone, pixels: Tensor, text: TextEmbeddings) -> Tensor:
        logits = self.mask_logits(backbone, pixels, text.embeddings)
        return seen_penalty_scores(logits, text, self.config.seen_classes,
                                   self.config.seen_penalty)

    def loss(self, backbone: ClipBackbone, batch: Batch, text: TextEmbeddings) -> dict[str, Tensor]:
        """NEL loss over the seen classes' queries (all classes when self-training), plus the
        method's auxiliary terms."""
        config = self.config
        self._require_built()
        device = batch.labels.device
        seen = batch.seen if batch.seen is not None else torch.ones(
            text.num_classes, dtype=torch.bool, device=device)
        queried = torch.arange(text.num_classes, device=device)
        if not config.self_training:
            queried = queried[seen.to(device)]
        logits, auxiliary = self.decode(backbone, batch.pixels, text.embeddings[queried])
        logits = F.interpolate(logits, size=batch.labels.shape[-2:], mode="bilinear",
                               align_corners=False)
        labels = batch.labels
        if config.self_training:
            labels = self_training_labels(logits.detach(), labels, seen)
        terms = nel_loss(logits, labels, queried, focal_weight=config.focal_weight,
                         dice_weight=config.dice_weight, alpha=config.focal_alpha,
                         gamma=config.focal_gamma, ignore=config.ignore)
        for name, value in auxiliary.items():
            terms["loss"] = terms["loss"] + value
            terms[name] = value.detach()
        return terms
