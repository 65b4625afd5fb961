"""Feature surgery, classifier and refinement are separable parts that compose."""

import pytest
import torch
from conftest import make_tiny_clip
from torch import nn

from zegkit.backbone import ClipBackbone
from zegkit.inference import InferenceConfig, resize
from zegkit.methods import METHODS, create_method
from zegkit.methods.base import cosine_logits
from zegkit.refine.pamr import PAMR
from zegkit.scores import DenseScores, class_probabilities
from zegkit.segmenter import Segmenter

CLASSES = ["dog; cat", "grass", "sky"]


@pytest.fixture(scope="module")
def backbone(tiny_tokenizer):
    return ClipBackbone(make_tiny_clip(16), tiny_tokenizer, "tiny")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_pamr_follows_any_method(backbone, name):
    """Segmenter(refine="pamr") equals PAMR applied by hand to the method's stitched scores."""
    method = create_method(name, compensation=False) if name == "cliper" else create_method(name)
    method.build(backbone)  # trained methods: random init
    config = InferenceConfig(short_side=None, mode="whole", refine="pamr", precision="fp32")
    segmenter = Segmenter(backbone, method, config, templates="single")
    text = segmenter.set_vocabulary(CLASSES)
    images = torch.rand(1, 3, 64, 80)
    with torch.no_grad():
        values = resize(method(backbone, method.normalize(backbone, images), text).float(),
                        (64, 80))
        scores = DenseScores(values, method.activation(), method.rows)
        expected = class_probabilities(PAMR()(images, scores), text)
    assert torch.allclose(segmenter.probabilities(images), expected, atol=1e-5)


def test_cliper_fusion_feeds_a_trained_decoder(backbone):
    """CLIPer's fused dense features as the input of a trainable head: gradients reach it only."""
    features = create_method("cliper", compensation=False).dense_features(
        backbone, torch.randn(2, 3, 224, 224)
    )
    decoder = nn.Conv2d(backbone.embed_dim, backbone.embed_dim, kernel_size=1)
    text = torch.nn.functional.normalize(torch.randn(3, backbone.embed_dim), dim=-1)
    logits = cosine_logits(decoder(features), text)
    logits.logsumexp(1).mean().backward()
    assert logits.shape == (2, 3, 14, 14)
    assert decoder.weight.grad is not None and decoder.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())
