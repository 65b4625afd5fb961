"""ZegCLIP and the methods on its parts (Cascade-CLIP, CLIP-RC): the decoder's mask is its last
layer's head-averaged pre-softmax score, the loss matches a direct computation, self-training
targets, the seen penalty; per method, a gradient in every trainable tensor and a
train-save-segment round trip through the one builder."""

import math

import pytest
import torch
from conftest import make_tiny_clip

from zegkit.backbone import ClipBackbone
from zegkit.data.base import IGNORE_INDEX
from zegkit.methods import create_method
from zegkit.methods.base import Batch
from zegkit.methods.checkpoint import save_method
from zegkit.methods.zegclip_base import (
    CrossAttentionLayer,
    nel_loss,
    seen_penalty_scores,
    self_training_labels,
    sigmoid_focal_loss,
)
from zegkit.segmenter import load_segmenter
from zegkit.text import encode_vocabulary

CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def backbone(tiny_tokenizer):
    return ClipBackbone(make_tiny_clip(16), tiny_tokenizer, "tiny")


def test_mask_is_head_averaged_pre_softmax_score():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(dim=16, heads=4, ffn_ratio=2, dropout=0.0).eval()
    queries, memory = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    _, logits = layer(queries, memory)
    q = layer.q(queries).view(2, 3, 4, 4)
    k = layer.k(memory).view(2, 5, 4, 4)
    expected = torch.einsum("bqhd,bnhd->bqn", q, k) / (4 * math.sqrt(4))
    torch.testing.assert_close(logits, expected)


def _direct_nel(logits, labels, classes, ignore):
    """Loop-by-loop NEL: focal mean per (image, class) map, dice on present maps, over #present."""
    focal_total, dice_total, present = 0.0, 0.0, 0
    for b in range(logits.shape[0]):
        valid = torch.ones_like(labels[b]).bool()
        if ignore == "ignore":
            valid = labels[b] != IGNORE_INDEX
        for q, c in enumerate(classes.tolist()):
            target = (labels[b] == c).float()
            x = logits[b, q][valid]
            t = target[valid]
            focal_total += sigmoid_focal_loss(x, t, 0.25, 2.0).mean()
            if t.sum() > 0:
                p = x.sigmoid()
                dice_total += 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
                present += 1
    return focal_total / present, dice_total / present


@pytest.mark.parametrize("ignore", ["negative", "ignore"])
def test_nel_loss_matches_direct_computation(ignore):
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 6, 7)
    labels = torch.randint(0, 3, (2, 6, 7))
    labels[0, :2] = IGNORE_INDEX
    classes = torch.tensor([0, 2])
    terms = nel_loss(logits, labels, classes, focal_weight=100.0, dice_weight=1.0, alpha=0.25,
                     gamma=2.0, ignore=ignore)
    focal, dice = _direct_nel(logits, labels, classes, ignore)
    torch.testing.assert_close(terms["focal"], focal)
    torch.testing.assert_close(terms["dice"], dice)
    torch.testing.assert_close(terms["loss"], 100 * focal + dice)


def test_self_training_labels_replace_only_unseen_pixels():
    seen = torch.tensor([True, False, False])
    labels = torch.tensor([[[0, 1, 2, IGNORE_INDEX]]])
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 2] = 1.0  # the model prefers unseen class 2 everywhere
    assert self_training_labels(logits, labels, seen).tolist() == [[[0, 2, 2, IGNORE_INDEX]]]


def test_seen_penalty_lowers_only_seen_classes(backbone):
    text = encode_vocabulary(backbone, CLASSES, templates="single", use_cache=False)
    logits = torch.zeros(1, 3, 2, 2)
    scores = seen_penalty_scores(logits, text, ("red", "blue"), 0.1)
    assert scores[0, :, 0, 0].tolist() == pytest.approx([0.4, 0.5, 0.4])


