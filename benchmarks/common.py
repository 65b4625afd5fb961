"""Random-weight CLIP backbones of real shapes, for benchmarks that measure speed or fidelity.

Speed and numerical fidelity do not depend on the weights, and no pretrained weights can be
downloaded where CI runs, so the benchmarks build the real architectures with random weights.
The builder lives in `zegkit.bench` (which `zegkit bench` uses); the other benchmarks import it
from here.
"""

from __future__ import annotations

from zegkit.bench import VIT_SHAPES, random_backbone

__all__ = ["VIT_SHAPES", "random_backbone"]
