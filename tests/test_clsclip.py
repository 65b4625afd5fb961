"""ClsCLIP's [CLS] replacement against a layer-by-layer computation with transformers' modules,
the trained head's checkpoint round trip, and ClsCLIP+'s zoom-in merge on constructed cases."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip
from safetensors.torch import save_file

from zegkit.backbone import ClipBackbone
from zegkit.methods.clsclip import (
    OUTSIDE,
    ClsCLIP,
    ClsCLIPConfig,
    ClsCLIPHead,
    Proposal,
    lift_to_width,
    merge_regions,
    replaced_layers,
    zoom_in,
)
from zegkit.text import TextEmbeddings

TOL = 1e-4


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


def test_training_free_replacement_matches_direct_computation(backbone):
    layers = (0, 2)
    pixels = torch.randn(2, 3, 224, 256, generator=torch.Generator().manual_seed(1))
    text = _text(3)
    method = ClsCLIP(ClsCLIPConfig(layers=layers, pair_batch=4))
    got = method(backbone, pixels, text)
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


def test_batching_does_not_change_the_result(backbone):
    pixels, text = torch.randn(3, 3, 224, 224), _text(4)
    one = ClsCLIP(ClsCLIPConfig(layers=(1,), pair_batch=1))(backbone, pixels, text)
    many = ClsCLIP(ClsCLIPConfig(layers=(1,), pair_batch=100))(backbone, pixels, text)
    assert torch.isfinite(one).all()
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)


def test_the_class_token_steers_the_patch_tokens(backbone):
    """Same text row twice: same map; the two classes' passes differ beyond their text rows."""
    pixels, text = torch.randn(1, 3, 224, 224), _text(2)
    twice = TextEmbeddings(**{**text.__dict__, "embeddings": text.embeddings[[0, 0, 1]]})
    scores = ClsCLIP(ClsCLIPConfig(layers=(3,)))(backbone, pixels, twice)
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


def test_trained_head_replacement_and_checkpoint(backbone, tmp_path):
    layers = (1, 2)
    config = ClsCLIPConfig(layers=layers)
    torch.manual_seed(3)
    head = ClsCLIPHead.for_backbone(backbone, config, decoder_dim=16).eval()
    path = tmp_path / "clsclip.safetensors"
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, path)
    method = ClsCLIP(ClsCLIPConfig(layers=layers, checkpoint=str(path))).eval()
    assert sum(p.numel() for p in method.parameters()) == sum(p.numel() for p in head.parameters())
    pixels, text = torch.randn(2, 3, 224, 224), _text(2)
    with torch.no_grad():
        got = method(backbone, pixels, text)
        vision = backbone.model.vision_model
        for b in range(2):
            for k in range(2):
                replace = {layer: head.token_proj[i](text.embeddings[k : k + 1])
                           for i, layer in enumerate(layers)}
                x = _naive_pass(vision, pixels[b : b + 1], replace)
                expected = head.decoder(x, (14, 14))[0]
                assert (got[b, k] - expected).abs().max() <= TOL

    # A training checkpoint holding the method's state dict loads too.
    torch.save({"state_dict": method.state_dict(), "step": 10}, tmp_path / "train.pt")
    again = ClsCLIP(ClsCLIPConfig(layers=layers, checkpoint=str(tmp_path / "train.pt"))).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(backbone, pixels, text), got)

    # Wrong layer count for this checkpoint: a clear error at the first forward.
    with pytest.raises(RuntimeError, match="replaced layers"):
        ClsCLIP(ClsCLIPConfig(layers=(1,), checkpoint=str(path)))(backbone, pixels, text)


def test_gradients_reach_every_head_parameter(backbone):
    config = ClsCLIPConfig(layers=(0, 1))
    method = ClsCLIP(config)
    method.head = ClsCLIPHead.for_backbone(backbone, config, decoder_dim=16)
    method(backbone, torch.randn(1, 3, 224, 224), _text(2)).sum().backward()
    for name, parameter in method.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint=None"):
        ClsCLIP(ClsCLIPConfig(checkpoint=str(tmp_path / "missing.pt")))
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(RuntimeError, match="not a ClsCLIP head"):
        ClsCLIP(ClsCLIPConfig(checkpoint=str(tmp_path / "other.safetensors")))


