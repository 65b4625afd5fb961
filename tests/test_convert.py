"""convert_openai_state_dict: OpenAI / open_clip ViT layout -> transformers CLIPModel layout."""

import re

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from zegkit.backbone.convert import convert_openai_state_dict

OPENAI_HEAD_WIDTH = 64  # OpenAI: heads = width // 64, so test widths are multiples of 64


def openai_shaped_config(vocab_size: int = 600, image_size: int = 32, patch_size: int = 16,
                         hidden_act: str = "quick_gelu") -> CLIPConfig:
    """Tiny CLIP whose head width is OpenAI's 64; special ids match the tiny test tokenizer."""
    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         hidden_act=hidden_act, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                           hidden_act=hidden_act),
        projection_dim=32,
    )


def make_openai_shaped_clip(seed: int = 0, **config_kwargs) -> CLIPModel:
    """A random tiny CLIP; every tensor perturbed so that no two (e.g. LayerNorm's) coincide."""
    torch.manual_seed(seed)
    model = CLIPModel(openai_shaped_config(**config_kwargs)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def to_openai_layout(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the conversion, written independently: transformers names -> OpenAI names.

    Stacks q/k/v into `in_proj_*` and transposes the projections back into `x @ proj` matrices.
    """
    simple = [
        (r"^vision_model\.embeddings\.patch_embedding\.weight$", "visual.conv1.weight"),
        (r"^vision_model\.embeddings\.class_embedding$", "visual.class_embedding"),
        (r"^vision_model\.embeddings\.position_embedding\.weight$", "visual.positional_embedding"),
        (r"^vision_model\.pre_layrnorm\.", "visual.ln_pre."),
        (r"^vision_model\.post_layernorm\.", "visual.ln_post."),
        (r"^vision_model\.encoder\.layers\.", "visual.transformer.resblocks."),
        (r"^text_model\.embeddings\.token_embedding\.weight$", "token_embedding.weight"),
        (r"^text_model\.embeddings\.position_embedding\.weight$", "positional_embedding"),
        (r"^text_model\.final_layer_norm\.", "ln_final."),
        (r"^text_model\.encoder\.layers\.", "transformer.resblocks."),
        (r"\.self_attn\.out_proj\.", ".attn.out_proj."),
        (r"\.layer_norm1\.", ".ln_1."),
        (r"\.layer_norm2\.", ".ln_2."),
        (r"\.mlp\.fc1\.", ".mlp.c_fc."),
        (r"\.mlp\.fc2\.", ".mlp.c_proj."),
    ]
    out, qkv = {}, {}
    for key, value in hf.items():
        if key == "visual_projection.weight":
            out["visual.proj"] = value.t()
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.t()
            continue
        for pattern, replacement in simple:
            key = re.sub(pattern, replacement, key)
        match = re.match(r"^(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if match:
            qkv[(match.group(1), match.group(3), match.group(2))] = value
        else:
            out[key] = value
    for block, kind in {(b, k) for b, k, _ in qkv}:
        parts = [qkv[(block, kind, name)] for name in "qkv"]
        out[f"{block}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    return out


@pytest.fixture(scope="module")
def hf_model():
    return make_openai_shaped_clip()


@pytest.fixture()
def openai_sd(hf_model):
    return to_openai_layout(hf_model.state_dict())


def test_round_trip_gives_identical_tensors_and_config(hf_model, openai_sd):
    config, converted = convert_openai_state_dict(openai_sd, bos_token_id=0, eos_token_id=1,
                                                  pad_token_id=1)
    original = hf_model.state_dict()
    assert set(converted) == set(original)
    for key, value in original.items():
        assert torch.equal(converted[key], value), key
    ref = hf_model.config
    for tower in ("vision_config", "text_config"):
        got, want = getattr(config, tower), getattr(ref, tower)
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "hidden_act"):
            assert getattr(got, field) == getattr(want, field), (tower, field)
    assert (config.vision_config.patch_size, config.vision_config.image_size) == (16, 32)
    assert (config.text_config.vocab_size, config.text_config.max_position_embeddings) == (600, 77)
    assert config.projection_dim == 32
    assert config.text_config.eos_token_id == 1


def test_converted_model_gives_the_same_embeddings(hf_model, openai_sd):
    config, converted = convert_openai_state_dict(openai_sd, bos_token_id=0, eos_token_id=1,
                                                  pad_token_id=1)
    model = CLIPModel(config).eval()
    model.load_state_dict(converted, strict=True)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[0, 5, 9, 1, 1, 1], [0, 7, 1, 1, 1, 1]])
    with torch.no_grad():
        for fn, kwargs in (("get_image_features", dict(pixel_values=pixels)),
                           ("get_text_features", dict(input_ids=ids))):
            got = getattr(model, fn)(**kwargs).pooler_output
            want = getattr(hf_model, fn)(**kwargs).pooler_output
            assert (got - want).abs().max() <= 1e-5, fn


def test_defaults_are_openai_activation_and_special_ids(openai_sd):
    config, _ = convert_openai_state_dict(openai_sd)
    text = config.text_config
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (598, 599, 599)
    assert text.hidden_act == config.vision_config.hidden_act == "quick_gelu"


def test_plain_gelu_for_open_clip_models(openai_sd):
    config, _ = convert_openai_state_dict(openai_sd, hidden_act="gelu")
    assert config.vision_config.hidden_act == config.text_config.hidden_act == "gelu"


def test_openai_only_buffers_are_dropped(openai_sd):
    extras = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
              "vocab_size": torch.tensor(600), "attn_mask": torch.zeros(77, 77),
              "transformer.resblocks.0.attn_mask": torch.zeros(77, 77)}
    _, converted = convert_openai_state_dict({**openai_sd, **extras})
    assert not any("attn_mask" in key or key in extras for key in converted)


@pytest.mark.parametrize(
    "patch, image, width, layers, heads, projection",
    [(16, 224, 768, 12, 12, 512), (14, 336, 1024, 24, 16, 768)],
    ids=["ViT-B-16", "ViT-L-14-336px"],
)
def test_infers_real_openai_architectures(patch, image, width, layers, heads, projection):
    """Real OpenAI shapes on the meta device: no memory, same shape inference."""
    config = CLIPConfig(
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image, patch_size=patch),
        text_config=dict(hidden_size=projection, intermediate_size=4 * projection,
                         num_attention_heads=projection // OPENAI_HEAD_WIDTH),
        projection_dim=projection,
    )
    with torch.device("meta"):
        openai_sd = to_openai_layout(CLIPModel(config).state_dict())
    openai_sd["logit_scale"] = torch.tensor(4.6052)  # float() needs a real value
    got, _ = convert_openai_state_dict(openai_sd)
    vision, text = got.vision_config, got.text_config
    assert (vision.patch_size, vision.image_size) == (patch, image)
    assert vision.num_attention_heads == heads
    assert (vision.num_hidden_layers, got.projection_dim) == (layers, projection)
    assert (text.vocab_size, text.max_position_embeddings, text.eos_token_id) == (49408, 77, 49407)
    assert text.num_attention_heads == projection // OPENAI_HEAD_WIDTH


def test_missing_key_is_named(openai_sd):
    del openai_sd["visual.transformer.resblocks.1.ln_2.bias"]
    with pytest.raises(ValueError, match=r"Missing keys: \['visual.transformer.resblocks.1.ln_2"):
        convert_openai_state_dict(openai_sd)


def test_unexpected_key_is_named(openai_sd):
    openai_sd["visual.attn_pool.query"] = torch.zeros(4, 128)
    with pytest.raises(ValueError, match=r"unexpected keys: \['visual.attn_pool.query'\]"):
        convert_openai_state_dict(openai_sd)


def test_resnet_clip_is_refused(openai_sd):
    openai_sd["visual.layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(ValueError, match="ResNet CLIP"):
        convert_openai_state_dict(openai_sd)


def test_transformers_layout_is_refused(hf_model):
    with pytest.raises(ValueError, match="already in the Hugging Face"):
        convert_openai_state_dict(hf_model.state_dict())


def test_other_model_is_refused():
    with pytest.raises(ValueError, match="Not an OpenAI CLIP"):
        convert_openai_state_dict({"encoder.weight": torch.zeros(2, 2)})


def test_inconsistent_shape_is_named(openai_sd):
    openai_sd["transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(300, 128)
    with pytest.raises(ValueError, match=r"encoder.layers.1.mlp.fc1.weight: \(300, 128\)"):
        convert_openai_state_dict(openai_sd)


def test_projection_dims_must_agree(openai_sd):
    openai_sd["text_projection"] = torch.zeros(128, 16)
    with pytest.raises(ValueError, match="share one embedding space"):
        convert_openai_state_dict(openai_sd)


def test_width_not_multiple_of_head_width(openai_sd):
    with pytest.raises(ValueError, match="head_width=48"):
        convert_openai_state_dict(openai_sd, head_width=48)


def test_head_width_argument(openai_sd):
    config, _ = convert_openai_state_dict(openai_sd, head_width=32)
    assert config.vision_config.num_attention_heads == config.text_config.num_attention_heads == 4


def test_unknown_activation(openai_sd):
    with pytest.raises(ValueError, match=r"hidden_act='relu'.*'quick_gelu', 'gelu'"):
        convert_openai_state_dict(openai_sd, hidden_act="relu")


def test_legacy_eos_id_two_is_refused(openai_sd):
    with pytest.raises(ValueError, match="eos_token_id=2"):
        convert_openai_state_dict(openai_sd, eos_token_id=2)
