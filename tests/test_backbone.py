"""The layer-by-layer forward reproduces transformers' CLIP exactly when no surgery is asked for."""

import gc

import pytest
import torch
from conftest import make_tiny_clip

from zegkit.backbone import BlockSurgery, ClipBackbone, TokenInjection, take_indices

TOL = 1e-5


def _backbone(patch_size: int, tokenizer) -> ClipBackbone:
    return ClipBackbone(make_tiny_clip(patch_size), tokenizer, f"tiny-{patch_size}")


@pytest.mark.parametrize("patch_size", [16, 14])
@pytest.mark.parametrize("size", [(224, 224), (224, 336), (448, 448)])
def test_no_surgery_matches_transformers(patch_size, size, tiny_tokenizer):
    backbone = _backbone(patch_size, tiny_tokenizer)
    pixels = torch.randn(2, 3, *size)
    ours = backbone.forward_intermediates(pixels)
    with torch.no_grad():
        theirs = backbone.model.vision_model(
            pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True
        )
        features = backbone.model.get_image_features(
            pixel_values=pixels, interpolate_pos_encoding=True
        ).pooler_output
        ours_features = backbone.image_features(pixels)
    assert (ours.hidden - theirs.last_hidden_state).abs().max() <= TOL
    for mine, reference in zip(ours.intermediate_prefix, theirs.hidden_states[1:], strict=True):
        assert (mine - reference[:, 0]).abs().max() <= TOL
    for mine, reference in zip(ours.intermediates, theirs.hidden_states[1:], strict=True):
        assert (mine - reference[:, 1:]).abs().max() <= TOL
    assert (ours_features - features).abs().max() <= TOL


def test_text_embeddings_match_transformers(tiny_tokenizer):
    backbone = _backbone(16, tiny_tokenizer)
    texts = ["a photo of a dog", "grass", "a red star on brick"]
    batch = tiny_tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = backbone.model.get_text_features(**batch).pooler_output
    singles = torch.cat([backbone.encode_text([text]) for text in texts])
    assert (backbone.encode_text(texts) - reference).abs().max() <= TOL
    assert (singles - reference).abs().max() <= TOL  # padding to the longest changes nothing


def test_take_indices():
    assert take_indices(12, None) == list(range(12))
    assert take_indices(12, 3) == [9, 10, 11]
    assert take_indices(12, [-1, 0, 5]) == [0, 5, 11]
    with pytest.raises(ValueError, match="outside this model's 12 layers"):
        take_indices(12, [12])


def test_output_format_and_stop_early(tiny_tokenizer):
    backbone = _backbone(16, tiny_tokenizer)
    pixels = torch.randn(1, 3, 224, 288)
    out = backbone.forward_intermediates(pixels, indices=[0], output_fmt="NCHW", stop_early=True)
    assert out.grid == (14, 18)
    assert out.intermediates[0].shape == (1, 48, 14, 18)
    full = backbone.forward_intermediates(pixels, indices=[0])
    assert torch.allclose(out.hidden[:, 1:], full.intermediates[0])  # only layer 0 ran
    assert torch.allclose(out.intermediates[0].flatten(2).transpose(1, 2), full.intermediates[0])


def test_surgery_block_is_the_direct_formula(tiny_tokenizer):
    """Last block with q-q + k-k attention and no residual/FFN, computed by hand."""
    backbone = _backbone(16, tiny_tokenizer)
    pixels = torch.randn(1, 3, 224, 224)
    surgery = BlockSurgery("qq+kk", residual=False, ffn=False)
    out = backbone.forward_intermediates(pixels, indices=[1], surgery={-1: surgery})
    x = backbone.layers[-1].layer_norm1(
        torch.cat([out.intermediate_prefix[0][:, None], out.intermediates[0]], dim=1)
    )
    attn = backbone.layers[-1].self_attn
    heads, dim = backbone.num_heads, backbone.width // backbone.num_heads
    q = attn.q_proj(x).view(1, -1, heads, dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, -1, heads, dim).transpose(1, 2)
    v = attn.v_proj(x).view(1, -1, heads, dim).transpose(1, 2)
    weights = (q @ q.transpose(-1, -2) / dim**0.5).softmax(-1)
    weights = weights + (k @ k.transpose(-1, -2) / dim**0.5).softmax(-1)
    expected = attn.out_proj((weights @ v).transpose(1, 2).reshape(1, -1, backbone.width))
    assert (out.hidden - expected).abs().max() <= TOL


