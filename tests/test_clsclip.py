"""ClsCLIP (trained) and its untrained stand-in: the [CLS] replacement against a layer-by-layer
computation with transformers' modules, the loss against a direct computation, gradients in every
trained tensor, a few-step run whose loss falls, `zegkit train` through the fold recipe, the
save/load round trip, and the refusal to run untrained."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip

from zegkit.backbone import BlockSurgery, ClipBackbone, TokenInjection
from zegkit.methods import create_method
from zegkit.methods.base import Batch
from zegkit.methods.checkpoint import save_method
from zegkit.methods.cls_injection import encoder_floor, replaced_layers
from zegkit.methods.clsclip import binary_mask_loss, training_pairs
from zegkit.methods.clsclip_standin import ClsCLIPStandin, ClsCLIPStandinConfig, lift_to_width
from zegkit.segmenter import load_segmenter
from zegkit.text import TextEmbeddings, encode_vocabulary

TOL = 1e-4
CLASSES = ["background", "red", "green", "blue"]


@pytest.fixture(scope="module")
def backbone(tiny_tokenizer):
    return ClipBackbone(make_tiny_clip(16, layers=4), tiny_tokenizer, "tiny-4")


def _text(num_classes, dim=24, seed=0):
    rows = F.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed)))
    names = [f"class{i}" for i in range(num_classes)]
    return TextEmbeddings(
        embeddings=rows, class_names=names, synonyms=[[n] for n in names],
        synonym_embeddings=rows, class_index=torch.arange(num_classes),
    )


def _naive_pass(vision, pixels, replace):
    """Vision tower written out layer by layer; `replace` maps layer -> (1, C) [CLS] for it."""
    x = vision.pre_layrnorm(vision.embeddings(pixels, interpolate_pos_encoding=True))
    for index, layer in enumerate(vision.encoder.layers):
        if index in replace:
            x = torch.cat([replace[index][:, None], x[:, 1:]], dim=1)
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
    return x


def _clsclip(backbone, **settings):
    torch.manual_seed(0)
    method = create_method("clsclip", decoder_dim=16, **settings)
    method.build(backbone)
    return method


def _halves_batch(backbone, method):
    """Two 64 px images: red left half (class 1), green right half (class 2)."""
    images = torch.zeros(2, 3, 64, 64)
    images[:, 0, :, :32] = 1.0
    images[:, 1, :, 32:] = 1.0
    labels = torch.ones(2, 64, 64, dtype=torch.long)
    labels[:, :, 32:] = 2
    return Batch(method.normalize(backbone, images), labels,
                 torch.tensor([True, True, True, False]))


def _per_pair_reference(backbone, pixels, text, layers, token, readout, surgery, extra=None):
    """Scores (B, K, h, w) the straightforward way: every (image, class) pair runs the whole
    encoder from its pixels, shallow layers included, with its tokens in the [CLS] slot."""
    blocks = {} if surgery == "vanilla" else {-1: BlockSurgery(surgery)}
    maps = []
    for b in range(pixels.shape[0]):
        for k in range(text.num_classes):
            cls = {layer: token(slot, b, k) for slot, layer in enumerate(layers)}
            cls.update({layer: tokens[b : b + 1] for layer, tokens in (extra or {}).items()})
            out = backbone.forward_intermediates(pixels[b : b + 1], indices=[], surgery=blocks,
                                                 inject=TokenInjection(cls=cls))
            maps.append(readout(out.hidden, out.grid, k)[0])
    return torch.stack(maps).reshape(pixels.shape[0], text.num_classes, *maps[0].shape)


def _rows_per_layer(backbone, monkeypatch):
    """Counts the token sequences each encoder layer runs on (a spy on the attention half of a
    layer, which `ClipBackbone.block` and `forward_intermediates` both run)."""
    rows = [0] * backbone.num_layers
    attention_step = backbone._attention_step

    def counted(index, x, *args, **kwargs):
        rows[index] += x.shape[0]
        return attention_step(index, x, *args, **kwargs)

    monkeypatch.setattr(backbone, "_attention_step", counted)
    return rows


@pytest.mark.parametrize(("layers", "surgery", "cls_after"), [
    ((1, 2), "vanilla", "continue"), ((0, 2), "qq+kk", "continue"), ((2,), "vanilla", "restore"),
    ((0, 1), "qq+kk", "restore"),
])
def test_shared_shallow_layers_match_a_full_pass_per_class(backbone, monkeypatch, layers,
                                                           surgery, cls_after):
    """The layers before the first replaced one run once per crop, then per class: the scores
    equal one full encoder pass per (image, class) pair, for ClsCLIP and its stand-in."""
    pixels = torch.randn(2, 3, 224, 256, generator=torch.Generator().manual_seed(3))
    text = _text(3)
    trained = _clsclip(backbone, layers=layers, last_block_attention=surgery, cls_after=cls_after,
                       pair_batch=4).eval()
    standin = ClsCLIPStandin(ClsCLIPStandinConfig(layers=layers, last_block_attention=surgery,
                                                  pair_batch=4))
    vision = backbone.model.vision_model
    with torch.no_grad():
        rows = _rows_per_layer(backbone, monkeypatch)
        got_trained = trained(backbone, pixels, text)
        assert rows[: layers[0]] == [2] * layers[0]  # once per crop, not per pair
        assert rows[-1] == 2 * 3
        got_standin = standin(backbone, pixels, text)
        monkeypatch.undo()

        states = vision(pixel_values=pixels, interpolate_pos_encoding=True,
                        output_hidden_states=True).hidden_states  # states[i] enters layer i
        after = layers[-1] + 1
        extra = {after: states[after][:, 0]} if cls_after == "restore" else {}
        classes = text.embeddings
        expected_trained = _per_pair_reference(
            backbone, pixels, text, layers,
            lambda slot, b, k: trained.head.token(slot, classes[k : k + 1]),
            lambda hidden, grid, k: trained.head.decoder(hidden, grid), surgery, extra)
        directions = lift_to_width(backbone, classes)
        expected_standin = _per_pair_reference(
            backbone, pixels, text, layers,
            lambda slot, b, k: directions[k : k + 1] * states[layers[slot]][b, 0].norm(),
            lambda hidden, grid, k: (F.normalize(backbone.project(hidden[:, 1:]), dim=-1)
                                     @ classes[k]).reshape(1, *grid), surgery)
    torch.testing.assert_close(got_trained, expected_trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_standin, expected_standin, atol=1e-5, rtol=0)


# ---- the untrained stand-in ----------------------------------------------------------------------
def _naive_lift(backbone, text):
    """The minimum-norm zero-mean solution of W_p (γ ⊙ n) = t, with numpy's pinv."""
    weight = backbone.model.visual_projection.weight.detach().double().numpy()
    gain = backbone.vision.post_layernorm.weight.detach().double().numpy()
    system = np.vstack([weight * gain, np.ones((1, gain.size))])
    out = []
    for row in text.double().numpy():
        n = np.linalg.pinv(system) @ np.append(row, 0.0)
        out.append(torch.from_numpy(n / np.linalg.norm(n)).float())
    return out


