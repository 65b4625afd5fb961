"""CLIP-RC: the region attention mask against a direct construction for several grids, the
mask applied in every layer, the region-averaged masks and the recovery loss against a direct
computation."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip

from zegkit.backbone import ClipBackbone
from zegkit.methods import create_method
from zegkit.methods.clip_rc import patch_regions, region_attention_mask
from zegkit.text import encode_vocabulary


@pytest.fixture(scope="module")
def backbone(tiny_tokenizer):
    return ClipBackbone(make_tiny_clip(16), tiny_tokenizer, "tiny")


def _direct_mask(prefix, grid, region_grid):
    h, w = grid
    rows, columns = region_grid
    patches = [(i, j) for i in range(h) for j in range(w)]
    region_of = [int(i * rows / h) * columns + int(j * columns / w) for i, j in patches]
    count = rows * columns
    kinds = ["prefix"] * prefix + ["patch"] * len(patches) + ["region"] * count
    total = len(kinds)
    mask = torch.zeros(total, total, dtype=torch.bool)
    for a in range(total):
        for b in range(total):
            if kinds[a] in ("prefix", "patch") and kinds[b] in ("prefix", "patch"):
                mask[a, b] = True
            elif kinds[a] == "patch" and kinds[b] == "region":
                mask[a, b] = region_of[a - prefix] == b - prefix - len(patches)
            elif kinds[a] == "region" and kinds[b] == "patch":
                mask[a, b] = region_of[b - prefix] == a - prefix - len(patches)
            elif kinds[a] == "region" and kinds[b] == "region":
                mask[a, b] = a == b
    return mask


@pytest.mark.parametrize("grid", [(4, 4), (14, 14), (5, 7), (32, 32), (3, 9)])
def test_region_mask_matches_direct_construction(grid):
    for prefix, region_grid in ((1, (4, 4)), (11, (2, 3))):
        expected = _direct_mask(prefix, grid, region_grid)
        assert torch.equal(region_attention_mask(prefix, grid, region_grid), expected)


def test_regions_split_the_grid_into_equal_bands():
    assert patch_regions((4, 4), (2, 2)).view(4, 4).tolist() == [
        [0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def _built(backbone, **settings):
    torch.manual_seed(0)
    method = create_method("clip_rc", prompt_tokens=2, decoder_heads=2, dropout=0.0,
                           prompt_dropout=0.0, region_grid=(2, 2), **settings)
    method.build(backbone)
    return method


def test_region_tokens_attend_only_within_their_region_in_every_layer(backbone):
    method = _built(backbone).eval()
    pixels = torch.randn(1, 3, 64, 64)
    injection = method.injection(method.region_injection(backbone, pixels))
    out = backbone.forward_intermediates(pixels, indices=[], inject=injection,
                                         return_attention=range(backbone.num_layers))
    allowed = region_attention_mask(3, (4, 4), (2, 2))  # [CLS] + 2 prompts
    for weights in out.attention.values():
        assert weights.shape[-1] == allowed.shape[0]
        assert torch.all(weights[..., ~allowed] == 0)
        assert torch.all(weights[..., allowed] > 0)


def test_region_tokens_start_from_cls_and_freeze_as_released(backbone):
    embeddings = backbone.vision.embeddings
    cls = embeddings.class_embedding + embeddings.position_embedding.weight[0]
    method = _built(backbone)
    torch.testing.assert_close(method.region_tokens, cls.expand(4, -1))
    assert method.region_tokens.requires_grad
    assert not _built(backbone, region_tokens="frozen").region_tokens.requires_grad


def test_recovery_loss_and_region_average_match_direct_computation(backbone):
    method = _built(backbone, recovery_weight=2.0).train()
    text = encode_vocabulary(backbone, ["red", "green", "blue"], templates="single",
                             use_cache=False)
    pixels = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    logits, auxiliary = method.decode(backbone, pixels, text.embeddings)

    # The same pass written out step by step.
    patches, g, regions, grid = method.encode(backbone, pixels)
    t = text.embeddings
    inputs = torch.stack([
        torch.cat([(regions[:, r, None] + g[:, None]) * t, t.expand(2, -1, -1)], dim=-1)
        for r in range(4)
    ], dim=1)  # (B, R, K, 2D)
    queries = method.query_proj.proj(inputs).flatten(1, 2)
    region_map = F.interpolate(regions.transpose(1, 2).reshape(2, -1, 2, 2), size=grid,
                               mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    visual = method.visual_proj(torch.cat([region_map, g[:, None].expand_as(patches), patches],
                                          dim=-1))
    for layer in method.decoder:
        queries, visual = layer(queries, visual)
    per_region = torch.einsum("bqd,bnd->bqn", queries, visual).view(2, 4, 3, -1)
    torch.testing.assert_close(logits, per_region.mean(dim=1).view(2, 3, *grid))
    recovered_q, recovered_v = method.recovery(queries, visual)
    direct = ((recovered_q - inputs.flatten(1, 2)).abs().mean()
              + (recovered_v - patches).abs().mean())
    torch.testing.assert_close(auxiliary["recovery"], 2.0 * direct)
    assert method.eval().decode(backbone, pixels, text.embeddings)[1] == {}
