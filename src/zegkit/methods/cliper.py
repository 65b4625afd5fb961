"""CLIPer — "CLIPer: Hierarchically Improving Spatial Representation of CLIP for Open-Vocabulary
Semantic Segmentation", Sun, Cao, Xie, Jiang, Pang, ICCV 2025 (arXiv 2411.13836).

Public code: linsun449/cliper.code @ 85fbe81 (`modified_clip/model.py::CLIPer.forward_transformer`,
`custom_attn` "fused-attn", `forward`; `ovs/pipeline.py`; `scripts/config/vit-b-16/*.yaml`), read
beside the first release @ 0bfad0d.

Change (early-layer fusion, this file): the attention maps of all early layers 1..N-1 (CLIP's own
q-k attention, per head) are averaged into Ā, which replaces the last layer's attention; the last
layer keeps neither its residual nor its feed-forward path. The last layer is run once per early
layer embedding Fⁿ (n = 0..N-1), each output projected into the joint space and scored against the
text; the N segmentation maps softmax(s · cos) are averaged into the coarse map. The fine-grained
compensation (Stable Diffusion self-attention) is a separate refiner, `zegkit.diffusion`, that
works after any method; `CLIPer.build_refiner` builds it, or warns once and runs fusion-only when
`diffusers` is not installed.

Details from the code (the paper's method text summarises them as "average"): Ā is normalised
before use — columns then rows to sum 1, symmetrised, each column's mean subtracted and negatives
clipped, rows renormalised — and the map of one layer (`propagate_layer`, the code's
`select_layer`) is thresholded at `propagate_threshold` of each class's maximum, propagated by the
head-averaged Ā over patches and added to the average.

Deviations: the code normalises Ā in place on a shared tensor, so its k-th last-layer pass sees k+1
column/row normalisations; we normalise once. @85fbe81 propagates with Āᵀ (`seg @ attn`), @0bfad0d
with Ā (`attn @ seg`); we use Ā, and average all N maps as @85fbe81 does. The code feeds the early
embeddings through each layer's own layer_norm1 before the last layer (a double LayerNorm);
we feed the embeddings Fⁿ as the paper writes them (`early_input="layer_norm"` gives the code's).
The code's extra softmax row (the mean foreground text embedding), its 0.5/0.5 mix of whole-image
and sliding-window maps with cross-crop attention stitching, and its per-class score filter
(`cam_to_label`) are not reproduced; zegkit's shared inference protocol decides the labels.

Output: `forward` returns log(S_c) / s, so the shared decision softmax(s · logits) gives back the
coarse map S_c (renormalised over the text rows) when run at the method's logit scale s.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from zegkit.backbone import ClipBackbone
from zegkit.methods.base import Method, MethodConfig, token_map
from zegkit.text import TextEmbeddings

logger = logging.getLogger(__name__)

EARLY_INPUTS = ("residual", "layer_norm")
CLIPER_LOGIT_SCALE = 100.0  # scripts/config/vit-b-16/*.yaml (ViT-L/14 configs use 50)
PROPAGATE_THRESHOLD = 0.2  # attention_thr of the ViT-B/16 Context / Context59 / ADE configs
NORMALIZE_EPS = 1e-12  # guards the row/column sums of the fused attention against 0
# The name of the default Stable Diffusion weights lives in zegkit.diffusion (SD_MODEL); kept as a
# string here so that importing this file never imports diffusers.
DEFAULT_DIFFUSION_MODEL = "stabilityai/stable-diffusion-2-1-base"

_warned_fusion_only = False


@dataclass
class CLIPerConfig(MethodConfig):
    """CLIPer settings.

    Attributes:
        logit_scale: s in softmax(s · cos) of every layer's segmentation map (ViT-B/16 configs 100,
            ViT-L/14 50).
        early_input: which embedding of layer n enters the last layer: "residual" = Fⁿ, the
            layer's output (paper), "layer_norm" = layer n's layer_norm1(Fⁿ) (code).
        normalize_attention: normalise the averaged early attention as the code's "fused-attn"
            (column/row sums, symmetrise, keep above-column-mean affinities); default True.
        propagate_layer: index (0..N-1, negatives from the end) of the map that is thresholded,
            propagated by the fused attention and added to the average (code `select_layer`:
            -1 for ViT-B/16, -2 for ViT-L/14); None keeps the plain average.
        propagate_threshold: values of that map below this fraction of its class maximum are
            zeroed before propagation (code `attention_thr`, 0.2 for most ViT-B/16 datasets).
        compensation: apply the fine-grained compensation built by `build_refiner` (paper: on);
            False runs fusion-only.
        diffusion_model: Stable Diffusion weights (hub id or local diffusers directory) for the
            compensation (the paper's: SD 2.1 base).
    """

    logit_scale: float = CLIPER_LOGIT_SCALE
    early_input: str = "residual"
    normalize_attention: bool = True
    propagate_layer: int | None = -1
    propagate_threshold: float = PROPAGATE_THRESHOLD
    compensation: bool = True
    diffusion_model: str = DEFAULT_DIFFUSION_MODEL

    def __post_init__(self) -> None:
        if self.early_input not in EARLY_INPUTS:
            raise ValueError(
                f"early_input must be one of {EARLY_INPUTS}, got {self.early_input!r} "
                "('residual': the layer outputs, as the paper; 'layer_norm': as the code)."
            )
        if not 0.0 <= self.propagate_threshold <= 1.0:
            raise ValueError(
                f"propagate_threshold is a fraction of each class maximum in [0, 1], got "
                f"{self.propagate_threshold}."
            )
        if self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be positive, got {self.logit_scale}.")


def normalize_fused_attention(attention: Tensor) -> Tensor:
    """The code's "fused-attn" normalisation of averaged attention maps (..., T, T).

    Columns are scaled to sum 1, then rows; the result is symmetrised, each column's mean over
    the rows is subtracted, negatives are clipped, and rows are scaled to sum 1 again.
    """
    attention = attention / attention.sum(-2, keepdim=True).clamp_min(NORMALIZE_EPS)
    attention = attention / attention.sum(-1, keepdim=True).clamp_min(NORMALIZE_EPS)
    attention = (attention + attention.transpose(-2, -1)) / 2
    attention = (attention - attention.mean(-2, keepdim=True)).clamp_min(0)
    return attention / attention.sum(-1, keepdim=True).clamp_min(NORMALIZE_EPS)


class CLIPer(Method):
    """Early-layer fusion of CLIPer (see the module docstring); no parameters."""

    description = (
        "early-layer attention + embedding fusion in the last block, SD refiner (ICCV 2025)"
    )

    def fused_features(self, backbone: ClipBackbone, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The last layer run on every early embedding with the fused early attention.

        Args:
            backbone: CLIP backbone with at least 2 layers.
            pixels: normalised images (B, 3, H, W).

        Returns:
            features: (N, B, h*w, D) L2-normalised patch embeddings in the joint space, one per
                early embedding F⁰..F^{N-1}.
            attention: (B, heads, T, T) the fused early attention used by the last layer.

        Raises:
            ValueError: the backbone has a single layer (no early layers to fuse).
        """
        layers = backbone.num_layers
        if layers < 2:
            raise ValueError(
                f"CLIPer fuses the layers before the last one; this backbone has {layers} layer."
            )
        early = list(range(layers - 1))
        out = backbone.forward_intermediates(
            pixels, indices=early[:-1], stop_early=True, return_attention=early
        )
        attention = sum(out.attention[i] for i in early) / len(early)  # (B, heads, T, T)
        if self.config.normalize_attention:
            attention = normalize_fused_attention(attention)
        inputs = self._early_inputs(backbone, pixels, out)  # (N, B, T, C)
        tokens = backbone.attention_branch(layers - 1, inputs, attention)
        features = F.normalize(backbone.project(tokens[..., 1:, :]), dim=-1)
        return features, attention

    def _early_inputs(self, backbone: ClipBackbone, pixels: Tensor, out) -> Tensor:
        """F⁰..F^{N-1} (N, B, T, C): embedding, outputs of layers 0..N-2 ([CLS] first)."""
        embeddings = [backbone.embed(pixels)]
        for prefix, tokens in zip(out.intermediate_prefix, out.intermediates, strict=True):
            embeddings.append(torch.cat([prefix[:, None], tokens], dim=1))
        if self.config.early_input == "layer_norm":
            embeddings = [backbone.layers[n].layer_norm1(x) for n, x in enumerate(embeddings)]
        embeddings.append(out.hidden)  # F^{N-1}, input of the last layer, as it is in both
        return torch.stack(embeddings)

    def dense_features(self, backbone: ClipBackbone, pixels: Tensor) -> Tensor:
        """Feature-space fusion (B, D, h, w): the renormalised mean of the N fused embeddings.

        For decoders and other classifiers; `forward` fuses the segmentation maps instead, as the
        paper does.
        """
        features, _ = self.fused_features(backbone, pixels)
        return token_map(features.mean(0), backbone.grid_size(pixels))

    def coarse_map(self, backbone: ClipBackbone, pixels: Tensor, text_rows: Tensor) -> Tensor:
        """CLIPer's coarse segmentation map S_c (B, Q, h, w) over the text rows (Q, D).

        S_c = mean_n softmax(s · cos(Zⁿ, t)) + Ā_patch · τ(S^{sel}); the second term only when
        `propagate_layer` is set (see the module docstring).
        """
        features, attention = self.fused_features(backbone, pixels)
        # the maps in float32, also under autocast (bf16 would blur softmax(100 · cos))
        with torch.autocast(features.device.type, enabled=False):
            features, attention = features.float(), attention.float()
            scale = self.config.logit_scale
            maps = (scale * features @ text_rows.float().T).softmax(-1)  # (N, B, h*w, Q)
            coarse = maps.mean(0)
            if self.config.propagate_layer is not None:
                chosen = maps[self._propagate_index(len(maps))]  # (B, h*w, Q)
                floor = self.config.propagate_threshold * chosen.amax(dim=1, keepdim=True)
                kept = torch.where(chosen < floor, torch.zeros_like(chosen), chosen)
                patches = attention.mean(1)[:, 1:, 1:]  # (B, h*w, h*w)
                coarse = coarse + patches @ kept
        batch, _, rows = coarse.shape
        return coarse.transpose(1, 2).reshape(batch, rows, *backbone.grid_size(pixels))

    def _propagate_index(self, count: int) -> int:
        index = self.config.propagate_layer
        if not -count <= index < count:
            raise ValueError(
                f"propagate_layer={index} is outside the {count} fused maps of this backbone "
                f"(valid: {-count}..{count - 1}, or None to turn propagation off)."
            )
        return index

    def forward(self, backbone: ClipBackbone, pixels: Tensor, text: TextEmbeddings) -> Tensor:
        """Logits (B, Q, h, w) whose softmax at the method's logit scale is the coarse map.

        Returns log(S_c) / s in float32, clipped below at -1 (S_c ≥ e^-s, or float32's smallest
        normal number for s > 87), so values stay in the cosine range the shared protocol expects.
        """
        scale = self.config.logit_scale
        coarse = self.coarse_map(backbone, pixels, text.embeddings)
        floor = max(math.exp(-scale), torch.finfo(torch.float32).tiny)
        with torch.autocast(coarse.device.type, enabled=False):
            return coarse.clamp_min(floor).log() / scale

    def build_refiner(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **refiner_overrides: object,
    ):
        """The fine-grained compensation: a `zegkit.diffusion.DiffusionRefiner`, or None.

        Args:
            device: where the Stable Diffusion models live.
            dtype: their weight dtype (float16 on GPUs, as the code runs).
            **refiner_overrides: fields of `DiffusionRefinerConfig` (e.g. threshold, layers).

        Returns None when `compensation` is off, or when `diffusers` is not installed (then a
        warning says once that CLIPer runs fusion-only and how to install the extra).

        Raises:
            FileNotFoundError / RuntimeError: the Stable Diffusion weights cannot be found (the
                message names what to download).
        """
        from zegkit import diffusion

        if not self.config.compensation:
            return None
        if not diffusion.diffusers_available():
            _warn_fusion_only()
            return None
        config = diffusion.DiffusionRefinerConfig(
            model=self.config.diffusion_model, **refiner_overrides
        )
        return diffusion.DiffusionRefiner.from_pretrained(config, device=device, dtype=dtype)


def _warn_fusion_only() -> None:
    global _warned_fusion_only
    if not _warned_fusion_only:
        _warned_fusion_only = True
        logger.warning(
            "CLIPer runs fusion-only: its fine-grained compensation needs `diffusers`, which is "
            "not installed. Install it with `pip install zegkit[diffusion]`."
        )