def test_standin_replacement_matches_direct_computation(backbone):
    layers = (0, 2)
    pixels = torch.randn(2, 3, 224, 256, generator=torch.Generator().manual_seed(1))
    text = _text(3)
    got = ClsCLIPStandin(ClsCLIPStandinConfig(layers=layers, pair_batch=4))(backbone, pixels, text)
    assert got.shape == (2, 3, 14, 16)

    vision = backbone.model.vision_model
    directions = _naive_lift(backbone, text.embeddings)
    with torch.no_grad():
        states = vision(pixel_values=pixels, interpolate_pos_encoding=True,
                        output_hidden_states=True).hidden_states  # states[i] enters layer i
        for b in range(2):
            for k in range(3):
                replace = {
                    layer: (directions[k] * states[layer][b, 0].norm())[None] for layer in layers
                }
                x = _naive_pass(vision, pixels[b : b + 1], replace)
                tokens = backbone.model.visual_projection(vision.post_layernorm(x[0, 1:]))
                expected = F.normalize(tokens, dim=-1) @ text.embeddings[k]
                assert (got[b, k] - expected.reshape(14, 16)).abs().max() <= TOL


def test_standin_batching_does_not_change_the_result(backbone):
    pixels, text = torch.randn(3, 3, 224, 224), _text(4)
    one = ClsCLIPStandin(ClsCLIPStandinConfig(layers=(1,), pair_batch=1))(backbone, pixels, text)
    many = ClsCLIPStandin(ClsCLIPStandinConfig(layers=(1,), pair_batch=100))(backbone, pixels,
                                                                            text)
    assert torch.isfinite(one).all()
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)


