"""Cascade-CLIP (Li et al., ICML 2024, arXiv 2406.00670): cascaded alignment of multi-level CLIP
features with text.

ZegCLIP's prompted CLIP is split into stages; inside a stage the tapped blocks' patch tokens go
through the prompt LayerNorm, a LayerNorm and a projection of their own into the joint space, and
are summed with learnable weights initialised from a Gaussian over the distance to the stage's
deepest block ("Neighbourhood Gaussian Aggregation", NGA). Each stage, and the last block as its
own final stage, has an independent ATM decoder with its own relationship-descriptor projection;
the stages' mask logits are summed and ZegCLIP's loss is applied to the sum only.

Follows the released code (HVision-NKU/Cascade-CLIP @ dadf40d, shared/research/cascade_clip.md)
where the paper is silent: ViT-B/16 stages {6,7,8}, {9,10,11}, {12} (1-based blocks), NGA weights
exp(-(d-l)^2 / 2σ^2) with σ = 1, not renormalised, applied to the L2-normalised projected taps.

One deliberate deviation, with the released behaviour one setting away: the released code freezes
the per-tap LayerNorms and projections at their random initialisation (a side effect of its
name-based freeze rule: their names lack "prompt"). The paper presents these projections as the
map that aligns each level with the text, which a fixed random matrix cannot learn, so zegkit
trains them by default (`tap_projection="trainable"`); `tap_projection="frozen"` reproduces the
released model. `last_block` runs a training-free method's last-block surgery under the final
stage (e.g. "sclip"), the composition the framework makes possible; None is the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zegkit.backbone import BlockSurgery, ClipBackbone
from zegkit.methods.zegclip_base import PromptedDecoderMethod, RelationshipDescriptor, ZegCLIPConfig

TAP_PROJECTIONS = ("trainable", "frozen")
# ViT-B/16's stages in the released configs (`out_indices` 5..10, 0-based): blocks 6-8 and 9-11.
VIT_B_STAGES = ((5, 6, 7), (8, 9, 10))
VIT_B_LAYERS = 12


def scaled_stages(num_layers: int) -> tuple[tuple[int, ...], ...]:
    """ViT-B/16's released stages mapped onto a CLIP of `num_layers` blocks (the paper defines
    no others): each stage spans its blocks' relative depths, rounded, without the last block
    (the final stage) and without blocks an earlier stage took. 12 blocks: the released stages."""
    last, scale = num_layers - 1, (num_layers - 1) / (VIT_B_LAYERS - 1)
    stages, taken = [], -1
    for stage in VIT_B_STAGES:
        first, deepest = (int(block * scale + 0.5) for block in (stage[0], stage[-1]))
        blocks = tuple(range(max(first, taken + 1), min(deepest, last - 1) + 1))
        if blocks:
            stages.append(blocks)
            taken = blocks[-1]
    if not stages:
        raise ValueError(f"A {num_layers}-block CLIP has no block before its last one for an "
                         "intermediate stage; Cascade-CLIP needs at least 2 blocks.")
    return tuple(stages)


@dataclass
class CascadeCLIPConfig(ZegCLIPConfig):
    """Cascade-CLIP's settings: ZegCLIP's (released VOC 15/5 values) plus the cascade.

    Attributes:
        stages: the intermediate stages as 0-based block indices, shallow to deep; the last block
            is always the final stage. None (default): ViT-B/16's released stages, scaled to the
            backbone's depth at build (`scaled_stages`; the paper defines no other depth).
        nga_sigma: σ of the Gaussian that initialises the NGA weights (1).
        tap_projection: "trainable" (zegkit's default, see the module docstring) or "frozen" at
            the random initialisation, as in the released code.
        last_block: name of a training-free method whose last-block surgery the final stage
            runs (maskclip, sclip, clearclip, naclip); None: CLIP's block, as the paper.
        summed_stages: which stages' masks make the output (0-based, shallow to deep, the
            final stage last); None (default): all, as the paper. An analysis setting for a
            trained model, e.g. which stage carries the unseen classes (the paper's stage
            ablation); training always sums every stage.
    """

    stages: tuple[tuple[int, ...], ...] | None = None
    nga_sigma: float = 1.0
    tap_projection: str = "trainable"
    last_block: str | None = None
    summed_stages: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stages is not None:
            self.stages = checked_stages(self.stages)
        if self.tap_projection not in TAP_PROJECTIONS:
            raise ValueError(f"tap_projection must be one of {TAP_PROJECTIONS}, got "
                             f"{self.tap_projection!r}.")
        if self.nga_sigma <= 0:
            raise ValueError(f"nga_sigma must be positive, got {self.nga_sigma}.")
        if self.summed_stages is not None:
            self.summed_stages = tuple(int(stage) for stage in self.summed_stages)
            if not self.summed_stages:
                raise ValueError("summed_stages must name at least one stage (or be None: all).")


def checked_stages(stages) -> tuple[tuple[int, ...], ...]:
    """`stages` as tuples of ints; each non-empty, all blocks distinct and shallow to deep."""
    stages = tuple(tuple(int(block) for block in stage) for stage in stages)
    if not stages or any(not stage for stage in stages):
        raise ValueError(f"stages must be non-empty lists of block indices, got {stages}.")
    taps = [block for stage in stages for block in stage]
    if taps != sorted(set(taps)):
        raise ValueError(f"stages must list distinct blocks from shallow to deep, got {stages}.")
    return stages


def nga_init(depth: int, sigma: float) -> Tensor:
    """NGA's initial weights (depth,) for a stage's blocks, shallow to deep: exp(-(d-l)^2/2σ^2)
    for l = 1..d, so the deepest block starts at 1."""
    distance = torch.arange(depth - 1, -1, -1, dtype=torch.float32)
    return torch.exp(-distance**2 / (2 * sigma**2))


class TapProjection(nn.Module):
    """One tapped block into the joint space: its own LayerNorm and linear map (width -> D)."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)

    def forward(self, tokens: Tensor) -> Tensor:
        """L2-normalised joint-space tokens (B, N, D) of block tokens (B, N, width)."""
        return F.normalize(self.norm(tokens) @ self.proj, dim=-1)


