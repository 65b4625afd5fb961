"""Tiny-CLIP pretraining: a few steps of a tiny config learn, save, load and resume exactly."""

import argparse
import json

import numpy as np
import pytest
import torch
from transformers import CLIPModel, CLIPTokenizer

from zegkit.data import synthetic
from zegkit.train import pretrain_clip as pc

# A model small enough to train a few steps in a second or two: 64-pixel images, 4x4 patches.
TINY = dict(image_size=64, low_res=32, low_res_fraction=0.5, width=32, layers=2, heads=2,
            text_width=32, text_layers=1, text_heads=2, embed_dim=16, tokenizer_scenes=20,
            vocab_size=600)


def _run(out, steps=4, **kwargs):
    settings = {**TINY, **kwargs}
    settings.setdefault("curve_every", 2)
    settings.setdefault("curve_scenes", 4)
    return pc.pretrain_clip(out, steps=steps, batch_size=6, seed=0, num_workers=0,
                            checkpoint_every=1, log_every=1, **settings)


def test_train_step_lowers_the_loss_on_a_batch():
    cfg = pc.PretrainConfig(steps=20, batch_size=8, lr=3e-3, warmup=0.0, **TINY)
    tokenizer = pc.build_tokenizer(cfg)
    model = pc.build_model(cfg, len(tokenizer))
    optimizer, scheduler = pc.build_optimizer(model, cfg)
    samples = [pc.training_sample(cfg, i, 64) for i in range(8)]
    pixels = torch.stack([pc.scene_to_tensor(image) for image, _ in samples])
    captions = [caption for _, caption in samples]
    losses = [pc.train_step(model, tokenizer, optimizer, scheduler, pixels, captions, cfg)
              for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0]