def test_the_class_token_steers_the_patch_tokens(backbone):
    """Same text row twice: same map; the two classes' passes differ beyond their text rows."""
    pixels, text = torch.randn(1, 3, 224, 224), _text(2)
    twice = TextEmbeddings(**{**text.__dict__, "embeddings": text.embeddings[[0, 0, 1]]})
    scores = ClsCLIPStandin(ClsCLIPStandinConfig(layers=(3,)))(backbone, pixels, twice)
    torch.testing.assert_close(scores[0, 0], scores[0, 1])
    plain = backbone.forward_intermediates(pixels, indices=[]).tokens
    plain = F.normalize(backbone.project(plain), dim=-1) @ text.embeddings[1]
    assert not torch.allclose(scores[0, 2].flatten(), plain[0], atol=1e-3)


def test_lift_points_back_at_the_text_embedding(backbone):
    text = _text(5).embeddings
    directions = lift_to_width(backbone, text)
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(directions.sum(-1), torch.zeros(5), atol=1e-5, rtol=0)
    bias = backbone.model.visual_projection(backbone.vision.post_layernorm.bias)
    with torch.no_grad():
        back = backbone.project(7.0 * directions) - bias
    cosine = F.cosine_similarity(back, text, dim=-1)
    torch.testing.assert_close(cosine, torch.ones(5), atol=1e-4, rtol=0)


def test_standin_last_block_surgery_is_applied(backbone):
    pixels, text = torch.randn(1, 3, 224, 224), _text(2)
    vanilla = ClsCLIPStandin(ClsCLIPStandinConfig(layers=(1,)))(backbone, pixels, text)
    config = ClsCLIPStandinConfig(layers=(1,), last_block_attention="qq+kk")
    sclip = ClsCLIPStandin(config)(backbone, pixels, text)
    assert sclip.shape == vanilla.shape and not torch.allclose(sclip, vanilla)


# ---- trained ClsCLIP -----------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [False, True])
def test_trained_replacement_matches_direct_computation(backbone, shared):
    layers = (1, 2)
    method = _clsclip(backbone, layers=layers, shared_projection=shared, pair_batch=3).eval()
    head = method.head
    assert len(head.token_proj) == (1 if shared else 2)
    pixels, text = torch.randn(2, 3, 224, 224), _text(2)
    with torch.no_grad():
        got = method(backbone, pixels, text)
        vision = backbone.model.vision_model
        for b in range(2):
            for k in range(2):
                replace = {layer: head.token_proj[0 if shared else i](text.embeddings[k : k + 1])
                           for i, layer in enumerate(layers)}
                x = _naive_pass(vision, pixels[b : b + 1], replace)
                assert (got[b, k] - head.decoder(x, (14, 14))[0]).abs().max() <= TOL