def _batch(backbone, method):
    images = torch.zeros(2, 3, 64, 64)
    images[:, 0, :, :32] = 1.0  # red left half
    images[:, 1, :, 32:] = 1.0  # green right half
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, :, 32:] = 1
    return Batch(method.normalize(backbone, images), labels, torch.tensor([True, True, False]))


# The tiny test CLIP has 3 blocks: Cascade-CLIP gets one two-block stage and the final block.
# (lr, steps) of the few-step run. CLIP-RC diverges at the others' lr 1e-2 (one class everywhere);
# at 1e-3 its two halves' logits part by ~0.006 after 30 steps and ~0.75 after 100.
SCHEDULES = {"zegclip": (1e-2, 30), "cascade_clip": (1e-2, 30), "clip_rc": (1e-3, 100)}
FAMILY = {
    "zegclip": {},
    "cascade_clip": {"stages": ((0, 1),)},
    "clip_rc": {"region_grid": (2, 2)},
}


def _family_member(name, backbone, **settings):
    torch.manual_seed(0)
    method = create_method(name, prompt_tokens=2, decoder_heads=2, dropout=0.0,
                           prompt_dropout=0.0, seen_classes=("red", "green"),
                           **FAMILY[name], **settings)
    method.build(backbone)
    return method


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_every_trainable_tensor_gets_a_gradient(name, backbone):
    method = _family_member(name, backbone)
    text = encode_vocabulary(backbone, CLASSES, templates="single", use_cache=False)
    batch = _batch(backbone, method)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=1e-2)
    for _ in range(2):  # after one step, layers behind zero-initialised ones (CLIP-RC) get one
        optimizer.zero_grad()
        method.loss(backbone, batch, text)["loss"].backward()
        optimizer.step()
    missing = [n for n, p in method.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []
    assert all(p.grad is None for p in backbone.parameters())
    method.eval()
    scores = method(backbone, batch.pixels, text)
    assert scores.shape == (2, 3, 4, 4)
    assert ((scores >= -0.1) & (scores <= 1)).all()


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_trains_saves_and_segments_through_the_builder(name, backbone, tmp_path):
    method = _family_member(name, backbone)
    text = encode_vocabulary(backbone, CLASSES, templates=method.default_templates(),
                             use_cache=False)
    batch = _batch(backbone, method)
    lr, steps = SCHEDULES[name]
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        terms = method.loss(backbone, batch, text)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert losses[-1] < 0.5 * losses[0]

    path = save_method(method.eval(), tmp_path / f"{name}.safetensors", backbone)
    segmenter = load_segmenter(name, backbone=backbone, checkpoint=path)
    assert segmenter.templates == "zegclip-single"
    reloaded = segmenter.method.state_dict()
    assert all(torch.equal(reloaded[key], value) for key, value in method.state_dict().items())
    segmenter.set_vocabulary(CLASSES[:2])
    images = torch.zeros(1, 3, 64, 64)
    images[:, 0, :, :32] = 1.0
    images[:, 1, :, 32:] = 1.0
    labels = segmenter.predict(images)[0]
    assert (labels[:, :24] == 0).float().mean() > 0.9
    assert (labels[:, 40:] == 1).float().mean() > 0.9


def test_builder_refuses_zegclip_without_checkpoint(backbone):
    with pytest.raises(ValueError, match="--checkpoint"):
        load_segmenter("zegclip", backbone=backbone)


def test_loss_sees_only_seen_queries(backbone):
    method = create_method("zegclip", prompt_tokens=1, decoder_heads=2)
    method.build(backbone)
    text = encode_vocabulary(backbone, CLASSES, templates="single", use_cache=False)
    batch = _batch(backbone, method)
    calls = []
    original = method.decode

    def spy(backbone, pixels, rows):
        calls.append(rows.shape[0])
        return original(backbone, pixels, rows)

    method.decode = spy
    method.loss(backbone, batch, text)
    method.config.self_training = True
    method.loss(backbone, batch, text)
    assert calls == [2, 3]
