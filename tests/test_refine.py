"""PAMR against a loop-by-loop computation of the paper's formula, plus shapes, dtypes and edges."""

import math

import pytest
import torch

from zegkit.refine import (
    REFINERS,
    create_refiner,
    list_refiners,
    parse_refine_chain,
)
from zegkit.refine.base import NoRefine
from zegkit.refine.pamr import PAMR, local_affinity
from zegkit.scores import Activation, DenseScores

SOFTMAX = Activation("softmax", 40.0)


def _scores(values, activation=SOFTMAX):
    return DenseScores(values, activation)

OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def naive_pamr(image, mask, num_iter, dilations):
    """Explicit loops over pixels and neighbours; borders clamp (= replicate padding)."""
    _, channels, h, w = image.shape
    img = image[0].double().tolist()

    def px(c, y, x):
        return img[c][min(max(y, 0), h - 1)][min(max(x, 0), w - 1)]

    weights = {}
    for y in range(h):
        for x in range(w):
            neigh = [(y + dy * d, x + dx * d) for d in dilations for dy, dx in OFFSETS]
            window = [p for d in dilations for p in
                      [(y + dy * d, x + dx * d) for dy, dx in OFFSETS] + [(y, x)]]
            aff = [0.0] * len(neigh)
            for c in range(channels):
                vals = [px(c, *p) for p in window]
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
                for j, p in enumerate(neigh):
                    aff[j] += -abs(px(c, *p) - img[c][y][x]) / (1e-8 + 0.1 * std) / channels
            top = max(aff)
            exp = [math.exp(a - top) for a in aff]
            weights[y, x] = [(p, e / sum(exp)) for p, e in zip(neigh, exp, strict=True)]

    m = mask[0].double().tolist()
    k = len(m)
    for _ in range(num_iter):
        new = [[[0.0] * w for _ in range(h)] for _ in range(k)]
        for y in range(h):
            for x in range(w):
                for (ny, nx), wt in weights[y, x]:
                    ny, nx = min(max(ny, 0), h - 1), min(max(nx, 0), w - 1)
                    for c in range(k):
                        new[c][y][x] += wt * m[c][ny][nx]
        m = new
    return torch.tensor(m, dtype=torch.float64).unsqueeze(0)


@pytest.mark.parametrize("dilations", [(1,), (1, 2), (8, 16)])
def test_pamr_matches_naive_loops(dilations):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 6, 7, generator=gen)
    logits = torch.randn(1, 4, 6, 7, generator=gen)
    expected = naive_pamr(image, logits, num_iter=3, dilations=dilations)
    got = PAMR(num_iter=3, dilations=dilations)(image, _scores(logits)).values
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_affinity_is_a_distribution_over_neighbours():
    weights = local_affinity(torch.rand(2, 3, 5, 9), (1, 3))
    assert weights.shape == (2, 16, 5, 9)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 5, 9))


def test_shapes_dtype_activation_and_probabilities_stay_probabilities():
    image = torch.rand(2, 3, 20, 24)
    probs = torch.randn(2, 5, 20, 24).softmax(1).to(torch.bfloat16)
    out = PAMR()(image, _scores(probs, Activation("identity")))
    assert out.values.shape == probs.shape and out.values.dtype == torch.bfloat16
    assert out.activation == Activation("identity") and out.rows == "synonyms"
    torch.testing.assert_close(out.values.float().sum(1), torch.ones(2, 20, 24), atol=2e-2, rtol=0)


def test_commutes_with_logit_scale_and_image_normalisation():
    image, logits = torch.rand(1, 3, 12, 12), torch.randn(1, 3, 12, 12)
    pamr = PAMR(num_iter=5, dilations=(1, 2))
    base = pamr(image, _scores(logits)).values
    scaled = pamr(image, _scores(40 * logits)).values
    torch.testing.assert_close(scaled, 40 * base, rtol=1e-4, atol=1e-4)
    mean = torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1)
    std = torch.tensor([0.27, 0.26, 0.28]).view(1, 3, 1, 1)
    normalised = pamr((image - mean) / std, _scores(logits)).values
    torch.testing.assert_close(normalised, base, rtol=1e-4, atol=1e-4)


def test_mask_snaps_to_a_sharp_colour_edge():
    # Dark left half (columns 0-7), bright right half (8-15); the mask's boundary sits at column 5.
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:] = 1.0
    logits = torch.zeros(1, 2, 16, 16)
    logits[:, 0, :, :5] = 1.0
    logits[:, 1, :, 5:] = 1.0
    before = logits.argmax(1)
    after = PAMR(num_iter=10, dilations=(1, 2))(image, _scores(logits)).values.argmax(1)
    edge = torch.zeros(1, 16, 16, dtype=torch.long)
    edge[..., 8:] = 1
    assert (before != edge).any()
    assert torch.equal(after, edge)


def test_zero_iterations_and_none_refiner_are_identities():
    image, logits = torch.rand(1, 3, 6, 7), torch.randn(1, 2, 6, 7)
    torch.testing.assert_close(PAMR(num_iter=0)(image, _scores(logits)).values, logits)
    scores = _scores(logits)
    assert create_refiner("none")(image, scores) is scores
    assert isinstance(create_refiner("none"), NoRefine)


def test_registry_chains_and_errors():
    assert sorted(REFINERS) == ["diffusion", "none", "pamr"] == sorted(list_refiners())
    assert create_refiner("pamr", num_iter=None).num_iter == 10
    assert create_refiner("pamr").dilations == (8, 16)
    assert parse_refine_chain("none") == []
    assert parse_refine_chain("diffusion + pamr") == ["diffusion", "pamr"]
    with pytest.raises(ValueError, match="Unknown refiner"):
        parse_refine_chain("pamr+crf")
    with pytest.raises(ValueError, match=r"choose one of \['diffusion', 'none', 'pamr'\]"):
        create_refiner("crf")
    with pytest.raises(ValueError, match="num_iter"):
        PAMR(num_iter=-1)
    with pytest.raises(ValueError, match="dilations"):
        PAMR(dilations=())
    with pytest.raises(ValueError, match="valid options are"):
        create_refiner("pamr", radius=3)
    with pytest.raises(ValueError, match="unsqueeze"):
        PAMR()(torch.rand(3, 8, 8), _scores(torch.rand(1, 2, 8, 8)))
    with pytest.raises(ValueError, match="batch"):
        PAMR()(torch.rand(2, 3, 8, 8), _scores(torch.rand(1, 2, 8, 8)))