def test_restore_puts_the_image_cls_back_after_the_replaced_layers(backbone):
    method = _clsclip(backbone, layers=(1,), cls_after="restore").eval()
    pixels, text = torch.randn(1, 3, 224, 224), _text(1)
    vision = backbone.model.vision_model
    with torch.no_grad():
        got = method(backbone, pixels, text)
        states = vision(pixel_values=pixels, interpolate_pos_encoding=True,
                        output_hidden_states=True).hidden_states
        replace = {1: method.head.token_proj[0](text.embeddings[:1]), 2: states[2][:, 0]}
        expected = method.head.decoder(_naive_pass(vision, pixels, replace), (14, 14))
        continued = _clsclip(backbone, layers=(1,)).eval()(backbone, pixels, text)
    assert (got[0, 0] - expected[0]).abs().max() <= TOL
    assert not torch.allclose(got, continued, atol=1e-3)


def test_background_gets_no_pass_and_a_constant_probability(backbone):
    method = _clsclip(backbone, background_probability=0.3).eval()
    text = encode_vocabulary(backbone, CLASSES, templates="single", use_cache=False)
    without = encode_vocabulary(backbone, CLASSES[1:], templates="single", use_cache=False)
    pixels = torch.randn(2, 3, 224, 224)
    calls = []
    original = method.pair_logits

    def spy(backbone, pixels, classes, image, row):
        calls.append(sorted(set(row.tolist())))
        return original(backbone, pixels, classes, image, row)

    method.pair_logits = spy
    with torch.no_grad():
        scores = method(backbone, pixels, text)
        alone = method(backbone, pixels, without)
    assert calls[0] == [1, 2, 3]
    torch.testing.assert_close(scores[:, 0], torch.full_like(scores[:, 0], math.log(0.3 / 0.7)))
    torch.testing.assert_close(scores[:, 1:], alone)
    assert method.activation().kind == "sigmoid"


def test_training_pairs_query_present_and_absent_candidates():
    labels = torch.tensor([[[1, 1, 2, 255]], [[0, 0, 0, 0]], [[3, 3, 3, 1]]])
    candidates = torch.tensor([False, True, True, False])  # 0 background, 3 unseen
    torch.manual_seed(0)
    image, row = training_pairs(labels, candidates, present=1, absent=1)
    pairs = list(zip(image.tolist(), row.tolist(), strict=True))
    present = [(b, c) for b, c in pairs if (labels[b] == c).any()]
    absent = [(b, c) for b, c in pairs if not (labels[b] == c).any()]
    # image 0 shows both candidates (no absent one left), image 1 none, image 2 only class 1
    assert [b for b, _ in present] == [0, 2] and present[1] == (2, 1)
    assert [b for b, _ in absent] == [1, 2] and absent[1] == (2, 2)
    assert all(candidates[c] for _, c in pairs)
    torch.manual_seed(0)
    again = training_pairs(labels, candidates, present=1, absent=1)
    assert torch.equal(again[0], image) and torch.equal(again[1], row)


def test_binary_mask_loss_matches_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 6)
    targets = torch.rand(3, 5, 6) > 0.6
    valid = torch.rand(3, 5, 6) > 0.2
    terms = binary_mask_loss(logits, targets, valid, bce_weight=2.0, dice_weight=0.5)
    bce, dice = [], []
    for p in range(3):
        x, t = logits[p][valid[p]], targets[p][valid[p]].float()
        bce.append(F.binary_cross_entropy_with_logits(x, t))
        s = x.sigmoid()
        dice.append(1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1))
    torch.testing.assert_close(terms["bce"], torch.stack(bce).mean())
    torch.testing.assert_close(terms["dice"], torch.stack(dice).mean())
    torch.testing.assert_close(terms["loss"], 2 * terms["bce"] + 0.5 * terms["dice"])


@pytest.mark.parametrize("settings", [{}, {"shared_projection": True, "cls_after": "restore",
                                           "absent_per_image": 1}])
