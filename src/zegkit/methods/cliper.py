"""CLIPer — "CLIPer: Hierarchically Improving Spatial Representation of CLIP for Open-Vocabulary
Semantic Segmentation", Sun, Cao, Xie, Jiang, Pang, ICCV 2025 (arXiv 2411.13836).

Public code: linsun449/cliper.code @ 85fbe81 (HEAD; `modified_clip/model.py::CLIPer`
`forward_transformer`, `custom_attn` "fused-attn", `forward`, `upsample_pos_emb`;
`ovs/pipeline.py`; `scripts/config/vit-b-16/*.yaml`), read beside the first release @ 0bfad0d.

Change (early-layer fusion, this file): the attention maps of all early layers 1..N-1 (CLIP's own
q-k attention, per head) are averaged into Ā, which replaces the last layer's attention; the last
layer keeps neither its residual nor its feed-forward path. The last layer is run once per early
layer embedding Fⁿ (n = 0..N-1), each output projected into the joint space and scored against the
text; the N segmentation maps softmax(s · cos) are averaged into the coarse map S_c. Details from
the code (the paper's method text summarises them as "average"): Ā is normalised before use —
columns then rows to sum 1, symmetrised, each column's mean subtracted and negatives clipped, rows
renormalised — and the map of one layer (`propagate_layer`, the code's `select_layer`) is
thresholded at `propagate_threshold` of each class's maximum, propagated by the head-averaged Ā
over patches and added to the average.

Output: `forward` returns S_c renormalised over the class rows (rows = "classes"), already
probabilities (activation "identity"). The fine-grained compensation (Stable Diffusion
self-attention) is the "diffusion" refiner of `zegkit.refine`; `refiners()` names it, with
CLIPer's threshold, when `compensation` is on, and the Segmenter runs it on the stitched map.

Two readings, one setting `variant`:

- "paper" (default): the formulas as the paper writes them — the embeddings Fⁿ enter the last
  layer, Ā is normalised once, propagation is Ā · τ(S_sel) (as @0bfad0d, `attn @ seg`), the mean
  is over the unthresholded maps.
- "released": the released code's behaviour, which differs in five places:
  1. Early embeddings are LayerNormed twice: slot n < N-1 holds layer n's own `ln_1(Fⁿ)`, which
     the last layer's `ln_1` normalises again (`forward_transformer`: `img_features[i] = ln_x`,
     then `model_res.ln_1(x)`).
  2. The fused attention is renormalised in place on every pass: `custom_attn` divides the shared
     `attn_mask` by its column sums, then its row sums, in place, before the rest of the chain,
     so the k-th of the N passes (k = 1..N) sees k column/row normalisations; the propagation
     uses the last pass's attention.
  3. Propagation with the transposed attention: `forward` computes `seg_last @ attn`, i.e. patch
     j receives Σ_i S_sel[i] Ā[i, j] = (Āᵀ S_sel)[j] (@85fbe81; @0bfad0d used `attn @ seg`).
  4. The threshold is applied to the selected map in place (`seg_last[...] = 0` on a view of
     `seg`) before `seg.mean(0)`, so the mean holds the thresholded map.
  5. Position embeddings rounded through float16 (`upsample_pos_emb` returns `emb.half()`):
     the backbone's `position_rounding` option, for this forward only.
  The code also resizes position embeddings bilinearly (zegkit's backbone: bicubic, as
  `transformers`), a difference left with the backbone.

Not reproduced in either variant: the code's extra softmax rows (background words, see
`zegkit.data.protocols` CLIPer protocols, and the mean foreground text embedding), its 0.5/0.5 mix
of whole-image and sliding-window maps with cross-crop attention stitching, and its per-class
score filter (`util/miou.py::cam_to_label`); zegkit's shared inference protocol decides labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import repeat

import torch
import torch.nn.functional as F
from torch import Tensor

from zegkit.backbone import ClipBackbone, Intermediates
from zegkit.methods.base import Method, MethodConfig, RefinerSpec, token_map
from zegkit.refine.diffusion import ATTENTION_THRESHOLD, SD_MODEL, require_weights
from zegkit.scores import Activation
from zegkit.text import TextEmbeddings

VARIANTS = ("paper", "released")
CLIPER_LOGIT_SCALE = 100.0  # scripts/config/vit-b-16/*.yaml (Object / Stuff 50; ViT-L/14 50-100)
NORMALIZE_EPS = 1e-12  # guards the row/column sums of the fused attention against 0


@dataclass
class CLIPerConfig(MethodConfig):
    """CLIPer settings.

    Attributes:
        logit_scale: s in softmax(s · cos) of every layer's segmentation map (ViT-B/16 configs 100,
            50 for COCO-Object / Stuff; ViT-L/14 50-100).
        variant: "paper" (the paper's formulas) or "released" (the released code's behaviour, see
            the module docstring).
        normalize_attention: normalise the averaged early attention as the code's "fused-attn"
            (column/row sums, symmetrise, keep above-column-mean affinities); default True.
        propagate_layer: index (0..N-1, negatives from the end) of the map that is thresholded,
            propagated by the fused attention and added to the average (code `select_layer`:
            -1 for ViT-B/16, -2 for most ViT-L/14 configs); None keeps the plain average.
        propagate_threshold: values of that map below this fraction of its class maximum are
            zeroed before propagation (code `attention_thr`: 0.1 VOC, 0.2 most, 0.35 Cityscapes).
        compensation: run the fine-grained compensation, the "diffusion" refiner (paper: on);
            False runs fusion-only.
        diffusion_model: Stable Diffusion weights (hub id or local diffusers directory) for the
            compensation (the paper's: SD 2.1 base).
        diffusion_threshold: the compensation's attention threshold (the code's same
            `attention_thr` key sets both thresholds).
    """

    logit_scale: float = CLIPER_LOGIT_SCALE
    variant: str = "paper"
    normalize_attention: bool = True
    propagate_layer: int | None = -1
    propagate_threshold: float = ATTENTION_THRESHOLD
    compensation: bool = True
    diffusion_model: str = SD_MODEL
    diffusion_threshold: float = ATTENTION_THRESHOLD

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(
                f"variant must be one of {VARIANTS}, got {self.variant!r} ('paper': the paper's "
                "formulas; 'released': the released code's behaviour)."
            )
        for name in ("propagate_threshold", "diffusion_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(
                    f"{name} is a fraction of a maximum in [0, 1), got {value} (the code uses "
                    "0.1, 0.2 or 0.35)."
                )


def balance_attention_(attention: Tensor) -> Tensor:
    """One column-then-row normalisation of attention maps (..., T, T), in place, as the code's
    step is; returns `attention`."""
    attention.div_(attention.sum(-2, keepdim=True).clamp_min(NORMALIZE_EPS))
    return attention.div_(attention.sum(-1, keepdim=True).clamp_min(NORMALIZE_EPS))


def symmetric_affinity(attention: Tensor) -> Tensor:
    """The rest of the code's "fused-attn" chain on balanced maps (..., T, T), into one new
    tensor: symmetrise, subtract each column's mean over the rows, clip negatives, rows to
    sum 1."""
    affinity = (attention + attention.transpose(-2, -1)).div_(2)
    affinity.sub_(affinity.mean(-2, keepdim=True)).clamp_min_(0)
    return affinity.div_(affinity.sum(-1, keepdim=True).clamp_min(NORMALIZE_EPS))


def normalize_fused_attention_(attention: Tensor) -> Tensor:
    """The code's "fused-attn" normalisation of averaged attention maps (..., T, T), once;
    `attention` is balanced in place on the way."""
    return symmetric_affinity(balance_attention_(attention))


class CLIPer(Method):
    """Early-layer fusion of CLIPer (see the module docstring); no parameters."""

    description = (
        "early-layer attention + embedding fusion in the last block, SD refiner (ICCV 2025)"
    )
    rows = "classes"

    def activation(self) -> Activation:
        """The coarse map is a probability map already."""
        return Activation("identity")

    def refiners(self) -> tuple[RefinerSpec, ...]:
        """The fine-grained compensation ("diffusion" refiner) when `compensation` is on.

        Raises:
            RuntimeError / FileNotFoundError: `compensation` is on but `diffusers` is not
                installed or the Stable Diffusion weights cannot be found; the message says what
                to install or download, or to set compensation=False for fusion-only.
        """
        if not self.config.compensation:
            return ()
        try:
            require_weights(self.config.diffusion_model)
        except (RuntimeError, FileNotFoundError) as error:
            raise type(error)(
                f"CLIPer's fine-grained compensation cannot run: {error} Or set "
                "compensation=False to run CLIPer fusion-only (no Stable Diffusion stage)."
            ) from error
        options = {
            "model": self.config.diffusion_model,
            "threshold": self.config.diffusion_threshold,
        }
        return (("diffusion", options),)

    def fused_features(self, backbone: ClipBackbone, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The last layer run on every early embedding with the fused early attention.

        Args:
            backbone: CLIP backbone with at least 2 layers.
            pixels: normalised images (B, 3, H, W).

        Returns:
            features: (N, B, h*w, D) L2-normalised patch embeddings in the joint space, one per
                early embedding slot 0..N-1.
            attention: (B, heads, T, T) the fused attention of the last pass, which propagates.

        Raises:
            ValueError: the backbone has a single layer (no early layers to fuse).
        """
        passes = list(self._passes(backbone, pixels))
        return torch.stack([features for features, _ in passes]), passes[-1][1]

    def _passes(self, backbone: ClipBackbone, pixels: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """The N passes of the last layer one at a time, so that callers can fold them without
        holding all N: (features (B, h*w, D) as in `fused_features`, the attention used)."""
        layers = backbone.num_layers
        if layers < 2:
            raise ValueError(
                f"CLIPer fuses the layers before the last one; this backbone has {layers} layer."
            )
        early = list(range(layers - 1))
        out = backbone.forward_intermediates(
            pixels, indices=early[:-1], stop_early=True, return_attention=early,
            sum_attention=True, position_rounding=self._position_rounding(),
        )
        # the mean (B, heads, T, T) goes to the passes alone, so the paper variant frees it
        # once normalised (a map is 28 MB on B/16 x 15 crops)
        mean, out.attention_sum = out.attention_sum.div_(len(early)), None
        attentions = self._pass_attentions(mean, layers)
        del mean
        inputs = self._early_inputs(backbone, pixels, out)  # N x (B, T, C), one at a time
        # not zip: it holds its previous pair while making the next (so does enumerate), and
        # the released variant's previous affinity (28 MB on B/16 x 15 crops) would stay alive
        for x in inputs:
            attention = next(attentions)
            tokens = backbone.attention_branch(layers - 1, x, attention)  # (B, T, C)
            yield F.normalize(backbone.project(tokens[:, 1:, :]), dim=-1), attention
            del x, attention, tokens

    def _position_rounding(self) -> torch.dtype | None:
        """float16 for the released variant (its position embeddings are half precision)."""
        return torch.float16 if self.config.variant == "released" else None

    def _pass_attentions(self, mean: Tensor, passes: int) -> Iterator[Tensor]:
        """The attention (B, heads, T, T) each of the `passes` runs of the last layer uses, made
        as the passes ask for it."""
        if not self.config.normalize_attention:
            yield from repeat(mean, passes)
        elif self.config.variant == "paper":
            fused = normalize_fused_attention_(mean)
            del mean
            yield from repeat(fused, passes)
        else:
            for _ in range(passes):  # the code's in-place balancing accumulates over the passes
                yield symmetric_affinity(balance_attention_(mean))

    def _early_inputs(self, backbone: ClipBackbone, pixels: Tensor, out: Intermediates
                      ) -> Iterator[Tensor]:
        """The N inputs (B, T, C) of the last layer, one at a time: F⁰..F^{N-2} ([CLS] first) —
        each through its own layer's layer_norm1 in the released variant — and F^{N-1} as it
        is. Each layer's output leaves `out` as its copy is made, so the N early embeddings are
        held once, not twice (random ViT-B/16, 15 crops: 109 MB each time)."""
        released = self.config.variant == "released"
        x = backbone.embed(pixels, self._position_rounding())
        for slot in range(len(out.intermediates) + 1):  # F^0..F^{N-2}
            if slot:
                prefix, tokens = out.intermediate_prefix[slot - 1], out.intermediates[slot - 1]
                out.intermediate_prefix[slot - 1] = out.intermediates[slot - 1] = None
                x = torch.cat([prefix[:, None], tokens], dim=1)
            yield backbone.layers[slot].layer_norm1(x) if released else x
        yield out.hidden  # F^{N-1}, the last layer's normal input, in both

    def dense_features(self, backbone: ClipBackbone, pixels: Tensor) -> Tensor:
        """Feature-space fusion (B, D, h, w): the renormalised mean of the N fused embeddings.

        For decoders and other classifiers; `forward` fuses the segmentation maps instead, as the
        paper does.
        """
        features, _ = self.fused_features(backbone, pixels)
        return token_map(features.mean(0), backbone.grid_size(pixels))

    def coarse_map(self, backbone: ClipBackbone, pixels: Tensor, text_rows: Tensor) -> Tensor:
        """CLIPer's coarse segmentation map S_c (B, Q, h, w) over the text rows (Q, D), float32.

        S_c = mean_n softmax(s · cos(Zⁿ, t)) + P · τ(S^{sel}), P = Ā over patches (Āᵀ in the
        released variant); the second term only when `propagate_layer` is set. The N maps are
        summed as the passes run (one map and one pass in memory at a time).
        """
        count = backbone.num_layers  # N, one pass per early embedding slot
        chosen_index = None
        if self.config.propagate_layer is not None:
            chosen_index = self._propagate_index(count) % count
        total = chosen = propagated = None
        passes = self._passes(backbone, pixels)
        for index in range(count):  # one at a time, nothing of the previous pass held (`_passes`)
            features, attention = next(passes)
            # the maps in float32, also under autocast (bf16 would blur softmax(100 · cos))
            with torch.autocast(features.device.type, enabled=False):
                scores = self.config.logit_scale * features.float() @ text_rows.float().T
                maps = scores.softmax(-1)  # (B, h*w, Q)
                total = maps if total is None else total + maps
                chosen = maps if index == chosen_index else chosen
                if chosen is not None and index == count - 1:  # by the last pass's attention
                    propagated = self._propagated(chosen, attention.float(), count)
            del features, attention
        coarse = total / count if propagated is None else total / count + propagated
        batch, _, rows = coarse.shape
        return coarse.transpose(1, 2).reshape(batch, rows, *backbone.grid_size(pixels))

    def _propagated(self, chosen: Tensor, attention: Tensor, count: int) -> Tensor:
        """The propagation term (B, h*w, Q) of the chosen map (B, h*w, Q) by the last pass's
        attention; in the released variant it also carries the correction that puts the
        thresholded map into the mean of the `count` maps."""
        floor = self.config.propagate_threshold * chosen.amax(dim=1, keepdim=True)
        kept = torch.where(chosen < floor, torch.zeros_like(chosen), chosen)
        patches = attention.mean(1)[:, 1:, 1:]  # (B, h*w, h*w)
        if self.config.variant == "paper":
            return patches @ kept
        return patches.transpose(1, 2) @ kept + (kept - chosen) / count

    def _propagate_index(self, count: int) -> int:
        index = self.config.propagate_layer
        if not -count <= index < count:
            raise ValueError(
                f"propagate_layer={index} is outside the {count} fused maps of this backbone "
                f"(valid: {-count}..{count - 1}, or None to turn propagation off)."
            )
        return index

    def forward(self, backbone: ClipBackbone, pixels: Tensor, text: TextEmbeddings) -> Tensor:
        """Class probabilities (B, K, h, w), float32: the coarse map over the class rows
        ``text.embeddings``, renormalised over the classes."""
        coarse = self.coarse_map(backbone, pixels, text.embeddings)
        return coarse / coarse.sum(1, keepdim=True)