def test_cls_injection_and_attention_maps(tiny_tokenizer):
    backbone = _backbone(16, tiny_tokenizer)
    pixels = torch.randn(2, 3, 224, 224)
    token = torch.randn(2, backbone.width)
    out = backbone.forward_intermediates(
        pixels, indices=[0], inject=TokenInjection(cls={1: token}), return_attention=[1]
    )
    x = torch.cat([token[:, None], out.intermediates[0]], dim=1)
    expected, weights = backbone.block(1, x, out.grid, return_attention=True)
    assert torch.allclose(out.attention[1], weights)
    assert torch.allclose(out.attention[1].sum(-1), torch.ones(2, 4, 197))
    plain = backbone.forward_intermediates(pixels, stop_early=True, indices=[1])
    assert not torch.allclose(plain.intermediates[0], expected[:, 1:])


def test_summed_attention_is_the_sum_of_the_maps(tiny_tokenizer):
    backbone = _backbone(16, tiny_tokenizer)
    pixels = torch.randn(2, 3, 224, 224)
    each = backbone.forward_intermediates(pixels, indices=[], return_attention=[0, 2])
    summed = backbone.forward_intermediates(pixels, indices=[], return_attention=[0, 2],
                                            sum_attention=True)
    assert summed.attention == {} and torch.equal(summed.hidden, each.hidden)
    assert torch.equal(summed.attention_sum, each.attention[0] + each.attention[2])


def test_summed_attention_is_not_held_through_the_feed_forward(tiny_tokenizer):
    """With sum_attention a layer's weights join the sum before its FFN runs, so only the sum
    (B, heads, T, T) is alive there (CLIPer's peak is in an early layer's FFN)."""
    backbone = _backbone(16, tiny_tokenizer)
    maps = []

    def count_attention_maps(*_):
        shape = (2, backbone.num_heads, 197, 197)
        maps.append(sum(isinstance(o, torch.Tensor) and o.shape == shape for o in gc.get_objects()))

    hook = backbone.layers[1].mlp.fc1.register_forward_hook(count_attention_maps)
    backbone.forward_intermediates(torch.randn(2, 3, 224, 224), indices=[],
                                   return_attention=[0, 1], sum_attention=True)
    hook.remove()
    assert maps == [1]


def test_attention_branch_projects_values_only(tiny_tokenizer):
    """out_proj(weights · v) of the given weights, without computing the layer's queries or keys
    (CLIPer runs it once per early embedding)."""
    backbone = _backbone(16, tiny_tokenizer)
    x = torch.randn(2, 197, backbone.width)
    weights = torch.rand(2, backbone.num_heads, 197, 197).softmax(-1)
    attn = backbone.layers[-1].self_attn
    called = []
    hooks = [getattr(attn, name).register_forward_hook(lambda *_, name=name: called.append(name))
             for name in ("q_proj", "k_proj", "v_proj")]
    out = backbone.attention_branch(-1, x, weights)
    for hook in hooks:
        hook.remove()
    assert called == ["v_proj"]
    _, _, v = backbone.qkv(-1, x)
    mixed = (weights @ v).transpose(1, 2).reshape(2, 197, backbone.width)
    assert (out - attn.out_proj(mixed)).abs().max() <= TOL


def test_bad_surgery_arguments(tiny_tokenizer):
    backbone = _backbone(16, tiny_tokenizer)
    pixels = torch.randn(1, 3, 224, 224)
    with pytest.raises(ValueError, match="Unknown attention variant 'qk'"):
        BlockSurgery("qk")
    with pytest.raises(ValueError, match="same layer twice"):
        backbone.forward_intermediates(pixels, surgery={2: BlockSurgery(), -1: BlockSurgery()})
    with pytest.raises(ValueError, match="output_fmt"):
        backbone.forward_intermediates(pixels, output_fmt="NHWC")


def test_deep_prompts_are_inserted_then_replaced(tiny_tokenizer):
    backbone = _backbone(16, tiny_tokenizer)
    pixels = torch.randn(2, 3, 64, 96)
    prompts = {0: torch.randn(3, backbone.width), 2: torch.randn(2, 3, backbone.width)}
    out = backbone.forward_intermediates(
        pixels, indices=[0, 1, 2], inject=TokenInjection(prompts=prompts)
    )
    x = backbone.embed(pixels)
    x = torch.cat([x[:, :1], prompts[0].expand(2, -1, -1), x[:, 1:]], dim=1)
    x, _ = backbone.block(0, x, out.grid)
    expected = [x[:, 4:]]
    x, _ = backbone.block(1, x, out.grid)  # layer 1 has no entry: the prompt outputs go on
    expected.append(x[:, 4:])
    x, _ = backbone.block(2, torch.cat([x[:, :1], prompts[2], x[:, 4:]], dim=1), out.grid)
    expected.append(x[:, 4:])
    assert out.num_prefix == 4 and out.tokens.shape == (2, 24, backbone.width)
    for got, want in zip(out.intermediates, expected, strict=True):
        assert (got - want).abs().max() <= TOL
    assert (out.hidden - x).abs().max() <= TOL