def test_every_trained_tensor_gets_a_gradient(backbone, settings):
    method = _clsclip(backbone, layers=(1, 2), **settings)
    text = encode_vocabulary(backbone, CLASSES, templates="single", use_cache=False)
    method.loss(backbone, _halves_batch(backbone, method), text)["loss"].backward()
    missing = [name for name, p in method.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == [] and len(method.trainable_parameters()) > 0
    assert all(p.grad is None for p in backbone.parameters())


def test_a_batch_without_seen_classes_gives_a_zero_loss_on_every_parameter(backbone):
    method = _clsclip(backbone)
    text = encode_vocabulary(backbone, CLASSES, templates="single", use_cache=False)
    batch = _halves_batch(backbone, method)
    batch = Batch(batch.pixels, torch.full_like(batch.labels, 3), batch.seen)  # unseen only
    loss = method.loss(backbone, batch, text)["loss"]
    loss.backward()
    assert loss.item() == 0 and all(p.grad is not None for p in method.parameters())


def _distinct_text():
    """CLASSES with random, nearly orthogonal embeddings: the tiny random text encoder gives
    these words embeddings with cosines of 0.97-0.99, too alike for a few steps to separate."""
    text = _text(len(CLASSES))
    return TextEmbeddings(**{**text.__dict__, "class_names": CLASSES,
                             "synonyms": [[name] for name in CLASSES]})


def test_few_steps_lower_the_loss_then_save_load_segment(backbone, tmp_path):
    method = _clsclip(backbone)
    text = _distinct_text()
    batch = _halves_batch(backbone, method)
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        terms = method.loss(backbone, batch, text)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert np.mean(losses[-5:]) < 0.25 * np.mean(losses[:5])  # measured: 1.24 -> 0.05

    path = save_method(method.eval(), tmp_path / "clsclip.safetensors", backbone)
    segmenter = load_segmenter("clsclip", backbone=backbone, checkpoint=path, mode="whole",
                               short_side=64, precision="fp32")  # as `expected` is computed
    loaded = segmenter.method
    assert loaded.state_dict().keys() == method.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[key], value)
               for key, value in method.state_dict().items())
    with torch.no_grad():
        probabilities = loaded(backbone, batch.pixels, text).sigmoid()  # (2, 4, 4, 4)
    assert (probabilities[:, 1, :, :2] > 0.5).all() and (probabilities[:, 1, :, 2:] < 0.5).all()
    assert (probabilities[:, 2, :, 2:] > 0.5).all() and (probabilities[:, 2, :, :2] < 0.5).all()

    segmenter.set_vocabulary(CLASSES)  # the Segmenter path: the loaded method, resized scores
    images = torch.zeros(1, 3, 64, 64)
    images[:, 0, :, :32] = 1.0
    with torch.no_grad():
        expected = method(backbone, method.normalize(backbone, images), segmenter.text)
    torch.testing.assert_close(segmenter.scores(images).values,
                               F.interpolate(expected, size=(64, 64), mode="bilinear"))


def test_clsclip_refuses_to_run_untrained(backbone):
    with pytest.raises(ValueError, match="clsclip-synthetic-fold0"):
        load_segmenter("clsclip", backbone=backbone)
    with pytest.raises(RuntimeError, match="zegkit train --recipe clsclip"):
        create_method("clsclip")(backbone, torch.randn(1, 3, 224, 224), _text(1))
    assert "UNTRAINED" in create_method("clsclip_standin").description


def test_floor_counts_the_shared_shallow_layers_once():
    assert encoder_floor([2, 3, 4], 12, 150) == (2 + 10 * 150) / 12  # issue 17's ViT-B/16 floor
    assert encoder_floor([0], 12, 7) == 7 and encoder_floor([11], 12, 1) == 1


