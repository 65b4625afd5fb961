"""Random-weight CLIP backbones of real shapes, for benchmarks that measure speed or fidelity.

Speed and numerical fidelity do not depend on the weights, and no pretrained weights can be
downloaded where CI runs, so the benchmarks build the real architectures with random weights.
"""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel

from zegkit.backbone import ClipBackbone
from zegkit.backbone.tokenizer import train_clip_tokenizer

# name: (patch, width, layers, heads, mlp) of OpenAI's vision towers
VIT_SHAPES = {
    "ViT-B/16": (16, 768, 12, 12, 3072),
    "ViT-L/14": (14, 1024, 24, 16, 4096),
}
TOKENIZER_WORDS = "a photo of the person dog grass sky road car tree building water wall"


def random_backbone(
    patch: int, width: int, layers: int, heads: int, mlp: int, projection: int = 512
) -> ClipBackbone:
    """A CLIP with the given vision shape, ViT-B's text tower and random (seeded) weights."""
    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config=dict(
            hidden_size=width,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            patch_size=patch,
            image_size=224,
        ),
        text_config=dict(vocab_size=1000, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        projection_dim=projection,
    )
    tokenizer = train_clip_tokenizer([TOKENIZER_WORDS] * 4, vocab_size=1000)
    return ClipBackbone(CLIPModel(config), tokenizer, f"random-{patch}-{width}x{layers}")
