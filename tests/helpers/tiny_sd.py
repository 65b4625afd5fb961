"""A tiny random-weight Stable Diffusion for offline tests and benchmarks of the diffusion refiner.

Like the hub's tiny random test models, it exercises the real loading and attention paths offline;
its attention carries no learned structure. Needs the optional dependency `diffusers`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

# up_blocks[1] of the tiny UNet works on the full latent grid (the tiny VAE halves the image).
TINY_LAYERS = (
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
)
TINY_HEADS = 4
TINY_CROSS_DIM = 32


def tiny_unet(seed: int = 0) -> nn.Module:
    """A two-level UNet2DConditionModel with random weights (8/16 channels, 4 heads)."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_CROSS_DIM,
        attention_head_dim=TINY_HEADS,
        norm_num_groups=4,
    ).eval()


def tiny_vae(seed: int = 1) -> nn.Module:
    """A two-level AutoencoderKL with random weights (downsamples by 2)."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()


def save_tiny_random_pipeline(path: str | os.PathLike, tokenizer, seed: int = 0) -> Path:
    """Save a tiny random-weight Stable Diffusion in diffusers' layout (unet/, vae/, scheduler/,
    text_encoder/, tokenizer/), as a downloaded SD model is laid out.

    Args:
        path: the folder to create.
        tokenizer: a CLIP tokenizer for the prompt (e.g. the CLIP backbone's).
        seed: seeds every component.

    Returns:
        ``path``, to pass as the refiner's `model`.
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    tiny_unet(seed).save_pretrained(path / "unet")
    tiny_vae(seed + 1).save_pretrained(path / "vae")
    diffusers.DDPMScheduler().save_pretrained(path / "scheduler")
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_CROSS_DIM,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    CLIPTextModel(text_config).save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")
    return path
