"""MaskCLIP — "Extract Free Dense Labels from CLIP", Zhou, Loy, Dai, ECCV 2022 (arXiv 2112.01071).

Public code: chongzhou96/MaskCLIP (read via its mmseg twin volgachen/MaskCLIP @ 3e9f6db,
`mmseg/models/backbones/vit.py`, `decode_heads/maskclip_head.py`).
Change: the last block's attention is replaced by the value path alone (every token attends to
itself: out_proj(v)), keeping the block's residual and feed-forward paths as the released code does;
patch tokens then go through post-layernorm and the visual projection.
Not included: key smoothing and prompt denoising (off in the released ViT configs).
"""

from __future__ import annotations

from dataclasses import dataclass

from zegkit.backbone import BlockSurgery
from zegkit.methods.base import LastBlockMethod, MethodConfig


@dataclass
class MaskCLIPConfig(MethodConfig):
    """MaskCLIP settings.

    Attributes:
        residual: keep the last block's residual path (released code: True; ClearCLIP's
            re-implementation drops it).
        ffn: keep the last block's feed-forward path (released code: True).
    """

    residual: bool = True
    ffn: bool = True


class MaskCLIP(LastBlockMethod):
    description = "last block's attention replaced by its value path (Zhou et al., ECCV 2022)"

    def surgery(self) -> BlockSurgery:
        return BlockSurgery("identity", residual=self.config.residual, ffn=self.config.ffn)
