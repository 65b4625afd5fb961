"""CLIPer: the early-layer fusion against a direct computation of its formula on a tiny CLIP, and
the Stable Diffusion self-attention refiner on a tiny random UNet / VAE."""

import gc
import math
import sys
from functools import reduce

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny_sd import TINY_HEADS, TINY_LAYERS, save_tiny_random_pipeline, tiny_unet, tiny_vae

from zegkit.backbone import ClipBackbone, load_clip
from zegkit.methods.cliper import CLIPer, CLIPerConfig
from zegkit.refine import create_refiner
from zegkit.refine.diffusion import (
    SD_MODEL,
    DiffusionRefiner,
    DiffusionRefinerConfig,
    SelfAttentionRecorder,
    compensate,
    diffusers_available,
    propagation_matrices,
)
from zegkit.scores import Activation, DenseScores

TOL = 1e-5


class Text:
    """The part of TextEmbeddings a method reads."""

    def __init__(self, rows):
        self.embeddings = rows


@pytest.fixture(scope="module")
def backbone(tiny_clip_dir):
    return load_clip(str(tiny_clip_dir))


@pytest.fixture(scope="module")
def text(backbone):
    torch.manual_seed(3)
    return Text(F.normalize(torch.randn(5, backbone.embed_dim), dim=-1))


