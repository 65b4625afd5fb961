"""The frozen CLIP backbone: weight loading and the layer-by-layer forward methods edit."""

from __future__ import annotations

import os

import torch

from zegkit.backbone.attention import ATTENTION, BlockSurgery, attention_weights
from zegkit.backbone.vision import ClipBackbone, Intermediates, TokenInjection, take_indices

DEFAULT_MODEL = "openai/clip-vit-base-patch16"


def load_clip(
    source: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    tokenizer_source: str | None = None,
) -> ClipBackbone:
    """Load a CLIP model as a frozen ClipBackbone.

    Args:
        source: a Hugging Face hub id, a local directory in HF format, an OpenAI/open_clip
            checkpoint file, or a short name shipped with zegkit (e.g. "zegkit/tiny-synthetic").
        device: where the weights live.
        tokenizer_source: where the tokenizer comes from when `source` is a bare checkpoint file.

    Raises:
        FileNotFoundError / RuntimeError / ValueError: see `load_clip_model`; each names what is
            missing and how to get it.
    """
    from zegkit.backbone.loading import load_clip_model

    model, tokenizer, name = load_clip_model(source, tokenizer_source=tokenizer_source)
    return ClipBackbone(model, tokenizer, name).to(device)


__all__ = [
    "ATTENTION",
    "DEFAULT_MODEL",
    "BlockSurgery",
    "ClipBackbone",
    "Intermediates",
    "TokenInjection",
    "attention_weights",
    "load_clip",
    "take_indices",
]
