"""PACL: the chunked compatibility and loss against direct computations, the embedder's start,
what trains, checkpoint + segment + classify, and exact resume of a caption run after SIGKILL."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip
from PIL import Image
from test_train import _env, _reached, _tensors, _zegkit

from zegkit.backbone import ClipBackbone
from zegkit.methods import create_method
from zegkit.methods.base import Batch, CaptionBatch
from zegkit.methods.checkpoint import save_method
from zegkit.methods.pacl import (
    compatibility,
    contrastive_loss,
    own_caption_compatibility,
)
from zegkit.segmenter import load_segmenter


def _unit(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def _direct_phi(patches: torch.Tensor, text: torch.Tensor, temperature: float,
                pooling: str) -> torch.Tensor:
    """φ by the paper's definition, one (image, caption) pair at a time."""
    rows = []
    for image in patches:  # (n, D)
        row = []
        for caption in text:  # (D,)
            similarity = image @ caption  # s_i, (n,)
            weights = torch.softmax(similarity / temperature, dim=0)  # a_i
            pooled = (weights[:, None] * image).sum(dim=0)
            if pooling == "cosine":
                row.append(F.cosine_similarity(pooled, caption, dim=0))
            else:
                row.append((weights * similarity).sum())
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("pooling", ["cosine", "mean_similarity"])
@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_chunked_compatibility_equals_the_direct_definition(pooling, chunk_size):
    patches, text = _unit(5, 7, 4, seed=0), _unit(6, 4, seed=1)
    expected = _direct_phi(patches, text, 0.3, pooling)
    got = compatibility(patches, text, temperature=0.3, pooling=pooling, chunk_size=chunk_size)
    torch.testing.assert_close(got, expected)
    # the weights depend on the caption scored: pooling every image with one caption's weights
    # gives other values
    one_caption = _direct_phi(patches, text[:1], 0.3, pooling)
    assert not torch.allclose(one_caption.expand(-1, 6), expected)


def test_gradients_through_the_checkpointed_chunks_equal_the_direct_ones():
    patches, text = _unit(6, 5, 4, seed=2), _unit(6, 4, seed=3)
    chunked = patches.clone().requires_grad_(True)
    direct = patches.clone().requires_grad_(True)
    contrastive_loss(10 * compatibility(chunked, text, temperature=0.5, chunk_size=4)).backward()
    contrastive_loss(10 * _direct_phi(direct, text, 0.5, "cosine")).backward()
    torch.testing.assert_close(chunked.grad, direct.grad)


def test_own_caption_surrogate_pools_each_image_with_its_own_caption():
    patches, text = _unit(4, 6, 3, seed=4), _unit(4, 3, seed=5)
    got = own_caption_compatibility(patches, text, text, temperature=0.2)
    for j in range(4):
        weights = torch.softmax(patches[j] @ text[j] / 0.2, dim=0)
        pooled = F.normalize((weights[:, None] * patches[j]).sum(0), dim=0)
        torch.testing.assert_close(got[j], text @ pooled)


def test_contrastive_loss_is_clips_symmetric_infonce():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [0.0, -0.2, 0.9]])
    rows = -torch.log_softmax(logits, dim=1).diagonal().mean()
    columns = -torch.log_softmax(logits, dim=0).diagonal().mean()
    torch.testing.assert_close(contrastive_loss(logits), (rows + columns) / 2)


@pytest.fixture(scope="module")
def backbone(tiny_tokenizer):
    return ClipBackbone(make_tiny_clip(16), tiny_tokenizer, "tiny")


def _pixels(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_loss_equals_a_direct_computation_on_the_tiny_clip(backbone):
    method = create_method("pacl", patch_temperature=0.5, chunk_size=2)
    method.build(backbone)
    torch.nn.init.normal_(method.embedder.out.weight, std=0.1)  # a non-trivial main branch
    captions = ["a red star", "grass and sky", "two rings on sand"]
    pixels = _pixels(3)
    terms = method.loss(backbone, CaptionBatch(pixels, captions))
    tokens = backbone.forward_intermediates(pixels, indices=[]).tokens
    tokens = backbone.vision.post_layernorm(tokens)
    patches = F.normalize(method.embedder(tokens), dim=-1).double()
    text = F.normalize(backbone.encode_text(captions), dim=-1).double()
    scale = backbone.model.logit_scale.exp().item()
    expected = contrastive_loss(scale * _direct_phi(patches, text, 0.5, "cosine"))
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(TypeError, match="CaptionBatch"):
        method.loss(backbone, Batch(pixels, torch.zeros(3, 64, 64, dtype=torch.long)))


def test_only_the_embedder_trains_and_it_starts_as_naive_dense_clip(backbone):
    method = create_method("pacl")
    method.build(backbone)
    names = {name for name, p in method.named_parameters() if p.requires_grad}
    assert names == {"embedder.skip.weight", "embedder.hidden.weight", "embedder.hidden.bias",
                     "embedder.out.weight", "embedder.out.bias"}
    naive = create_method("naive")
    pixels = _pixels(2, seed=1)
    torch.testing.assert_close(method.dense_features(backbone, pixels),
                               naive.dense_features(backbone, pixels))
    terms = method.loss(backbone, CaptionBatch(pixels, ["a star", "a ring"]))
    terms["loss"].backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert method.embedder.out.weight.grad.abs().sum() > 0  # the zero-initialised branch learns


def test_checkpoint_segments_and_classifies(backbone, tiny_clip_dir, tmp_path):
    from zegkit.backbone import load_clip
    from zegkit.classify import classify

    loaded = load_clip(tiny_clip_dir)
    method = create_method("pacl")
    method.build(loaded)
    torch.nn.init.normal_(method.embedder.out.weight, std=0.1)
    path = save_method(method, tmp_path / "pacl.safetensors", loaded)
    segmenter = load_segmenter("pacl", backbone=loaded, checkpoint=path, crop=64, stride=32,
                               short_side=64)
    image = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    result = segmenter.segment(image, classes=["star", "ring", "grass"])
    assert result.labels.shape == (70, 90)
    scores = classify(segmenter, [image, image[:40]], classes=["star", "ring", "grass"])
    assert [len(r.scores) for r in scores] == [3, 3]
    assert scores[0].probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="trained"):
        load_segmenter("pacl", backbone=loaded)


