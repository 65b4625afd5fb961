"""Naive dense CLIP: the last layer's patch tokens projected into the joint space, no surgery.

The baseline every training-free method is measured against (MaskCLIP, arXiv 2112.01071, §3, shows
it fails: the last layer's patch tokens carry global, not local, semantics).
"""

from __future__ import annotations

from dataclasses import dataclass

from zegkit.backbone import BlockSurgery
from zegkit.methods.base import LastBlockMethod, MethodConfig


@dataclass
class NaiveConfig(MethodConfig):
    """No settings beyond the shared ones."""


class Naive(LastBlockMethod):
    description = "last-layer patch tokens projected into the joint space (no surgery; baseline)"

    def surgery(self) -> BlockSurgery | None:
        return None
