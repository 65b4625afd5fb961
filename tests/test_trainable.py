"""The trained-method contract: a toy method (one deep prompt token + a linear head on projected
patch tokens) trains through the public contract, saves, loads, and refuses the wrong loader."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip
from torch import nn

from zegkit.backbone import ClipBackbone, TokenInjection
from zegkit.data.base import IGNORE_INDEX
from zegkit.methods import METHODS, create_method
from zegkit.methods.base import Batch, Method, MethodConfig
from zegkit.methods.checkpoint import load_method, read_header, save_method
from zegkit.scores import Activation
from zegkit.text import encode_vocabulary

CLASSES = ["red", "blue"]


@dataclass
class ToyConfig(MethodConfig):
    """Toy settings: prompt tokens and the softmax temperature of the head's cosines."""

    prompts: int = 1
    logit_scale: float = 10.0


class Toy(Method):
    description = "test-only: deep prompt tokens + a linear head on projected patch tokens"
    rows = "classes"

    def build(self, backbone: ClipBackbone) -> None:
        self.prompt = nn.Parameter(torch.zeros(self.config.prompts, backbone.width))
        self.head = nn.Linear(backbone.embed_dim, backbone.embed_dim)

    def forward(self, backbone, pixels, text):
        out = backbone.forward_intermediates(
            pixels, indices=[], inject=TokenInjection(prompts={0: self.prompt})
        )
        features = F.normalize(self.head(backbone.project(out.tokens)), dim=-1)  # (B, h*w, D)
        logits = features @ text.embeddings.to(features.dtype).T  # (B, h*w, K)
        return logits.transpose(1, 2).reshape(pixels.shape[0], -1, *out.grid)

    def activation(self) -> Activation:
        return Activation("softmax", self.config.logit_scale)

    def loss(self, backbone, batch, text):
        logits = self(backbone, batch.pixels, text) * self.config.logit_scale
        logits = F.interpolate(logits, size=batch.labels.shape[-2:], mode="bilinear")
        return {"loss": F.cross_entropy(logits, batch.labels, ignore_index=IGNORE_INDEX)}


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", (ToyConfig, Toy))


@pytest.fixture(scope="module")
def backbone(tiny_tokenizer):
    return ClipBackbone(make_tiny_clip(16), tiny_tokenizer, "tiny")


def _batch(backbone):
    """Left half red (class 0), right half blue (class 1); the border is ignored."""
    images = torch.zeros(2, 3, 64, 64)
    images[:, 0, :, :32] = 1.0
    images[:, 2, :, 32:] = 1.0
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, :, 32:] = 1
    labels[:, :2] = IGNORE_INDEX
    return Batch(backbone.normalize(images), labels)


def test_toy_method_trains_saves_and_loads(registered, backbone, tmp_path):
    torch.manual_seed(0)
    method = create_method("toy")
    method.build(backbone)
    assert method.trainable
    text = encode_vocabulary(backbone, CLASSES, templates="single")
    batch = _batch(backbone)
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = method.loss(backbone, batch, text)["loss"]
        optimizer.zero_grad()
        loss.backward()
        assert method.prompt.grad is not None and method.prompt.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in backbone.parameters())

    path = save_method(method, tmp_path / "toy.safetensors", backbone)
    assert read_header(path)["method"] == "toy"
    loaded = load_method(path, backbone, method="toy")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(backbone, batch.pixels, text), method(backbone, batch.pixels, text)
        )
    assert sorted(loaded.state_dict()) == ["head.bias", "head.weight", "prompt"]


def test_loading_refuses_another_method_or_backbone(registered, backbone, tmp_path, tiny_tokenizer):
    method = create_method("toy", prompts=2)
    method.build(backbone)
    path = save_method(method, tmp_path / "toy.safetensors", backbone)
    with pytest.raises(RuntimeError, match="checkpoint of method 'toy', not 'sclip'"):
        load_method(path, backbone, method="sclip")
    other = ClipBackbone(make_tiny_clip(16, seed=5), tiny_tokenizer, "other-tiny")
    with pytest.raises(RuntimeError, match="trained on backbone 'tiny'.*'other-tiny'"):
        load_method(path, other)
    assert load_method(path, backbone).prompt.shape == (2, backbone.width)


def test_not_a_method_checkpoint(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(RuntimeError, match="not a zegkit method checkpoint"):
        read_header(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="No method checkpoint"):
        read_header(tmp_path / "missing.safetensors")


def test_training_free_methods_have_no_loss(backbone):
    method = create_method("sclip")
    assert not method.trainable
    with pytest.raises(NotImplementedError, match="training-free"):
        method.loss(backbone, _batch(backbone), None)
