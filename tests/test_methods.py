"""Each training-free method's last-block formula, checked against a direct computation."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip

from zegkit.backbone import ClipBackbone
from zegkit.methods import METHODS, create_method, list_methods

TOL = 1e-5


@pytest.fixture(scope="module")
def backbone(tiny_tokenizer):
    return ClipBackbone(make_tiny_clip(16), tiny_tokenizer, "tiny")


def _heads(x, linear, heads):
    batch, tokens, width = x.shape
    return linear(x).view(batch, tokens, heads, width // heads).transpose(1, 2)


def _softmax_scores(a, b):
    return (a @ b.transpose(-1, -2) / math.sqrt(a.shape[-1])).softmax(-1)


def _naclip_bias(grid, std):
    """Ω by explicit loops over patch pairs, [CLS] row and column zero."""
    h, w = grid
    omega = torch.zeros(1 + h * w, 1 + h * w)
    for i in range(h * w):
        for j in range(h * w):
            dy, dx = i // w - j // w, i % w - j % w
            omega[1 + i, 1 + j] = math.exp(-(dy * dy + dx * dx) / (2 * std * std))
    return omega


def _direct(backbone, pixels, kind, residual, ffn):
    """The paper's last block on the tiny model, written out from transformers' modules."""
    vision = backbone.model.vision_model
    with torch.no_grad():
        hidden = vision(
            pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True
        ).hidden_states[-2]
    layer = vision.encoder.layers[-1]
    y = layer.layer_norm1(hidden)
    heads = backbone.num_heads
    q, k, v = (
        _heads(y, p, heads)
        for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
    )
    grid = (pixels.shape[-2] // 16, pixels.shape[-1] // 16)
    if kind == "identity":
        mixed = v
    elif kind == "qq+kk":
        mixed = (_softmax_scores(q, q) + _softmax_scores(k, k)) @ v
    elif kind == "qq":
        mixed = _softmax_scores(q, q) @ v
    elif kind == "naclip":
        logits = k @ k.transpose(-1, -2) / math.sqrt(k.shape[-1]) + _naclip_bias(grid, 5.0)
        mixed = logits.softmax(-1) @ v
    else:
        mixed = _softmax_scores(q, k) @ v
    out = layer.self_attn.out_proj(mixed.transpose(1, 2).reshape(hidden.shape))
    x = hidden + out if residual else out
    if ffn:
        x = x + layer.mlp(layer.layer_norm2(x))
    tokens = backbone.model.visual_projection(vision.post_layernorm(x[:, 1:]))
    return F.normalize(tokens.transpose(1, 2).reshape(pixels.shape[0], -1, *grid), dim=1)


@pytest.mark.parametrize(
    "name, kind, residual, ffn",
    [
        ("naive", "vanilla", True, True),
        ("maskclip", "identity", True, True),
        ("sclip", "qq+kk", True, True),
        ("clearclip", "qq", False, False),
        ("naclip", "naclip", False, False),
    ],
)
def test_dense_features_follow_the_paper(backbone, name, kind, residual, ffn):
    pixels = torch.randn(2, 3, 224, 272)
    ours = create_method(name).dense_features(backbone, pixels)
    assert ours.shape == (2, backbone.embed_dim, 14, 17)
    assert (ours - _direct(backbone, pixels, kind, residual, ffn)).abs().max() <= TOL


def test_every_method_runs_without_nan(backbone):
    from zegkit.text import encode_vocabulary

    text = encode_vocabulary(
        backbone, ["dog; cat", "grass", "sky"], templates="single", use_cache=False
    )
    pixels = torch.randn(1, 3, 224, 224)
    for name in METHODS:
        method = create_method(name)
        method.build(backbone)  # trained methods: random init, enough to check shapes
        logits = method(backbone, pixels, text)
        assert logits.shape[0] == 1 and logits.shape[2:] == (14, 14)
        assert logits.shape[1] in (3, 4)  # one row per class or per synonym
        assert torch.isfinite(logits).all()
        if not method.trainable:
            assert logits.abs().max() <= 1 + 1e-5  # cosine similarities


def test_methods_have_no_parameters_before_build():
    for name in METHODS:
        assert not list(create_method(name).parameters()), name


def test_factory_errors_list_the_choices():
    with pytest.raises(ValueError, match="Unknown method 'sclipp'; available: .*sclip"):
        create_method("sclipp")
    with pytest.raises(ValueError, match="has no setting"):
        create_method("naclip", gaussian_sd=3)
    assert create_method("naclip", gaussian_std=3.0, logit_scale=None).config.gaussian_std == 3.0
    assert set(list_methods()) == set(METHODS) and all(list_methods().values())