def test_classify_command_prints_and_saves(tiny_clip_dir, tmp_path):
    from zegkit.cli import main

    image = tmp_path / "scene.png"
    Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(image)
    output = tmp_path / "classes.json"
    assert main(["classify", str(image), "--classes", "star, ring", "--method", "naive",
                 "--model", str(tiny_clip_dir), "--output", str(output), "--top", "1"]) == 0
    assert output.exists() and "star" in output.read_text()
    assert main(["classify", str(image), "--classes", "star", "--top", "0",
                 "--model", str(tiny_clip_dir)]) == 2


# A few-second PACL run on the proving ground's captions: 64 px scenes, 2 held-out scenes, fp32
# (bf16 autocast, "auto" on CPUs with AMX, rounds batches of 2 and 4 differently).
SMALL = {"iterations": 12, "batch_size": 4, "crop": 64, "warmup_iterations": 2,
         "checkpoint_every": 2, "eval_images": 2, "lr": 1e-3, "chunk_size": 3,
         "precision": "fp32"}


def _args(model, out, *extra: str) -> list[str]:
    sets = [f"--set={key}={value}" for key, value in SMALL.items()]
    return ["train", "--recipe", "pacl-synthetic", "--model", str(model), "--out", str(out),
            "--num-workers", "0", "--log-every", "1", *sets, *extra]


def test_sigkill_then_resume_equals_an_uninterrupted_caption_run(tiny_clip_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _zegkit(*_args(tiny_clip_dir, straight))
    process = subprocess.Popen([sys.executable, "-m", "zegkit", *_args(tiny_clip_dir, killed)],
                               env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not _reached(killed, 2):
        time.sleep(0.05)
    process.send_signal(9)
    process.wait()
    assert _reached(killed, 2) and not _reached(killed, 12), "the kill did not land mid-run"
    _zegkit(*_args(tiny_clip_dir, killed, "--resume"))
    a, b = _tensors(straight / "last.safetensors"), _tensors(killed / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert (straight / "eval.json").exists()


def test_two_gloo_processes_equal_one_caption_run(tiny_clip_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _zegkit(*_args(tiny_clip_dir, one, "--max-steps", "2", "--device", "cpu"))
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(29500 + (os.getpid() + 500) % 1000), "-m", "zegkit",
         *_args(tiny_clip_dir, two, "--max-steps", "2", "--device", "cpu")],
        env=_env(), check=True, capture_output=True, text=True, timeout=600,
    )
    losses = [[json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()
               if '"loss"' in line] for out in (one, two)]
    # step 1: the gathered B x B compatibility; step 2: the world-size-scaled gradients
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    a, b = _tensors(one / "last.safetensors"), _tensors(two / "last.safetensors")
    differences = torch.cat([(a[key] - b[key]).abs().flatten() for key in a])
    # Adam turns float-order differences of near-zero gradients into up to a step (lr 1e-3)
    assert differences.max() <= 2 * 1e-3
    assert (differences <= 1e-5).float().mean() >= 0.95


def test_a_caption_corpus_on_disk_trains_without_a_vocabulary(tiny_clip_dir, tmp_path):
    from zegkit.train.loop import train
    from zegkit.train.recipes import get_recipe, with_overrides

    for index in range(4):
        Image.fromarray(np.full((40, 56, 3), 60 * index, np.uint8)).save(tmp_path / f"{index}.png")
        (tmp_path / f"{index}.txt").write_text(f"picture number {index}")
    recipe = with_overrides(get_recipe("pacl-captions"), {
        "model": str(tiny_clip_dir), "iterations": 2, "batch_size": 4, "warmup_iterations": 1,
        "crop": 32})
    result = train(recipe, tmp_path / "run", data_root=tmp_path, num_workers=0, progress=False)
    assert result["step"] == 2 and result["eval"] is None
    assert (tmp_path / "run" / "last.safetensors").exists()