def test_layer_defaults_and_validation(backbone):
    assert replaced_layers(ClsCLIPConfig(), 12) == [2, 3, 4]
    assert replaced_layers(ClsCLIPConfig(), 24) == [4, 5, 6, 7, 8, 9]
    assert replaced_layers(ClsCLIPConfig(), 3) == [0]
    with pytest.raises(ValueError, match="below the encoder's 4 layers"):
        ClsCLIP(ClsCLIPConfig(layers=(4,)))(backbone, torch.randn(1, 3, 224, 224), _text(1))
    with pytest.raises(ValueError, match="Unknown attention variant"):
        ClsCLIP(ClsCLIPConfig(last_block_attention="cross"))
    with pytest.raises(ValueError, match="pair_batch"):
        ClsCLIP(ClsCLIPConfig(pair_batch=0))


def test_last_block_surgery_is_applied(backbone):
    pixels, text = torch.randn(1, 3, 224, 224), _text(2)
    vanilla = ClsCLIP(ClsCLIPConfig(layers=(1,)))(backbone, pixels, text)
    config = ClsCLIPConfig(layers=(1,), last_block_attention="qq+kk")
    sclip = ClsCLIP(config)(backbone, pixels, text)
    assert sclip.shape == vanilla.shape and not torch.allclose(sclip, vanilla)


# ---- ClsCLIP+ --------------------------------------------------------------------------------
def test_merge_regions_is_an_or_over_boxes():
    global_logits = torch.randn(3, 6, 8)
    a = (Proposal((0, 0, 4, 3), label=1), torch.full((3, 4), 1.0))
    b = (Proposal((2, 1, 6, 4), label=1), torch.full((3, 4), 2.0))
    c = (Proposal((5, 4, 8, 6), label=2), torch.full((2, 3), -0.5))
    out = merge_regions(global_logits, [a, b, c])

    expected1 = torch.full((6, 8), OUTSIDE)
    expected1[0:3, 0:4] = 1.0
    expected1[1:4, 2:6] = 2.0  # the overlap takes the larger (soft OR)
    expected2 = torch.full((6, 8), OUTSIDE)
    expected2[4:6, 5:8] = -0.5
    torch.testing.assert_close(out[0], global_logits[0])  # no proposals: whole-image logits
    torch.testing.assert_close(out[1], expected1)
    torch.testing.assert_close(out[2], expected2)

    kept = merge_regions(global_logits, [a, b, c], keep_global=True)
    torch.testing.assert_close(kept[1], torch.maximum(expected1, global_logits[1]))
    torch.testing.assert_close(merge_regions(global_logits, []), global_logits)


def test_zoom_in_crops_each_box_for_its_class_and_pastes_back():
    image = torch.arange(3 * 10 * 12, dtype=torch.float32).reshape(3, 10, 12)
    global_logits = torch.zeros(2, 10, 12)
    calls = []

    def region_logits(crop, rows):
        calls.append((crop.clone(), rows))
        return crop[:, :1].repeat(1, len(rows), 1, 1)  # channel 0 of the crop as the logits

    proposals = [Proposal((2.5, 1, 7, 5), label=1), Proposal((-3, 6, 4, 14), label=1)]
    out = zoom_in(region_logits, image, global_logits, proposals)
    assert [rows for _, rows in calls] == [[1], [1]]
    torch.testing.assert_close(calls[0][0][0], image[:, 1:5, 2:7])  # 2.5 widens to column 2
    torch.testing.assert_close(calls[1][0][0], image[:, 6:10, 0:4])  # clamped to the image
    expected = torch.full((10, 12), OUTSIDE)
    expected[1:5, 2:7] = image[0, 1:5, 2:7]
    expected[6:10, 0:4] = image[0, 6:10, 0:4]
    torch.testing.assert_close(out[1], expected)
    torch.testing.assert_close(out[0], global_logits[0])


def test_zoom_in_errors():
    image, logits = torch.zeros(3, 8, 8), torch.zeros(2, 8, 8)
    with pytest.raises(ValueError, match="not a class index"):
        zoom_in(lambda c, r: c[:, :1], image, logits, [Proposal((0, 0, 4, 4), label=5)])
    with pytest.raises(ValueError, match="x0 < x1"):
        zoom_in(lambda c, r: c[:, :1], image, logits, [Proposal((4, 0, 4, 4), label=0)])
    with pytest.raises(ValueError, match="outside"):
        zoom_in(lambda c, r: c[:, :1], image, logits, [Proposal((9, 9, 12, 12), label=0)])
    with pytest.raises(ValueError, match="do not fit"):
        merge_regions(logits, [(Proposal((0, 0, 4, 4), label=0), torch.zeros(3, 3))])
