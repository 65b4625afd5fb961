"""The method protocol and the mechanics the training-free methods share.

A method turns normalised crops into dense logits over the vocabulary's text rows. Most methods do
it in two separable steps, so a method's feature surgery can feed another classifier or decoder:
`dense_features` (B, D, h, w) in the joint space, then cosine similarity with the text embeddings.
Methods whose visual pass depends on the text (e.g. ClsCLIP) override `forward` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zegkit.backbone import BlockSurgery, ClipBackbone
from zegkit.text import TextEmbeddings


def token_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Reshape patch tokens (B, h*w, D) into an L2-normalised feature map (B, D, h, w)."""
    batch, _, dim = tokens.shape
    features = tokens.transpose(1, 2).reshape(batch, dim, *grid)
    return F.normalize(features, dim=1)


def cosine_logits(features: Tensor, text: Tensor) -> Tensor:
    """Cosine similarities (B, Q, h, w) of normalised features (B, D, h, w) and text rows (Q, D)."""
    return (F.normalize(features, dim=1).permute(0, 2, 3, 1) @ text.to(features.dtype).T).permute(
        0, 3, 1, 2
    )


@dataclass
class MethodConfig:
    """Settings every method has.

    Attributes:
        logit_scale: temperature applied to cosine logits before the softmax over the vocabulary;
            each method's default is its paper's (inference settings may override it).
    """

    logit_scale: float = 40.0


class Method(nn.Module):
    """A zero-shot segmentation method: normalised crops + text embeddings -> dense logits.

    Subclasses set `description` (one line for `zegkit methods`) and implement `dense_features`,
    or override `forward` when their visual pass needs the text.
    """

    description: str = ""

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        self.config = config

    def dense_features(self, backbone: ClipBackbone, pixels: Tensor) -> Tensor:
        """L2-normalised dense features (B, D, h, w) in the joint image-text space."""
        raise NotImplementedError(f"{type(self).__name__} has no text-independent dense features.")

    def forward(self, backbone: ClipBackbone, pixels: Tensor, text: TextEmbeddings) -> Tensor:
        """Cosine logits (B, Q, h, w) of crops `pixels` (B, 3, H, W) against the text rows."""
        return cosine_logits(self.dense_features(backbone, pixels), text.classifier)

    def build_refiner(self, device: str | torch.device = "cpu") -> nn.Module | None:
        """A refinement step the method itself prescribes, applied to the class probabilities
        of whole images as `refiner(images in [0, 1], probabilities)`; None when it has none."""
        return None


class LastBlockMethod(Method):
    """Methods that change only the last vision block, then project patch tokens (MaskCLIP family).

    Subclasses implement `surgery()`: the last block's attention variant and kept paths (None
    leaves the block as CLIP has it).
    """

    def surgery(self) -> BlockSurgery | None:
        raise NotImplementedError

    def dense_features(self, backbone: ClipBackbone, pixels: Tensor) -> Tensor:
        surgery = self.surgery()
        out = backbone.forward_intermediates(
            pixels, indices=[], surgery={-1: surgery} if surgery else None
        )
        return token_map(backbone.project(out.tokens), out.grid)
