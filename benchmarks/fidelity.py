"""Max abs difference between zegkit's layer-by-layer forward (no surgery) and transformers' CLIP.

Random-weight CLIPs of ViT-B/16 and ViT-L/14 shape (full size, or tiny with --tiny), fp32, at the
native 224 input and at interpolated sizes: hidden states of every layer and image embeddings.

    python benchmarks/fidelity.py [--tiny]
"""

from __future__ import annotations

import argparse

import torch
from common import VIT_SHAPES, random_backbone

from zegkit.backbone import ClipBackbone

SIZES = [(224, 224), (336, 448)]


@torch.no_grad()
def max_differences(model: ClipBackbone, size: tuple[int, int]) -> tuple[float, float]:
    pixels = torch.randn(2, 3, *size)
    ours = model.forward_intermediates(pixels)
    theirs = model.model.vision_model(
        pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True
    )
    hidden = max(
        (torch.cat([p[:, None], t], 1) - ref).abs().max().item()
        for p, t, ref in zip(
            ours.intermediate_prefix, ours.intermediates, theirs.hidden_states[1:], strict=True
        )
    )
    reference = model.model.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True)
    embedding = (model.image_features(pixels) - reference.pooler_output).abs().max().item()
    return hidden, embedding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="width 48, 3 layers (fast)")
    args = parser.parse_args()
    print(f"{'shape':<10}{'input':>10}{'hidden states':>16}{'image embeds':>16}")
    for name, (patch, width, layers, heads, mlp) in VIT_SHAPES.items():
        if args.tiny:
            width, layers, heads, mlp = 48, 3, 4, 96
        model = random_backbone(patch, width, layers, heads, mlp)
        for size in SIZES:
            hidden, embedding = max_differences(model, size)
            print(f"{name:<10}{f'{size[0]}x{size[1]}':>10}{hidden:>16.2e}{embedding:>16.2e}")


if __name__ == "__main__":
    main()