def test_layer_defaults_and_validation(backbone):
    assert replaced_layers(None, 12) == [2, 3, 4]
    assert replaced_layers(None, 24) == [4, 5, 6, 7, 8, 9]
    assert replaced_layers(None, 3) == [0]
    with pytest.raises(ValueError, match="below the encoder's 4 layers"):
        create_method("clsclip", layers=(4,)).build(backbone)
    with pytest.raises(ValueError, match="Unknown attention variant"):
        create_method("clsclip", last_block_attention="cross")
    with pytest.raises(ValueError, match="cls_after"):
        create_method("clsclip", cls_after="drop")
    with pytest.raises(ValueError, match="pair_batch"):
        ClsCLIPStandin(ClsCLIPStandinConfig(pair_batch=0))


def test_zegkit_train_runs_the_fold_recipe_and_evaluates_episodes(tiny_clip_dir, tmp_path):
    """A 4-step run of clsclip-synthetic-fold0 at 64 px (images are not filtered here: reading
    the 10,000 generated scenes for the fold filter takes minutes)."""
    import json

    from zegkit.train.loop import train
    from zegkit.train.recipes import get_recipe, with_overrides

    recipe = with_overrides(get_recipe("clsclip-synthetic-fold0"), {
        "model": str(tiny_clip_dir), "iterations": 4, "warmup_iterations": 1, "batch_size": 4,
        "crop": 64, "checkpoint_every": 2, "eval_images": 3, "drop_unseen_images": False,
        "layers": (1,), "decoder_dim": 16})
    result = train(recipe, tmp_path / "run", num_workers=0, progress=False)
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["step"] == 4 and evaluation["num_episodes"] == 1000
    assert 0 <= evaluation["mIoU"] <= 100 and 0 <= evaluation["FB-IoU"] <= 100
    segmenter = load_segmenter("clsclip", str(tiny_clip_dir),
                               checkpoint=tmp_path / "run" / "last.safetensors")
    assert segmenter.method.config.layers == (1,)


def _toy_voc(root):
    """VOC 2012 with train_aug (a: aeroplane, fold 0; b: bus, fold 1) and val (the same two)."""
    from PIL import Image

    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug",
                   "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    for name, label in (("a", 1), ("b", 6)):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
        mask = np.zeros((64, 64), np.uint8)
        mask[8:56, 8:56] = label  # 2304 pixels, above the episodes' 2048
        for folder in ("SegmentationClass", "SegmentationClassAug"):
            Image.fromarray(mask, mode="L").save(voc / folder / f"{name}.png")
    for split in ("train_aug", "val"):
        (voc / f"ImageSets/Segmentation/{split}.txt").write_text("a\nb\n")
    return voc


def test_pascal_fold_recipe_drops_the_folds_images_and_evaluates_its_episodes(
        tiny_clip_dir, tmp_path):
    import json

    from zegkit.train.data import build_train_loader, load_training_set, zero_shot_split
    from zegkit.train.loop import train
    from zegkit.train.recipes import get_recipe, with_overrides

    voc = _toy_voc(tmp_path)
    recipe = with_overrides(get_recipe("clsclip-pascal-5i-fold0"), {
        "model": str(tiny_clip_dir), "iterations": 2, "warmup_iterations": 1, "batch_size": 2,
        "crop": 64, "checkpoint_every": 2, "decoder_dim": 16, "layers": (1,)})
    dataset = load_training_set("voc21", voc)
    seen, unseen = zero_shot_split(dataset, recipe.protocol)
    assert unseen == [1, 2, 3, 4, 5] and 6 in seen
    loader = build_train_loader(dataset, recipe.augment(), batch_size=2, seed=0, num_steps=1,
                                unseen=unseen, drop_unseen_images=True)
    assert loader.batch_sampler.indices.tolist() == [1]  # only b (bus) is left for fold 0
    train(recipe, tmp_path / "run", data_root=voc, num_workers=0, progress=False)
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evaluation["num_episodes"] == 1000  # all on image a, the only fold-0 class shown
