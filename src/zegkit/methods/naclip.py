"""NACLIP — "Pay Attention to Your Neighbours: Training-Free Open-Vocabulary Semantic
Segmentation", Hajimiri, Ben Ayed, Dolz, WACV 2025 (arXiv 2404.08181).

Public code: sinahmr/NACLIP @ defb7c9 (`clip/model.py::custom_attn`, `gaussian_window`).
Change: the last block attends with key-key similarity plus a Gaussian neighbourhood bias added to
the logits, softmax(k·kᵀ/√d + Ω) with Ω = exp(-|p - p'|²/2σ²) over patch positions (zero for
[CLS]), and drops its residual and feed-forward paths ("reduced architecture").
"""

from __future__ import annotations

from dataclasses import dataclass

from zegkit.backbone import BlockSurgery
from zegkit.methods.base import LastBlockMethod, MethodConfig


@dataclass
class NACLIPConfig(MethodConfig):
    """NACLIP settings.

    Attributes:
        gaussian_std: σ of the neighbourhood Gaussian, in patches (paper default 5).
        reduced: drop the last block's residual and feed-forward paths (paper default True).
    """

    gaussian_std: float = 5.0
    reduced: bool = True


class NACLIP(LastBlockMethod):
    description = "key-key attention + Gaussian neighbour bias, reduced last block (WACV 2025)"

    def surgery(self) -> BlockSurgery:
        keep = not self.config.reduced
        return BlockSurgery(
            "gaussian_kk", residual=keep, ffn=keep, options={"std": self.config.gaussian_std}
        )