def test_masked_suffix_tokens_are_invisible_to_the_patches(tiny_tokenizer):
    backbone = _backbone(16, tiny_tokenizer)
    pixels = torch.randn(2, 3, 64, 64)
    regions = torch.randn(2, 5, backbone.width)
    tokens = 1 + 16 + 5
    mask = torch.ones(tokens, tokens, dtype=torch.bool)
    mask[:17, 17:] = False  # [CLS] and patches do not see the regions; regions see everything
    out = backbone.forward_intermediates(
        pixels, inject=TokenInjection(suffix=regions, attention_mask=mask)
    )
    plain = backbone.forward_intermediates(pixels)
    assert out.num_suffix == 5 and out.suffix.shape == (2, 5, backbone.width)
    assert (out.tokens - plain.tokens).abs().max() <= TOL
    unmasked = backbone.forward_intermediates(pixels, inject=TokenInjection(suffix=regions))
    assert (unmasked.tokens - plain.tokens).abs().max() > 1e-3
    with pytest.raises(ValueError, match="'vanilla' attention only"):
        backbone.forward_intermediates(
            pixels,
            surgery={-1: BlockSurgery("qq+kk")},
            inject=TokenInjection(suffix=regions, attention_mask=mask),
        )


def test_gradients_reach_injected_tokens_through_the_frozen_backbone(tiny_tokenizer):
    backbone = _backbone(16, tiny_tokenizer)
    prompt = torch.zeros(2, backbone.width, requires_grad=True)
    out = backbone.forward_intermediates(
        torch.randn(1, 3, 32, 32), inject=TokenInjection(prompts={0: prompt})
    )
    backbone.project(out.tokens).square().sum().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


def test_position_cache_follows_the_weights(tiny_tokenizer):
    backbone = _backbone(16, tiny_tokenizer)
    before = backbone.position_embedding((3, 5)).clone()
    with torch.no_grad():
        backbone.vision.embeddings.position_embedding.weight.mul_(2)
    after = backbone.position_embedding((3, 5))
    assert torch.allclose(after, 2 * before, atol=1e-5)


def test_position_rounding_rounds_the_resized_positions_only(tiny_tokenizer):
    backbone = _backbone(16, tiny_tokenizer)
    pixels = torch.randn(1, 3, 48, 80)
    vision = backbone.vision
    patches = vision.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
    tokens = torch.cat([vision.embeddings.class_embedding.expand(1, 1, -1), patches], dim=1)
    positions = backbone.position_embedding((3, 5))
    expected = vision.pre_layrnorm(tokens + positions.half().float())
    rounded = backbone.embed(pixels, position_rounding=torch.float16)
    assert (rounded - expected).abs().max() <= TOL
    assert (rounded - backbone.embed(pixels)).abs().max() > 0
    assert torch.equal(backbone.position_embedding((3, 5)), positions)  # the table is untouched


def test_frozen_weights_are_cast_once_with_autocasts_values(tiny_tokenizer):
    backbone = _backbone(16, tiny_tokenizer)
    linear = backbone.layers[0].mlp.fc1
    x = torch.randn(2, 5, backbone.width)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.inference_mode():
            first = backbone._linear(linear, x)
        assert torch.equal(first, linear(x)) and first.dtype == torch.bfloat16
        cast = backbone._cast_weights(linear, torch.bfloat16)[0]
        assert cast is backbone._cast_weights(linear, torch.bfloat16)[0]  # kept, not redone
        tokens = torch.randn(2, 5, backbone.width, requires_grad=True)
        backbone._linear(linear, tokens).float().sum().backward()  # cast under inference_mode
        assert tokens.grad is not None
        with torch.no_grad():
            linear.weight.mul_(2)
        assert torch.equal(backbone._linear(linear, x), linear(x))  # renewed after the change
    assert torch.equal(backbone._linear(linear, x), linear(x))  # fp32 outside autocast


def test_bf16_embeds_a_one_patch_wide_grid_as_fp32_does(tiny_tokenizer):
    """oneDNN's AMX bf16 convolution got grids one patch wide and >= 5 tall wrong (by the
    patches' own size; found as NaN scores in whole-image mode): they embed in float32."""
    backbone = _backbone(16, tiny_tokenizer)
    pixels = torch.randn(2, 3, 160, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = backbone.embed(pixels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = backbone.embed(pixels)
    torch.testing.assert_close(bf16.float(), fp32, atol=0.05, rtol=0)
