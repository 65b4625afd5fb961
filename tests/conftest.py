"""Shared fixtures: tiny random-weight CLIP models in the real on-disk formats. No network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

from zegkit.backbone.tokenizer import train_clip_tokenizer  # noqa: E402

WORDS = (
    "a photo of the person people man dog cat grass sky tree road car red blue green star ring "
    "brick water sand cloud building background wall floor small large bright dark"
)


def tiny_clip_config(
    patch_size: int = 16, image_size: int = 224, layers: int = 3, vocab_size: int = 600
) -> CLIPConfig:
    """A CLIP config with the shape of ViT-B/16 (or L/14 with patch_size=14) but tiny widths."""
    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=layers,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch_size,
        ),
        projection_dim=24,
    )


@pytest.fixture(autouse=True, scope="session")
def _private_text_cache(tmp_path_factory):
    """Keep the text-embedding disk cache of the test session out of the user's home."""
    os.environ["ZEGKIT_CACHE"] = str(tmp_path_factory.mktemp("zegkit-cache"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_clip_tokenizer([WORDS] * 4, vocab_size=600)


def make_tiny_clip(patch_size: int = 16, seed: int = 0, layers: int = 3) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config(patch_size=patch_size, layers=layers)).eval()


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, tiny_tokenizer):
    """A ViT-B/16-shaped tiny CLIP saved as a Hugging Face directory (weights + tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-clip-b16")
    make_tiny_clip(16).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_l14_dir(tmp_path_factory, tiny_tokenizer):
    """A ViT-L/14-shaped tiny CLIP saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny-clip-l14")
    make_tiny_clip(14, seed=1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
