"""CLIP-RC (Zhang et al., "Exploring Regional Clues in CLIP for Zero-Shot Semantic
Segmentation", CVPR 2024): region-level bridge tokens, region-aware queries and a recovery loss on
ZegCLIP's prompted CLIP.

- Region-level bridge (RLB): R tokens, one per cell of a grid of image regions, appended after the
  patches. Under an attention mask a region token sees only itself and its region's patches; a
  patch sees [CLS], the prompts, every patch and its own region's token; [CLS] and the prompts
  never see region tokens.
- Region alignment: per region l and class c the query q_{l,c} = W_q [(r_l + g) ⊙ t_c ; t_c];
  visual tokens v_i = W_v [r_{l(i)}↑ ; g ; h_i] with the region map bilinearly upsampled to the
  patch grid; a two-stream decoder where queries attend to visual tokens and, in parallel,
  visual tokens attend to queries; mask logits <q_{l,c}, v_i>, averaged over the regions.
- Recovery decoder (training only): one more two-stream layer and linear heads reconstruct the
  queries' inputs [(r_l + g) ⊙ t_c ; t_c] and the patch embeddings h from the decoded tokens; the
  L1 recovery loss regularises against over-fitting to the seen classes.

Follows the released code (uyzhang/CLIP-RC @ 68927c1, shared/research/clip_rc.md) where the paper
is silent: 4 x 4 regions, region tokens initialised to CLIP's [CLS] input (class embedding plus its
position embedding, through ln_pre), the second linear of every visual-stream feed-forward block
initialised to zero, unscaled dot-product masks, recovery targets detached, loss weights focal
100 / dice 1 / recovery 2 (VOC). Regions are assigned by splitting the patch grid into equal
bands (floor(i · R_h / h)), so any crop size works, not only 512.

Deviation, with the released behaviour one setting away: the released code leaves the region
tokens frozen at their [CLS]-based initialisation (its freeze rule trains only names containing
"prompt"). The paper introduces them as learnable bridge tokens initialised from [CLS], so zegkit
trains them (`region_tokens="trainable"`); "frozen" reproduces the released model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zegkit.backbone import ClipBackbone, TokenInjection
from zegkit.methods.zegclip_base import (
    CrossAttentionLayer,
    PromptedDecoderMethod,
    RelationshipDescriptor,
    ZegCLIPConfig,
)

REGION_TOKEN_MODES = ("trainable", "frozen")
MASK_SCALES = ("none", "sqrt_dim")


@dataclass
class CLIPRCConfig(ZegCLIPConfig):
    """CLIP-RC's settings: ZegCLIP's (released VOC 15/5 values) plus the regions and recovery.

    Attributes:
        region_grid: (rows, columns) of image regions, one bridge token each (4 x 4).
        region_tokens: "trainable" (zegkit's default, see the module docstring) or "frozen" at
            the [CLS]-based initialisation, as in the released code.
        recovery_weight: weight of each L1 recovery term, queries and visual tokens (VOC 2,
            COCO-Stuff 50).
        mask_scale: "none": the released code's unscaled dot products of the decoder's
            post-LayerNorm tokens (logits of order sqrt(width) at initialisation, which AdamW
            needs hundreds of steps to shrink); "sqrt_dim": divided by sqrt(width), as in scaled
            dot-product attention (not the released code's; `clip-rc-synthetic` uses it, as
            the unscaled logits collapsed there, see zegkit.train.recipes).
    """

    region_grid: tuple[int, int] = (4, 4)
    region_tokens: str = "trainable"
    recovery_weight: float = 2.0
    mask_scale: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.region_grid = tuple(int(n) for n in self.region_grid)
        if len(self.region_grid) != 2 or min(self.region_grid) < 1:
            raise ValueError(f"region_grid must be two positive integers (rows, columns), got "
                             f"{self.region_grid}.")
        if self.region_tokens not in REGION_TOKEN_MODES:
            raise ValueError(f"region_tokens must be one of {REGION_TOKEN_MODES}, got "
                             f"{self.region_tokens!r}.")
        if self.mask_scale not in MASK_SCALES:
            raise ValueError(f"mask_scale must be one of {MASK_SCALES}, got {self.mask_scale!r}.")
        if self.recovery_weight < 0:
            raise ValueError(f"recovery_weight must be >= 0, got {self.recovery_weight}.")


def patch_regions(grid: tuple[int, int], region_grid: tuple[int, int]) -> Tensor:
    """The region index (h*w,) of every patch of `grid`, row-major, for a grid of regions
    splitting it into equal bands."""
    (h, w), (rows, columns) = grid, region_grid
    row = torch.arange(h) * rows // h
    column = torch.arange(w) * columns // w
    return (row[:, None] * columns + column[None, :]).flatten()


def region_attention_mask(num_prefix: int, grid: tuple[int, int],
                          region_grid: tuple[int, int]) -> Tensor:
    """Who may attend to whom (T, T) bool over [prefix | patches | region tokens]:
    prefix -> prefix and patches; patch -> prefix, patches and its region's token;
    region token -> itself and its region's patches."""
    regions = patch_regions(grid, region_grid)
    patches, count = regions.numel(), region_grid[0] * region_grid[1]
    total = num_prefix + patches + count
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[: num_prefix + patches, : num_prefix + patches] = True
    own = regions[:, None] == torch.arange(count)[None, :]  # (patches, regions)
    mask[num_prefix : num_prefix + patches, num_prefix + patches :] = own
    mask[num_prefix + patches :, num_prefix : num_prefix + patches] = own.T
    mask[num_prefix + patches :, num_prefix + patches :] = torch.eye(count, dtype=torch.bool)
    return mask


class TwoStreamLayer(nn.Module):
    """Queries attend to visual tokens and, from the same inputs, visual tokens attend to the
    queries (ZegCLIP's cross-attention layer in each direction)."""

    def __init__(self, dim: int, heads: int, ffn_ratio: int, dropout: float) -> None:
        super().__init__()
        self.queries = CrossAttentionLayer(dim, heads, ffn_ratio, dropout)
        self.visual = CrossAttentionLayer(dim, heads, ffn_ratio, dropout)
        nn.init.zeros_(self.visual.ffn[-1].weight)
        nn.init.zeros_(self.visual.ffn[-1].bias)

    def forward(self, queries: Tensor, visual: Tensor) -> tuple[Tensor, Tensor]:
        """queries (B, Q, dim), visual (B, N, dim) -> both updated."""
        updated, _ = self.queries(queries, visual)
        visual, _ = self.visual(visual, queries)
        return updated, visual


class RecoveryDecoder(nn.Module):
    """Reconstructs the query inputs (2D) and the patch embeddings (D) from decoded tokens."""

    def __init__(self, dim: int, embed_dim: int, heads: int, ffn_ratio: int,
                 dropout: float) -> None:
        super().__init__()
        self.queries_in = nn.Linear(dim, dim)
        self.visual_in = nn.Linear(dim, dim)
        self.layer = TwoStreamLayer(dim, heads, ffn_ratio, dropout)
        self.queries_out = nn.Linear(dim, 2 * embed_dim)
        self.visual_out = nn.Linear(dim, embed_dim)

    def forward(self, queries: Tensor, visual: Tensor) -> tuple[Tensor, Tensor]:
        queries, visual = self.layer(self.queries_in(queries), self.visual_in(visual))
        return self.queries_out(queries), self.visual_out(visual)


class CLIPRC(PromptedDecoderMethod):
    """CLIP-RC: region bridge tokens, region-aware queries, two-stream decoder, recovery loss."""

    description = ("CLIP-RC (trained): region-level bridge tokens + region-aware queries + "
                   "two-stream decoder, recovery loss; needs --checkpoint")

    def build_head(self, backbone: ClipBackbone, dim: int) -> None:
        config = self.config
        embeddings = backbone.vision.embeddings
        start = embeddings.class_embedding + embeddings.position_embedding.weight[0]
        count = config.region_grid[0] * config.region_grid[1]
        self.region_tokens = nn.Parameter(start.detach().clone().expand(count, -1).contiguous(),
                                          requires_grad=config.region_tokens == "trainable")
        self.query_proj = RelationshipDescriptor(backbone.embed_dim, dim)
        self.visual_proj = nn.Linear(3 * backbone.embed_dim, dim)
        self.decoder = nn.ModuleList(
            TwoStreamLayer(dim, config.decoder_heads, config.ffn_ratio, config.dropout)
            for _ in range(config.decoder_layers)
        )
        self.recovery = RecoveryDecoder(dim, backbone.embed_dim, config.decoder_heads,
                                        config.ffn_ratio, config.dropout)

    def region_injection(self, backbone: ClipBackbone, pixels: Tensor) -> TokenInjection:
        """The region tokens (through CLIP's ln_pre, as [CLS] is) and their attention mask."""
        num_prefix = backbone.num_prefix_tokens + self.config.prompt_tokens
        mask = region_attention_mask(num_prefix, backbone.grid_size(pixels),
                                     self.config.region_grid).to(pixels.device)
        tokens = backbone.vision.pre_layrnorm(self.region_tokens)
        return TokenInjection(suffix=tokens, suffix_layer=0, attention_mask=mask)

    def encode(self, backbone: ClipBackbone, pixels: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        """L2-normalised patch embeddings (B, N, D), global embedding (B, D), region embeddings
        (B, R, D) and the patch grid. The region tokens skip the prompt LayerNorm."""
        injection = self.injection(self.region_injection(backbone, pixels))
        out = backbone.forward_intermediates(pixels, indices=[], inject=injection)
        patches, global_embedding = self.joint_outputs(backbone, out)
        regions = F.normalize(backbone.project(out.suffix), dim=-1)
        return patches, global_embedding, regions, out.grid

    def decode(self, backbone: ClipBackbone, pixels: Tensor,
               text_rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        patches, global_embedding, regions, grid = self.encode(backbone, pixels)
        batch, count, dim = regions.shape
        classes = text_rows.shape[0]
        region_global = (regions + global_embedding[:, None]).reshape(batch * count, dim)
        query_inputs = self.query_proj.inputs(region_global, text_rows)  # (B*R, K, 2D)
        queries = self.query_proj.proj(query_inputs).reshape(batch, count * classes, -1)
        region_map = regions.transpose(1, 2).reshape(batch, dim, *self.config.region_grid)
        region_map = F.interpolate(region_map, size=grid, mode="bilinear", align_corners=False)
        visual = self.visual_proj(torch.cat([
            region_map.flatten(2).transpose(1, 2),
            global_embedding[:, None].expand_as(patches),
            patches,
        ], dim=-1))  # (B, N, dim)
        for layer in self.decoder:
            queries, visual = layer(queries, visual)
        logits = (queries @ visual.transpose(1, 2)).view(batch, count, classes, -1).mean(dim=1)
        if self.config.mask_scale == "sqrt_dim":
            logits = logits / queries.shape[-1] ** 0.5
        auxiliary = {}
        if self.training and self.config.recovery_weight:
            auxiliary["recovery"] = self.config.recovery_weight * self.recovery_loss(
                queries, visual, query_inputs.reshape(batch, count * classes, -1), patches)
        return logits.view(batch, classes, *grid), auxiliary

    def recovery_loss(self, queries: Tensor, visual: Tensor, query_inputs: Tensor,
                      patches: Tensor) -> Tensor:
        """L1 of the recovered query inputs plus L1 of the recovered patch embeddings (detached
        targets, mean over elements)."""
        recovered_queries, recovered_visual = self.recovery(queries, visual)
        return (F.l1_loss(recovered_queries, query_inputs.detach())
                + F.l1_loss(recovered_visual, patches.detach()))