def test_pretrain_saves_a_loadable_clip(tmp_path):
    result = _run(tmp_path / "run", steps=3, eval_scenes=4, command="pytest")
    assert result["step"] == 3 and len(result["losses"]) == 3
    model = CLIPModel.from_pretrained(tmp_path / "run")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "run")
    assert model.config.vision_config.patch_size == 16
    assert model.config.text_config.vocab_size == len(tokenizer)
    ids = tokenizer(["a photo of a star."])["input_ids"][0]
    assert ids[0] == 0 and ids[-1] == 1  # BOS ... EOS, as the text config expects
    words = tokenizer.decode(ids, skip_special_tokens=True).split()
    assert words[:5] == ["a", "photo", "of", "a", "star"]
    metrics = result["metrics"]
    for key in ("top1_present", "presence_auc", "thing_cosine_mean"):
        assert 0.0 <= metrics[key] <= 1.0
    for key in ("naive_dense_miou", "naive_dense_pixel_acc"):  # percent, as zegkit eval reports
        assert 0.0 <= metrics[key] <= 100.0
    assert [point["step"] for point in result["curve"]] == [2, 3]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["curve"] == result["curve"]
    assert saved["config"]["generator_version"] == synthetic.GENERATOR_VERSION
    card = (tmp_path / "run" / "MODEL_CARD.md").read_text()
    assert "`pytest`" in card and "top-1" in card and "## Training curve" in card
    assert not (tmp_path / "run" / pc.CHECKPOINT).exists()
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_killed_run_resumes_to_the_same_state(tmp_path):
    straight = _run(tmp_path / "a", eval_scenes=0, keep_checkpoint=True)
    _run(tmp_path / "b", eval_scenes=0, stop_after=2)  # "killed" after step 2
    assert (tmp_path / "b" / pc.CHECKPOINT).exists()
    resumed = _run(tmp_path / "b", eval_scenes=0, keep_checkpoint=True)
    assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-5)
    a = torch.load(tmp_path / "a" / pc.CHECKPOINT, weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / pc.CHECKPOINT, weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    # the resolution schedule: first half at low_res, then native
    assert [pc.PretrainConfig(steps=4, **TINY).resolution(s) for s in range(4)] == [32, 32, 64, 64]


def test_presence_report_centres_out_a_score_common_to_all_shapes():
    """One embedding for every shape: the common score falls with the number of classes in a
    scene, so the plain AUC goes below 0.5; centred on the scene's mean thing score it is 0.5."""
    rng = np.random.default_rng(0)
    k, things = len(synthetic.CLASSES), [synthetic.CLASS_ID[c] for c in synthetic.THINGS]
    present = rng.random((400, k)) < 0.25
    common = -present.sum(1, keepdims=True).astype(float)  # crowded scenes score lower
    scores = np.repeat(common, k, axis=1)
    report = pc.presence_report(scores, present)
    assert report["presence_auc_things"] < 0.45
    assert report["presence_auc_things_centred"] == pytest.approx(0.5)
    # a perfect shape detector: AUC 1 and single-shape top-1 1
    perfect = pc.presence_report(present.astype(float), present)
    assert perfect["presence_auc_things_centred"] > 0.95
    assert perfect["single_shape_top1"] == 1.0
    assert perfect["single_shape_scenes"] == int((present[:, things].sum(1) == 1).sum())


def test_thing_text_similarity_names_the_closest_pair():
    text = torch.eye(len(synthetic.CLASSES), 32)
    star, ring = synthetic.CLASS_ID["star"], synthetic.CLASS_ID["ring"]
    text[ring] = torch.nn.functional.normalize(text[star] + 0.1 * text[ring], dim=0)
    report = pc.thing_text_similarity(text)
    assert report["thing_cosine_max_pair"] == ["star", "ring"]
    assert report["thing_cosine_max"] == pytest.approx(1 / np.sqrt(1.01), rel=1e-5)
    assert report["thing_cosine_mean"] == pytest.approx(report["thing_cosine_max"] / 55, rel=1e-5)


def test_supervised_probe_reports_presence_quality(tmp_path):
    result = pc.supervised_probe(tmp_path, steps=2, batch_size=6, num_workers=0, eval_scenes=6,
                                 **{k: v for k, v in TINY.items() if "text" not in k
                                    and k not in ("vocab_size", "tokenizer_scenes")})
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved["steps"] == 2 and len(saved["losses"]) == 2 and saved["size"] == 64
    assert 0.0 <= result["presence_auc_stuff"] <= 1.0


def test_resuming_with_other_settings_is_refused(tmp_path):
    _run(tmp_path / "run", steps=2, eval_scenes=0, stop_after=1)
    with pytest.raises(ValueError, match="other settings"):
        _run(tmp_path / "run", steps=2, eval_scenes=0, lr=1e-2)


def test_export_checkpoint(tmp_path):
    _run(tmp_path / "run", steps=2, eval_scenes=0, stop_after=1)
    pc.export_checkpoint(tmp_path / "run", tmp_path / "export")
    assert "INTERIM: exported at step 1 of 2" in (tmp_path / "export" / "MODEL_CARD.md").read_text()
    CLIPModel.from_pretrained(tmp_path / "export")
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        pc.export_checkpoint(tmp_path / "export", tmp_path / "x")


def test_patch_loss_is_clip_loss_on_the_mean_patch_token():
    """The patch-mean loss equals CLIP's own loss recomputed with the mean projected patch
    token as the image embedding, and --patch-loss adds it with its weight."""
    cfg = pc.PretrainConfig(steps=2, batch_size=6, patch_loss=0.5, **TINY)
    tokenizer = pc.build_tokenizer(cfg)
    model = pc.build_model(cfg, len(tokenizer))
    samples = [pc.training_sample(cfg, i, 64) for i in range(6)]
    pixels = torch.stack([pc.scene_to_tensor(image) for image, _ in samples])
    tokens = tokenizer([caption for _, caption in samples], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**tokens, pixel_values=pixels, return_loss=True)
        patch_loss = pc.patch_contrastive_loss(model, out)
        vision = model.vision_model(pixel_values=pixels)
        patches = model.visual_projection(
            model.vision_model.post_layernorm(vision.last_hidden_state[:, 1:]))
        image = torch.nn.functional.normalize(patches.mean(1), dim=-1)
        logits = model.logit_scale.exp() * image @ out.text_embeds.T
        targets = torch.arange(6)
        expected = (torch.nn.functional.cross_entropy(logits, targets)
                    + torch.nn.functional.cross_entropy(logits.T, targets)) / 2
    assert torch.allclose(patch_loss, expected, atol=1e-6)
    assert not torch.allclose(patch_loss, out.loss)  # a loss of its own, not the [CLS] one
    optimizer, scheduler = pc.build_optimizer(model, cfg)
    step_loss = pc.train_step(model, tokenizer, optimizer, scheduler, pixels,
                              [caption for _, caption in samples], cfg)
    assert step_loss == pytest.approx(out.loss.item() + 0.5 * patch_loss.item(), rel=1e-5)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(batch_size=1), "batch_size"),
        (dict(low_res=40), "multiples of patch_size"),
        (dict(precision="fp16"), "precision"),
        (dict(vocab_size=300), "vocab_size must exceed"),
        (dict(colour="red"), "Unknown setting"),
        (dict(patch_loss=-0.5), "patch_loss"),
        (dict(patch_loss=float("nan")), "patch_loss"),
    ],
)
def test_bad_settings_fail_clearly(tmp_path, overrides, fragment):
    kwargs = {"steps": 2, "batch_size": 4, **overrides}
    with pytest.raises(ValueError, match=fragment):
        pc.pretrain_clip(tmp_path, **kwargs)


def test_cli_arguments():
    parser = argparse.ArgumentParser()
    pc.add_arguments(parser)
    args = parser.parse_args(["--out", "x", "--steps", "7", "--low-res", "0"])
    assert args.steps == 7 and args.low_res == 0 and args.lr is None and args.workers == 1


def test_tokenizer_is_deterministic_and_clip_shaped():
    cfg = pc.PretrainConfig(**{**TINY, "vocab_size": 1024})
    a, b = pc.build_tokenizer(cfg), pc.build_tokenizer(cfg)
    assert a.get_vocab() == b.get_vocab()
    assert a.convert_ids_to_tokens([0, 1]) == ["<|startoftext|>", "<|endoftext|>"]
    assert a.tokenize("a photo of a star.") == ["a</w>", "photo</w>", "of</w>", "a</w>",
                                                 "star</w>", ".</w>"]
    assert len(a.tokenize("zebra")) > 1  # unseen words fall back to byte symbols, never unk
