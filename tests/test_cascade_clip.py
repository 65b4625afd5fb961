"""Cascade-CLIP: NGA weights against the Gaussian written out, the stage aggregation against a
direct sum, frozen vs trainable tap projections, the summed stage masks and stage validation."""

import math

import pytest
import torch
from conftest import make_tiny_clip

from zegkit.backbone import ClipBackbone
from zegkit.methods import create_method
from zegkit.methods.cascade_clip import VIT_B_STAGES, nga_init, scaled_stages
from zegkit.text import encode_vocabulary


@pytest.fixture(scope="module")
def backbone(tiny_tokenizer):
    return ClipBackbone(make_tiny_clip(16), tiny_tokenizer, "tiny")


def _built(backbone, **settings):
    torch.manual_seed(0)
    method = create_method("cascade_clip", prompt_tokens=2, decoder_heads=2, dropout=0.0,
                           prompt_dropout=0.0, stages=((0, 1),), **settings)
    method.build(backbone)
    return method.eval()


def test_nga_init_is_the_gaussian_over_distance_to_the_deepest_block():
    sigma = 1.5
    expected = [math.exp(-((3 - block) ** 2) / (2 * sigma**2)) for block in (1, 2, 3)]
    assert nga_init(3, sigma).tolist() == pytest.approx(expected)
    assert nga_init(3, 1.0).tolist() == pytest.approx([0.1353, 0.6065, 1.0], abs=1e-4)


def test_default_stages_are_vit_b_stages_scaled_to_the_depth(backbone):
    assert scaled_stages(12) == VIT_B_STAGES
    assert scaled_stages(6) == ((2, 3), (4,))  # the proving-ground recipe's stages
    assert scaled_stages(24) == ((10, 11, 12, 13, 14, 15), (17, 18, 19, 20, 21))
    for depth in range(2, 40):
        taps = [block for stage in scaled_stages(depth) for block in stage]
        assert taps == sorted(set(taps)) and 0 <= taps[0] and taps[-1] < depth - 1
    with pytest.raises(ValueError, match="at least 2 blocks"):
        scaled_stages(1)
    method = create_method("cascade_clip", prompt_tokens=2, decoder_heads=2)
    method.build(backbone)  # the 3-block test CLIP
    assert method.config.stages == scaled_stages(backbone.num_layers) == ((1,),)


def test_stage_features_are_the_nga_weighted_sum_of_projected_taps(backbone):
    method = _built(backbone)
    with torch.no_grad():
        method.nga[0].copy_(torch.tensor([0.3, -2.0]))
    pixels = torch.randn(2, 3, 64, 48)
    features, _, grid = method.stage_features(backbone, pixels)
    out = backbone.forward_intermediates(pixels, indices=[0, 1], inject=method.injection())
    taps = [tap(method.prompt_norm(t)) for tap, t in zip(method.taps, out.intermediates,
                                                          strict=True)]
    torch.testing.assert_close(features[0], 0.3 * taps[0] - 2.0 * taps[1])
    patches, _ = method.joint_outputs(backbone, out)
    torch.testing.assert_close(features[1], patches)
    assert grid == (4, 3) and len(features) == 2


def test_logits_are_the_sum_of_the_stage_decoders(backbone):
    method = _built(backbone)
    text = encode_vocabulary(backbone, ["red", "green"], templates="single", use_cache=False)
    pixels = torch.randn(1, 3, 64, 64)
    stages = method.stage_logits(backbone, pixels, text.embeddings)
    assert stages.shape == (2, 1, 2, 4, 4)
    torch.testing.assert_close(method.mask_logits(backbone, pixels, text.embeddings),
                               stages.sum(dim=0))


def test_summed_stages_keeps_only_the_named_stage_masks_at_inference(backbone):
    method = _built(backbone)
    text = encode_vocabulary(backbone, ["red", "green"], templates="single", use_cache=False)
    pixels = torch.randn(1, 3, 64, 64)
    stages = method.stage_logits(backbone, pixels, text.embeddings)
    method.config.summed_stages = (1,)
    torch.testing.assert_close(method.mask_logits(backbone, pixels, text.embeddings), stages[1])
    method.config.summed_stages = (2,)
    with pytest.raises(ValueError, match="0..1"):
        method.mask_logits(backbone, pixels, text.embeddings)


def test_tap_projections_train_by_default_and_freeze_as_released(backbone):
    trainable = _built(backbone)
    frozen = _built(backbone, tap_projection="frozen")
    assert all(p.requires_grad for p in trainable.taps.parameters())
    assert not any(p.requires_grad for p in frozen.taps.parameters())
    assert set(frozen.state_dict()) == set(trainable.state_dict())  # frozen ones are saved too


def test_stages_must_fit_the_backbone(backbone):
    method = create_method("cascade_clip", stages=VIT_B_STAGES)  # blocks 5..10
    with pytest.raises(ValueError, match="--set stages"):
        method.build(backbone)
    with pytest.raises(ValueError, match="shallow to deep"):
        create_method("cascade_clip", stages=((1, 0),))


def test_last_block_takes_a_training_free_methods_surgery(backbone):
    plain = _built(backbone)
    composed = _built(backbone, last_block="sclip")
    pixels = torch.randn(1, 3, 64, 64)
    plain_features, _, _ = plain.stage_features(backbone, pixels)
    composed_features, _, _ = composed.stage_features(backbone, pixels)
    torch.testing.assert_close(plain_features[0], composed_features[0])  # taps: before it
    assert not torch.allclose(plain_features[1], composed_features[1])
    with pytest.raises(ValueError, match="last block"):
        _built(backbone, last_block="cliper").stage_features(backbone, pixels)
