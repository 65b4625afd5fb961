"""ClearCLIP — "ClearCLIP: Decomposing CLIP Representations for Dense Vision-Language Inference",
Lan et al., ECCV 2024 (arXiv 2407.12442).

Public code: mc-lan/ClearCLIP @ afe06b8 (`open_clip/transformer.py::VisionTransformer.forward`,
`custom_attn`).
Change, the paper's three modifications to the final layer: self-self (query-query) attention,
no residual connection, no feed-forward network. The stored `configs/base_config.py` uses q-k
attention with the residual removed; the paper (and `demo.py`) use q-q, which we follow.
"""

from __future__ import annotations

from dataclasses import dataclass

from zegkit.backbone import BlockSurgery
from zegkit.methods.base import LastBlockMethod, MethodConfig


@dataclass
class ClearCLIPConfig(MethodConfig):
    """ClearCLIP settings (logit_scale: the released configs' 50)."""

    logit_scale: float = 50.0


class ClearCLIP(LastBlockMethod):
    description = "last block with q-q attention, no residual, no FFN (Lan et al., ECCV 2024)"

    def surgery(self) -> BlockSurgery:
        return BlockSurgery("qq", residual=False, ffn=False)