# ---- the fusion, written out from transformers' modules ------------------------------------------
def _heads(x, linear, heads):
    batch, tokens, width = x.shape
    return linear(x).view(batch, tokens, heads, width // heads).transpose(1, 2)


def _symmetric(a):
    a = 0.5 * (a + a.transpose(2, 3))
    a = torch.relu(a - a.mean(dim=2, keepdim=True))
    return a / a.sum(dim=3, keepdim=True)


def _direct_fusion(backbone, pixels, variant="paper"):
    """(N, B, h*w, D) normalised outputs and the attention of the last pass (B, heads, T, T).

    "released": each early embedding through its own layer_norm1 first, and the column/row
    balancing of the mean attention accumulated pass after pass, as the code's in-place division.
    """
    vision = backbone.model.vision_model
    heads = backbone.num_heads
    table = vision.embeddings.position_embedding.weight
    original = table.detach().clone()
    with torch.no_grad():
        if variant == "released":  # the code keeps its position embeddings in float16
            table.copy_(table.half().float())
        try:
            hidden = vision(
                pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True
            ).hidden_states  # F^0 .. F^N
        finally:
            table.copy_(original)
    layers = vision.encoder.layers
    n_layers = len(layers)
    maps = []
    for n in range(n_layers - 1):  # every early layer: CLIP's own q-k attention on LN1(F^n)
        y = layers[n].layer_norm1(hidden[n])
        q, k = (
            _heads(y, layers[n].self_attn.q_proj, heads),
            _heads(y, layers[n].self_attn.k_proj, heads),
        )
        maps.append((q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1))
    m = torch.stack(maps).mean(0)
    passes = []
    for _ in range(n_layers):
        balanced = m / m.sum(dim=2, keepdim=True)  # columns sum to 1
        balanced = balanced / balanced.sum(dim=3, keepdim=True)  # rows sum to 1
        passes.append(_symmetric(balanced))
        if variant == "released":
            m = balanced
    if variant == "paper":
        passes = [passes[0]] * n_layers
    last = layers[-1]
    outputs = []
    for n in range(n_layers):
        a = passes[n]
        x = hidden[n]
        if variant == "released" and n < n_layers - 1:
            x = layers[n].layer_norm1(x)
        v = _heads(last.layer_norm1(x), last.self_attn.v_proj, heads)
        o = last.self_attn.out_proj((a @ v).transpose(1, 2).reshape(x.shape))  # no residual, FFN
        z = backbone.model.visual_projection(vision.post_layernorm(o[:, 1:]))
        outputs.append(F.normalize(z, dim=-1))
    return torch.stack(outputs), a


def _direct_coarse(backbone, pixels, rows, scale=100.0, layer=-1, threshold=0.2, **kwargs):
    z, a = _direct_fusion(backbone, pixels, **kwargs)
    maps = (scale * z @ rows.T).softmax(-1)  # (N, B, h*w, Q)
    if layer is None:
        return maps.mean(0)
    chosen = maps[layer]
    chosen = chosen * (chosen >= threshold * chosen.max(dim=1, keepdim=True).values)
    patches = a.mean(1)[:, 1:, 1:]
    if kwargs.get("variant", "paper") == "paper":
        return maps.mean(0) + patches @ chosen
    maps = maps.clone()
    maps[layer] = chosen  # the code thresholds the selected map in place, before the mean
    return maps.mean(0) + patches.transpose(1, 2) @ chosen


@pytest.mark.parametrize("variant", ["paper", "released"])
@pytest.mark.parametrize("layer", [-1, 0, None])
def test_coarse_map_follows_the_formula(backbone, text, variant, layer):
    # the released variant rounds the resized positions through float16; at the native grid the
    # direct computation (which can only round the table before transformers resizes it) agrees
    height = 160 if variant == "paper" else 224
    torch.manual_seed(0)  # unseeded inputs made the 1e-5 bound flaky (1.1e-5 seen once in CI)
    pixels = torch.randn(2, 3, height, 224)
    method = CLIPer(CLIPerConfig(variant=variant, propagate_layer=layer))
    probabilities = method(backbone, pixels, text)
    assert probabilities.shape == (2, 5, height // 16, 14)
    assert method.activation() == Activation("identity") and method.rows == "classes"
    expected = _direct_coarse(backbone, pixels, text.embeddings, layer=layer, variant=variant)
    expected = expected.transpose(1, 2).reshape(2, 5, height // 16, 14)
    expected = expected / expected.sum(1, keepdim=True)
    assert (probabilities - expected).abs().max() <= TOL


def test_the_two_variants_differ(backbone, text):
    pixels = torch.randn(1, 3, 224, 224)
    paper = CLIPer(CLIPerConfig())(backbone, pixels, text)
    released = CLIPer(CLIPerConfig(variant="released"))(backbone, pixels, text)
    assert (paper - released).abs().max() > 1e-3


def test_fused_attention_and_dense_features(backbone):
    pixels = torch.randn(1, 3, 224, 224)
    method = CLIPer(CLIPerConfig())
    features, attention = method.fused_features(backbone, pixels)
    z, a = _direct_fusion(backbone, pixels)
    assert (attention - a).abs().max() <= TOL
    assert (features - z).abs().max() <= TOL
    assert torch.allclose(attention.sum(-1), torch.ones(attention.shape[:-1]), atol=1e-5)
    assert (attention >= 0).all()
    dense = method.dense_features(backbone, pixels)
    expected = F.normalize(z.mean(0), dim=-1).transpose(1, 2).reshape(1, -1, 14, 14)
    assert dense.shape == (1, backbone.embed_dim, 14, 14)
    assert (dense - expected).abs().max() <= TOL


@pytest.mark.parametrize("variant, maps", [("paper", [1, 1, 1]), ("released", [2, 2, 2])])
def test_the_passes_hold_few_attention_maps(backbone, text, variant, maps):
    """Attention maps alive while each pass projects its values: the paper variant's one
    normalised map (the mean is normalised in place and dropped; 2 before); the released
    variant's running balanced map and its pass's affinity (3 before: the previous pass's was
    still held by the loops, zip and enumerate keeping their last pair)."""
    alive = []

    def count_attention_maps(*_):
        shape = (1, backbone.num_heads, 197, 197)
        alive.append(sum(isinstance(o, torch.Tensor) and o.shape == shape
                         for o in gc.get_objects()))

    hook = backbone.layers[-1].self_attn.v_proj.register_forward_hook(count_attention_maps)
    CLIPer(CLIPerConfig(variant=variant))(backbone, torch.randn(1, 3, 224, 224), text)
    hook.remove()
    assert alive == maps


def test_outputs_are_probabilities_also_under_autocast(backbone, text):
    method = CLIPer(CLIPerConfig(normalize_attention=False))
    probabilities = method(backbone, torch.randn(1, 3, 224, 176), text)
    assert probabilities.shape == (1, 5, 14, 11)
    assert (probabilities >= 0).all()
    torch.testing.assert_close(probabilities.sum(1), torch.ones(1, 14, 11))
    assert not list(method.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probabilities = method(backbone, torch.randn(1, 3, 224, 176), text)
    assert probabilities.dtype == torch.float32 and torch.isfinite(probabilities).all()


def test_config_errors_list_the_choices(backbone, text, tiny_tokenizer):
    with pytest.raises(ValueError, match="'released'"):
        CLIPerConfig(variant="code")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        CLIPerConfig(propagate_threshold=1.5)
    with pytest.raises(ValueError, match="diffusion_threshold"):
        CLIPerConfig(diffusion_threshold=-0.1)
    with pytest.raises(ValueError, match="propagate_layer=7"):
        CLIPer(CLIPerConfig(propagate_layer=7))(backbone, torch.randn(1, 3, 224, 224), text)
    from conftest import make_tiny_clip

    single = ClipBackbone(make_tiny_clip(16, layers=1), tiny_tokenizer, "one-layer")
    with pytest.raises(ValueError, match="1 layer"):
        CLIPer(CLIPerConfig()).dense_features(single, torch.randn(1, 3, 224, 224))


# ---- the diffusion refiner on tiny random diffusers models ---------------------------------------
# `diffusers` is optional (zegkit[diffusion]); without it only the tests below that need it skip.
requires_diffusers = pytest.mark.skipif(
    not diffusers_available(), reason="needs the optional dependency diffusers"
)

TINY_GRID = 16  # latent grid of a 32 x 32 image under the tiny VAE


def _config(**overrides):
    return DiffusionRefinerConfig(**{"layers": TINY_LAYERS, "image_size": 32, **overrides})


@pytest.fixture(scope="module")
def refiner():
    import diffusers

    torch.manual_seed(2)
    prompt = torch.randn(1, 7, 32)
    return DiffusionRefiner(
        tiny_unet(),
        tiny_vae(),
        diffusers.DDPMScheduler().alphas_cumprod,
        prompt,
        _config(),
    )


@requires_diffusers
def test_recorder_keeps_the_unet_output_and_records_probabilities():
    unet = tiny_unet()
    torch.manual_seed(4)
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with torch.no_grad():
        reference = unet(sample, 10, encoder_hidden_states=context).sample
        store = {}
        processors = dict(unet.attn_processors)
        processors[f"{TINY_LAYERS[0]}.processor"] = SelfAttentionRecorder("a", store)
        unet.set_attn_processor(processors)
        recorded = unet(sample, 10, encoder_hidden_states=context).sample
    assert (recorded - reference).abs().max() <= 1e-5
    assert store["a"].shape == (2, TINY_HEADS, TINY_GRID**2, TINY_GRID**2)
    assert torch.allclose(store["a"].sum(-1), torch.ones(2, TINY_HEADS, TINY_GRID**2), atol=1e-5)


@requires_diffusers
def test_attention_maps_have_the_latent_grid(refiner):
    maps = refiner.attention_maps(torch.rand(2, 3, 40, 48))
    assert len(maps) == 2
    for layer_maps in maps:
        assert layer_maps.shape == (2, TINY_HEADS, TINY_GRID**2, TINY_GRID**2)
        assert torch.allclose(layer_maps.sum(-1), torch.ones(layer_maps.shape[:-1]), atol=1e-5)
    again = refiner.attention_maps(torch.rand(2, 3, 40, 48))
    assert not torch.equal(maps[0], again[0])  # another image, other maps


def _direct_matrices(maps, threshold):
    """Each head's map: divided by its column maxima + 1e-5, thresholded, rows normalised."""
    out = []
    for layer_maps in maps:
        for h in range(layer_maps.shape[1]):
            m = layer_maps[:, h].float()
            m = m / (m.max(dim=1, keepdim=True).values + 1e-5)
            m = m * (m >= threshold)
            out.append(m / (m.sum(dim=2, keepdim=True) + 1e-5))
    return out


@requires_diffusers
def test_refinement_is_the_product_of_the_maps(refiner):
    image = torch.rand(1, 3, TINY_GRID, TINY_GRID)  # output grid = latent grid: no resizing
    scores = torch.rand(1, 3, TINY_GRID, TINY_GRID)
    maps = refiner.attention_maps(image)
    matrices = _direct_matrices(maps, 0.2)
    assert len(matrices) == 2 * TINY_HEADS
    product = reduce(torch.matmul, matrices)  # M_1 M_2 ... M_m, (1, n, n)
    expected = (product @ scores.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(scores.shape)
    refined = refiner(image, DenseScores(scores, Activation("identity")))
    assert refined.values.shape == scores.shape and refined.activation == Activation("identity")
    assert (refined.values - expected).abs().max() <= 1e-5
    ours = propagation_matrices(maps, 0.2)
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(ours, matrices, strict=True))
    mean = compensate(ours, scores, "mean")
    expected_mean = torch.stack(matrices).mean(0) @ scores.flatten(2).transpose(1, 2)
    assert (mean - expected_mean.transpose(1, 2).reshape(scores.shape)).abs().max() <= 1e-5


@requires_diffusers
def test_softmax_scores_are_refined_as_their_probabilities(refiner):
    image = torch.rand(1, 3, TINY_GRID, TINY_GRID)
    logits = torch.randn(1, 4, TINY_GRID, TINY_GRID) * 0.1
    out = refiner(image, DenseScores(logits, Activation("softmax", 50.0), rows="classes"))
    assert out.activation == Activation("identity") and out.rows == "classes"
    probabilities = DenseScores((50.0 * logits).softmax(1), Activation("identity"))
    torch.testing.assert_close(out.values, refiner(image, probabilities).values)


@requires_diffusers
def test_refiner_input_errors(refiner):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        refiner(torch.randn(1, 3, 16, 16) * 2, _identity(torch.rand(1, 2, 16, 16)))
    with pytest.raises(ValueError, match="batch"):
        refiner(torch.rand(3, 16, 16), _identity(torch.rand(1, 2, 16, 16)))
    with pytest.raises(ValueError, match="attn2"):  # a cross-attention layer: valid ones listed
        DiffusionRefiner(
            tiny_unet(),
            tiny_vae(),
            torch.linspace(0.99, 0.01, 1000),
            torch.zeros(1, 7, 32),
            _config(layers=("up_blocks.1.attentions.0.transformer_blocks.0.attn2",)),
        )
    with pytest.raises(ValueError, match="aggregation"):
        _config(aggregation="selection")


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny components saved in diffusers' layout, as a downloaded SD model would be."""
    return save_tiny_random_pipeline(tmp_path_factory.mktemp("tiny-sd"), tiny_tokenizer)


@requires_diffusers
def test_from_pretrained_loads_a_local_model(tiny_sd_dir):
    refiner = DiffusionRefiner.from_pretrained(_config(model=str(tiny_sd_dir)))
    assert refiner.prompt_embeds.shape == (1, 77, 32)
    image, scores = torch.rand(1, 3, 24, 24), _identity(torch.rand(1, 2, 24, 24))
    first, second = refiner(image, scores), refiner(image, scores)
    assert first.values.shape == (1, 2, 24, 24)
    assert torch.equal(first.values, second.values)  # seeded noise: reproducible


@requires_diffusers
def test_from_pretrained_errors_name_what_to_download(tmp_path, tiny_sd_dir, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DiffusionRefiner.from_pretrained(_config(model=str(tmp_path / "missing")))
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="vae"):
        DiffusionRefiner.from_pretrained(_config(model=str(tmp_path / "partial")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(RuntimeError, match="hf download zegkit-test/no-such-sd"):
        DiffusionRefiner.from_pretrained(_config(model="zegkit-test/no-such-sd"))


@requires_diffusers
def test_cliper_names_its_refiner_and_both_compose(backbone, text, tiny_sd_dir):
    method = CLIPer(CLIPerConfig(diffusion_model=str(tiny_sd_dir), diffusion_threshold=0.1))
    [(name, options)] = method.refiners()
    assert name == "diffusion" and options == {"model": str(tiny_sd_dir), "threshold": 0.1}
    refiner = create_refiner(name, **options, layers=TINY_LAYERS, image_size=32)
    assert isinstance(refiner, DiffusionRefiner) and refiner.config.threshold == 0.1
    image = torch.rand(1, 3, 224, 224)
    coarse = method(backbone, backbone.normalize(image), text)
    coarse = F.interpolate(coarse, size=(224, 224), mode="bilinear")
    refined = refiner(image, DenseScores(coarse, method.activation(), method.rows))
    assert refined.values.shape == (1, 5, 224, 224)
    assert torch.isfinite(refined.values).all()
    assert CLIPer(CLIPerConfig(compensation=False)).refiners() == ()
    assert CLIPerConfig().diffusion_model == SD_MODEL


def test_compensation_without_diffusers_says_how_to_fix_it(monkeypatch, backbone, text):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails
    assert not diffusers_available()
    with pytest.raises(RuntimeError, match=r"zegkit\[diffusion\].*compensation=False"):
        CLIPer(CLIPerConfig()).refiners()
    fusion_only = CLIPer(CLIPerConfig(compensation=False))
    assert fusion_only.refiners() == ()
    assert torch.isfinite(fusion_only(backbone, torch.randn(1, 3, 224, 224), text)).all()
    with pytest.raises(RuntimeError, match=r"zegkit\[diffusion\]"):
        DiffusionRefiner.from_pretrained(_config())


def test_compensation_without_weights_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises((RuntimeError, FileNotFoundError), match="compensation=False"):
        CLIPer(CLIPerConfig(diffusion_model="zegkit-test/no-such-sd")).refiners()


def _identity(values):
    return DenseScores(values, Activation("identity"))