class CascadeCLIP(PromptedDecoderMethod):
    """Cascade-CLIP: one decoder per stage of the prompted CLIP, the stage masks summed."""

    description = ("Cascade-CLIP (trained): NGA-aggregated stages of intermediate CLIP blocks, "
                   "one ZegCLIP decoder per stage, masks summed; needs --checkpoint")

    def build_head(self, backbone: ClipBackbone, dim: int) -> None:
        config = self.config
        if config.stages is None:  # resolved once, so the checkpoint records the stages used
            config.stages = scaled_stages(backbone.num_layers)
        last = backbone.num_layers - 1
        too_deep = [block for stage in config.stages for block in stage if block >= last]
        if too_deep or config.stages[0][0] < 0:
            raise ValueError(
                f"stages {config.stages} must index blocks 0..{last - 1} of this "
                f"{backbone.num_layers}-block CLIP (the last block is the final stage); set "
                "--set stages=... for this depth."
            )
        self.taps = nn.ModuleList(
            TapProjection(backbone.width, backbone.embed_dim)
            for stage in config.stages for _ in stage
        )
        self.taps.requires_grad_(config.tap_projection == "trainable")
        self.nga = nn.ParameterList(
            nn.Parameter(nga_init(len(stage), config.nga_sigma)) for stage in config.stages
        )
        stages = len(config.stages) + 1
        self.descriptors = nn.ModuleList(
            RelationshipDescriptor(backbone.embed_dim, dim) for _ in range(stages)
        )
        self.memory_proj = (
            nn.Identity() if dim == backbone.embed_dim else nn.Linear(backbone.embed_dim, dim)
        )
        self.decoders = nn.ModuleList(self.make_decoder(dim) for _ in range(stages))

    def _last_block_surgery(self) -> dict[int, BlockSurgery] | None:
        if self.config.last_block is None:
            return None
        from zegkit.methods import create_method  # the factory imports this module

        method = create_method(self.config.last_block)
        if not hasattr(method, "surgery"):
            raise ValueError(f"last_block must name a method that changes only the last block "
                             f"(maskclip, sclip, clearclip, naclip), got "
                             f"{self.config.last_block!r}.")
        surgery = method.surgery()
        return {-1: surgery} if surgery else None

    def stage_features(self, backbone: ClipBackbone, pixels: Tensor
                       ) -> tuple[list[Tensor], Tensor, tuple[int, int]]:
        """Per stage its joint-space patch features (B, N, D), shallow to deep with the last
        block's last; the global embedding (B, D); the patch grid."""
        blocks = [block for stage in self.config.stages for block in stage]
        out = backbone.forward_intermediates(pixels, indices=blocks, inject=self.injection(),
                                             surgery=self._last_block_surgery())
        taps = [tap(self.prompt_norm(tokens))
                for tap, tokens in zip(self.taps, out.intermediates, strict=True)]
        features, start = [], 0
        for stage, weights in zip(self.config.stages, self.nga, strict=True):
            stacked = torch.stack(taps[start : start + len(stage)])  # (d, B, N, D)
            features.append(torch.einsum("s,sbnd->bnd", weights.to(stacked.dtype), stacked))
            start += len(stage)
        patches, global_embedding = self.joint_outputs(backbone, out)
        return [*features, patches], global_embedding, out.grid

    def stage_logits(self, backbone: ClipBackbone, pixels: Tensor, text_rows: Tensor) -> Tensor:
        """Each stage's mask logits (S, B, Q, h, w); their sum is the method's logits."""
        features, global_embedding, grid = self.stage_features(backbone, pixels)
        heads = zip(self.decoders, self.descriptors, features, strict=True)
        logits = [
            decoder(descriptor(global_embedding, text_rows), self.memory_proj(memory))
            for decoder, descriptor, memory in heads
        ]
        stacked = torch.stack(logits)
        return stacked.view(*stacked.shape[:3], *grid)

    def decode(self, backbone: ClipBackbone, pixels: Tensor,
               text_rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.stage_logits(backbone, pixels, text_rows)
        chosen = self.config.summed_stages
        if chosen is not None and not self.training:
            stages = logits.shape[0]
            if any(not 0 <= stage < stages for stage in chosen):
                raise ValueError(f"summed_stages {chosen} must index this model's {stages} "
                                 f"stages (0..{stages - 1}, the final stage last).")
            logits = logits[list(chosen)]
        return logits.sum(dim=0), {}
