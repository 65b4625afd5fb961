"""PACL — "Open Vocabulary Semantic Segmentation with Patch Aligned Contrastive Learning", Mukhoti,
Lin, Poursaeed, Wang, Shah, Torr, Lim, CVPR 2023 (arXiv 2212.04994). No official code.

What it changes: a vision embedder e_v, trained on image-caption pairs only (no masks), maps the
frozen CLIP's last-layer patch tokens v_i into the joint space; its patch-text cosines
s_i(x, y) = cos(e_v(v_i), e_t(y)) are the segmentation map. Training keeps CLIP's symmetric InfoNCE
and changes only its compatibility function: the image is pooled with softmax weights
a_i = softmax_i(s_i) of the caption being scored, φ(x, y) = cos(Σ_i a_i e_v(v_i), e_t(y)), for every
(image, caption) pair of the batch. Only e_v trains; the whole CLIP (both towers and their
projections) stays frozen. e_v is a residual block: a linear skip branch plus a
linear-ReLU-linear main branch (C -> D, D -> D).

Exact, in chunks: φ is computed for all B images x B captions, each pair with its own pooling
weights, `chunk_size` images at a time (a (chunk, B, n) similarity tensor and a (chunk, B, D)
pooled tensor per chunk); under autograd each chunk is recomputed in the backward pass
(activation checkpointing), so memory stays that of one chunk. The cheaper surrogate of the
community re-implementations (each image pooled once, with its own caption's weights, then
compared with every caption) is `compatibility="own_caption"`, never the default.

Data parallelism: every process computes the φ rows of its own images against the captions of
all processes (text embeddings are frozen, so gathering them needs no gradient), the rows are
gathered into the full B x B matrix and every process takes the same loss; the gradient is scaled
by the world size so that DDP's average of the processes' partial gradients is the one-process
gradient (see `_global_rows`, `_scaled_for_ddp`).

The paper's body was not readable with the tools zegkit was built with (see
shared/research/pacl.md: abstract and third-party summaries only); where it is silent or
unread, zegkit chose, each a config field:
- patch tokens: the last layer's, after CLIP's `post_layernorm` (as CLIP's own [CLS] embedding
  is), `post_layernorm=True`; e_v replaces CLIP's `visual_projection` for the patches.
- initialisation `init="clip_projection"`: the skip branch starts as CLIP's visual projection and
  the main branch's output layer at zero, so that before training PACL's dense map is exactly the
  naive dense CLIP map (`naive`) and training measures what patch alignment adds; "random" is
  PyTorch's default initialisation of all three layers.
- softmax over patches without a temperature (`patch_temperature=1`), as eq. 2-3 read in the
  third-party summaries.
- the pooled embedding is the softmax-weighted sum of the L2-normalised patch embeddings,
  renormalised before the cosine (`pooling="cosine"`: φ is a cosine, as CLIP's compatibility);
  `pooling="mean_similarity"` drops the renormalisation, φ = Σ_i a_i s_i.
- contrastive temperature: the frozen CLIP's own learned logit scale (100 for OpenAI's CLIPs),
  `contrastive_scale=None`; a number fixes another.
- noun-prompt augmentation of the captions is data, not the method (`zegkit.train.captions`).
- φ and the loss are computed in float32 under bf16 autocast (`_compatibility`).
- inference: the shared protocol (sliding window, bilinear upsampling); the paper's "stride
  trick" (a denser patch grid at test time) is not implemented.
Zero-shot classification scores an image with φ(x, class prompt embedding) (`image_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from zegkit.backbone import ClipBackbone
from zegkit.distributed import all_gather_cat, rank_and_world
from zegkit.methods.base import Batch, CaptionBatch, Method, MethodConfig, token_map
from zegkit.text import TextEmbeddings

COMPATIBILITIES = ("exact", "own_caption")
POOLINGS = ("cosine", "mean_similarity")
INITS = ("clip_projection", "random")


@dataclass
class PACLConfig(MethodConfig):
    """PACL's settings; the module docstring says which ones the paper fixes and which zegkit chose.

    Attributes:
        compatibility: "exact" (φ for every image x caption pair, each pooled with the scored
            caption's weights: the paper's) or "own_caption" (each image pooled with its own
            caption's weights only, then compared with all captions: a cheaper surrogate).
        pooling: "cosine" (φ = cos(Σ a_i ê_i, u), pooled embedding renormalised) or
            "mean_similarity" (φ = Σ a_i s_i, the softmax-weighted mean of the patch cosines).
        patch_temperature: t in a_i = softmax_i(s_i / t) (1: no temperature).
        contrastive_scale: the InfoNCE logit scale 1/τ; None: the frozen CLIP's learned one.
        post_layernorm: feed e_v the patch tokens after CLIP's post_layernorm.
        init: "clip_projection" (skip branch = CLIP's visual projection, main branch output 0:
            PACL starts as naive dense CLIP) or "random".
        chunk_size: images per chunk of the exact B x B x n computation (bounds memory).
    """

    compatibility: str = "exact"
    pooling: str = "cosine"
    patch_temperature: float = 1.0
    contrastive_scale: float | None = None
    post_layernorm: bool = True
    init: str = "clip_projection"
    chunk_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, allowed in (("compatibility", self.compatibility, COMPATIBILITIES),
                                     ("pooling", self.pooling, POOLINGS),
                                     ("init", self.init, INITS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        if self.patch_temperature <= 0:
            raise ValueError(f"patch_temperature must be positive, got {self.patch_temperature}.")
        if self.contrastive_scale is not None and self.contrastive_scale <= 0:
            raise ValueError(f"contrastive_scale must be positive or None (the CLIP's own), got "
                             f"{self.contrastive_scale}.")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}.")


class VisionEmbedder(nn.Module):
    """e_v(v) = A v + B ReLU(W v): a linear skip branch and a linear-ReLU-linear main branch."""

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.skip = nn.Linear(width, dim, bias=False)  # A
        self.hidden = nn.Linear(width, dim)  # W
        self.out = nn.Linear(dim, dim)  # B

    def forward(self, tokens: Tensor) -> Tensor:
        """Patch tokens (..., C) -> embeddings (..., D), not normalised."""
        return self.skip(tokens) + self.out(F.relu(self.hidden(tokens)))


def _pool_scores(patches: Tensor, similarity: Tensor, text: Tensor, temperature: float,
                 pooling: str) -> Tensor:
    """φ (c, K) from patch cosines `similarity` (c, K, n) of patches (c, n, D) and text (K, D)."""
    weights = (similarity / temperature).softmax(dim=-1)  # (c, K, n)
    mean_similarity = (weights * similarity).sum(dim=-1)  # Σ a_i s_i = (Σ a_i ê_i) · u
    if pooling == "mean_similarity":
        return mean_similarity
    pooled = torch.einsum("ckn,cnd->ckd", weights, patches)  # (c, K, D)
    return mean_similarity / pooled.norm(dim=-1).clamp(min=1e-12)


def _chunk_compatibility(patches: Tensor, text: Tensor, temperature: float,
                         pooling: str) -> Tensor:
    similarity = torch.einsum("cnd,kd->ckn", patches, text)  # (c, K, n)
    return _pool_scores(patches, similarity, text, temperature, pooling)


def compatibility(patches: Tensor, text: Tensor, *, temperature: float = 1.0,
                  pooling: str = "cosine", chunk_size: int = 32) -> Tensor:
    """PACL's φ(x_j, y_k) for every image j and text row k, pooled with row k's weights.

    Args:
        patches: (B, n, D) L2-normalised patch embeddings e_v(v_i).
        text: (K, D) L2-normalised text embeddings.
        temperature: softmax temperature over patches.
        pooling: "cosine" or "mean_similarity" (see PACLConfig).
        chunk_size: images per chunk; under autograd each chunk is recomputed in the backward.

    Returns:
        (B, K) compatibilities.
    """
    text = text.to(patches.dtype)
    rows = []
    for chunk in patches.split(chunk_size):
        if torch.is_grad_enabled() and chunk.requires_grad:
            rows.append(checkpoint(_chunk_compatibility, chunk, text, temperature, pooling,
                                   use_reentrant=False))
        else:
            rows.append(_chunk_compatibility(chunk, text, temperature, pooling))
    return torch.cat(rows)


def own_caption_compatibility(patches: Tensor, own_text: Tensor, text: Tensor, *,
                              temperature: float = 1.0, pooling: str = "cosine") -> Tensor:
    """The surrogate: image j pooled once with its own caption's weights, scored against all rows.

    Args:
        patches: (B, n, D) L2-normalised patch embeddings.
        own_text: (B, D) L2-normalised embedding of each image's own caption.
        text: (K, D) L2-normalised text rows to score.

    Returns:
        (B, K): cos(Σ a_i(x_j, y_j) ê_i, u_k), or (Σ a_i(x_j, y_j) ê_i) · u_k without
        renormalisation for pooling "mean_similarity".
    """
    own_text = own_text.to(patches.dtype)
    similarity = torch.einsum("bnd,bd->bn", patches, own_text)
    weights = (similarity / temperature).softmax(dim=-1)  # (B, n)
    pooled = torch.einsum("bn,bnd->bd", weights, patches)
    if pooling == "cosine":
        pooled = F.normalize(pooled, dim=-1)
    return pooled @ text.to(patches.dtype).T


def contrastive_loss(logits: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE over (B, B) image x caption logits whose diagonal pairs match."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.float().T, labels)) / 2


def _global_rows(local: Tensor) -> Tensor:
    """This process's rows (b, B) among every process's, in rank order: (W*b, B).

    Only the local rows carry gradient (the others are gathered values); see `_scaled_for_ddp`.
    """
    rank, world = rank_and_world()
    if world == 1:
        return local
    rows = list(all_gather_cat(local.detach()).chunk(world))
    rows[rank] = local
    return torch.cat(rows)


def _scaled_for_ddp(loss: Tensor) -> Tensor:
    """`loss` with its value unchanged and its gradient multiplied by the world size.

    Every process computes the same global loss but back-propagates only through its own rows, so
    its parameter gradient is its share of the global gradient; DDP averages the shares, which
    would divide the sum by the world size.
    """
    _, world = rank_and_world()
    return loss if world == 1 else loss + (world - 1) * (loss - loss.detach())


class PACL(Method):
    """PACL: a trained patch embedder on a frozen CLIP; dense map = patch-text cosine."""

    description = ("PACL (trained on captions): vision embedder on the frozen patch tokens, "
                   "patch-aligned contrastive loss; needs --checkpoint from `zegkit train`")

    def build(self, backbone: ClipBackbone) -> None:
        self.embedder = VisionEmbedder(backbone.width, backbone.embed_dim)
        if self.config.init == "clip_projection":
            with torch.no_grad():
                self.embedder.skip.weight.copy_(backbone.model.visual_projection.weight)
                nn.init.zeros_(self.embedder.out.weight)
                nn.init.zeros_(self.embedder.out.bias)
        self.to(backbone.device)

    def _require_built(self) -> None:
        if not hasattr(self, "embedder"):
            raise RuntimeError(
                "PACL has a trained vision embedder: load it with --checkpoint "
                "runs/<name>/last.safetensors (written by `zegkit train --recipe pacl-synthetic`)."
            )

    def patch_embeddings(self, backbone: ClipBackbone, pixels: Tensor) -> tuple[Tensor, tuple]:
        """L2-normalised e_v(v_i) (B, n, D) of normalised crops (B, 3, H, W), and the grid.

        The frozen backbone runs without gradient; only e_v is differentiated.
        """
        self._require_built()
        with torch.no_grad():
            out = backbone.forward_intermediates(pixels, indices=[])
            tokens = out.tokens
            if self.config.post_layernorm:
                tokens = backbone.vision.post_layernorm(tokens)
        return F.normalize(self.embedder(tokens), dim=-1), out.grid

    def dense_features(self, backbone: ClipBackbone, pixels: Tensor) -> Tensor:
        patches, grid = self.patch_embeddings(backbone, pixels)
        return token_map(patches, grid)

    def image_scores(self, backbone: ClipBackbone, pixels: Tensor, text_rows: Tensor) -> Tensor:
        """Zero-shot classification scores (B, K): φ(x, y_k), each class pooling its own way."""
        patches, _ = self.patch_embeddings(backbone, pixels)
        rows = F.normalize(text_rows.to(patches.device), dim=-1)
        return self._compatibility(patches, rows, rows)

    def _compatibility(self, patches: Tensor, own_text: Tensor, text: Tensor) -> Tensor:
        """φ in float32 even under bf16 autocast: the φ of a batch differ by about bf16's
        resolution (1/128), which would drown the contrastive signal."""
        config = self.config
        patches, own_text, text = patches.float(), own_text.float(), text.float()
        with torch.autocast(patches.device.type, enabled=False):
            if config.compatibility == "own_caption":
                return own_caption_compatibility(patches, own_text, text,
                                                 temperature=config.patch_temperature,
                                                 pooling=config.pooling)
            return compatibility(patches, text, temperature=config.patch_temperature,
                                 pooling=config.pooling, chunk_size=config.chunk_size)

    def contrastive_scale(self, backbone: ClipBackbone) -> float:
        """1/τ of the InfoNCE: the config's, else the frozen CLIP's learned logit scale."""
        if self.config.contrastive_scale is not None:
            return self.config.contrastive_scale
        return float(backbone.model.logit_scale.exp())

    def loss(self, backbone: ClipBackbone, batch: Batch | CaptionBatch,
             text: TextEmbeddings | None = None) -> dict[str, Tensor]:
        """The patch-aligned InfoNCE over the global batch of (image, caption) pairs.

        Returns:
            {"loss": symmetric InfoNCE, "accuracy": fraction of images whose own caption has the
            highest φ of the batch (detached)}.

        Raises:
            TypeError: a mask batch (PACL trains on captions).
        """
        if not isinstance(batch, CaptionBatch):
            raise TypeError("PACL trains on image-caption pairs (a CaptionBatch), not masks; use "
                            "a caption recipe such as pacl-synthetic.")
        patches, _ = self.patch_embeddings(backbone, batch.pixels)
        with torch.no_grad():
            own = F.normalize(backbone.encode_text(batch.captions).float(), dim=-1)
        own = own.to(patches.device)
        captions = all_gather_cat(own)  # (B, D): every process's captions, in rank order
        phi = _global_rows(self._compatibility(patches, own, captions))  # (B, B)
        logits = self.contrastive_scale(backbone) * phi
        loss = contrastive_loss(logits)
        accuracy = (logits.detach().argmax(dim=1) == torch.arange(len(logits),
                                                                   device=logits.device))
        return {"loss": _scaled_for_ddp(loss), "accuracy": accuracy.float().mean()}
