"""Regenerate the golden outputs of every method: `python tests/golden/make_golden.py`.

Each case builds a Segmenter with `load_segmenter` and runs `Segmenter.probabilities` on a seeded
tiny random CLIP and records a strided slice
of the class probabilities in `methods.json`. `tests/test_golden.py` compares against it, so a
refactor that changes any method's numbers fails. Regenerate only for a change you mean and
explain it in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import WORDS, make_tiny_clip  # noqa: E402

from zegkit.backbone import ClipBackbone  # noqa: E402
from zegkit.backbone.tokenizer import train_clip_tokenizer  # noqa: E402
from zegkit.segmenter import load_segmenter  # noqa: E402

GOLDEN_FILE = HERE / "methods.json"
CLASSES = ["dog; cat", "grass", "sky; cloud", "red star", "water"]
STEP = 16  # every 16th pixel of each axis goes into the slice
# 96: the images' own short side; fp32 pinned: the default "auto" is bf16 on some machines
INFERENCE = dict(short_side=96, crop=64, stride=32, precision="fp32")

# case name -> (method, method settings, inference settings beyond INFERENCE)
CASES: dict[str, tuple[str, dict, dict]] = {
    "naive": ("naive", {}, {}),
    "maskclip": ("maskclip", {}, {}),
    "sclip": ("sclip", {}, {}),
    "clearclip": ("clearclip", {}, {}),
    "naclip": ("naclip", {}, {}),
    "cliper-fusion-only": ("cliper", {"compensation": False}, {}),
    "clsclip-standin": ("clsclip_standin", {}, {}),
    "sclip-whole": ("sclip", {}, {"mode": "whole"}),
    "naclip-pamr": ("naclip", {}, {"refine": "pamr"}),
    "maskclip-logit-scale-70": ("maskclip", {"logit_scale": 70.0}, {}),
}


def golden_images() -> torch.Tensor:
    """Two 96 x 128 images in [0, 1]: smooth colour ramps with a bright square (seeded)."""
    generator = torch.Generator().manual_seed(7)
    images = torch.rand(2, 3, 12, 16, generator=generator)
    images = torch.nn.functional.interpolate(images, size=(96, 128), mode="bilinear")
    images[:, :, 30:60, 40:80] = torch.tensor([0.9, 0.2, 0.1])[:, None, None]
    return images.clamp(0, 1)


def golden_backbone() -> ClipBackbone:
    tokenizer = train_clip_tokenizer([WORDS] * 4, vocab_size=600)
    return ClipBackbone(make_tiny_clip(16, seed=0), tokenizer, "tiny-golden")


def run_case(backbone: ClipBackbone, name: str) -> torch.Tensor:
    """The strided probability slice (B, K, h, w) of one case."""
    method, method_settings, inference = CASES[name]
    segmenter = load_segmenter(
        method, backbone=backbone, **INFERENCE, **inference, **method_settings
    )
    segmenter.set_vocabulary(CLASSES, templates="single")
    return segmenter.probabilities(golden_images())[..., ::STEP, ::STEP]


def main() -> None:
    backbone = golden_backbone()
    golden = {}
    for name in CASES:
        values = run_case(backbone, name)
        golden[name] = {
            "shape": list(values.shape),
            "values": [float(f"{v:.7g}") for v in values.flatten().tolist()],
        }
        print(f"{name}: {tuple(values.shape)}, std {values.std():.3g}")
    GOLDEN_FILE.write_text(json.dumps(golden, indent=0) + "\n")
    print(f"wrote {GOLDEN_FILE}")


if __name__ == "__main__":
    main()
