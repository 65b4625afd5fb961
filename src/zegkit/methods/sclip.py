"""SCLIP — "SCLIP: Rethinking Self-Attention for Dense Vision-Language Inference", Wang, Mei,
Yuille, ECCV 2024 (arXiv 2312.01597).

Public code: wangf3014/SCLIP @ 961a11a (`clip/model.py::VisionTransformer.forward`, `custom_attn`).
Change: the last block's attention becomes correlative self-attention,
softmax(q·qᵀ/√d) + softmax(k·kᵀ/√d) (a sum of two softmaxes), reusing the block's projections;
the residual and feed-forward paths stay, as in the released code.
Not included: SCLIP's VOC21-only `area_thd` post-processing (a dataset-specific heuristic).
"""

from __future__ import annotations

from dataclasses import dataclass

from zegkit.backbone import BlockSurgery
from zegkit.methods.base import LastBlockMethod, MethodConfig


@dataclass
class SCLIPConfig(MethodConfig):
    """SCLIP settings (logit_scale: the released default 40; its VOC21 config uses 65)."""


class SCLIP(LastBlockMethod):
    description = "correlative self-attention (q-q + k-k) in the last block (Wang et al., ECCV 24)"

    def surgery(self) -> BlockSurgery:
        return BlockSurgery("qq+kk", residual=True, ffn=True)
