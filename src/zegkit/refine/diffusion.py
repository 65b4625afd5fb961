"""The ``"diffusion"`` refiner: fine-grained compensation with Stable Diffusion self-attention
(CLIPer's second stage).

Paper: Sun et al., "CLIPer: Hierarchically Improving Spatial Representation of CLIP for
Open-Vocabulary Semantic Segmentation", ICCV 2025 (arXiv 2411.13836), fine-grained compensation.
Public code: linsun449/cliper.code @ 85fbe81 (`ovs/pipeline.py::Pipeline.refinement` "SFSA",
`diffusion_model/stable_diffusion.py`, `diffusion_model/Processor.py`).

How it works. The image is stretched to 512 x 512, encoded by the VAE (posterior mean times the
VAE's scaling factor), noised once to timestep t (101: index 45 of SD 2.1 base's 50-step PNDM
schedule, the code's `time_step=45`), and passed once through the UNet with the empty prompt. A
recording attention processor (diffusers' processor API, no patching) keeps the self-attention
probabilities (B, heads, n, n) of the chosen layers: by default the first two self-attention layers
of the last up block, at the 64 x 64 latent resolution (the code's DIFFUSION_LAYERS[-4], [-6]).
Every head's map M is rescaled by its column maxima, thresholded and row-normalised,

    M <- M / (max_i M[i, :] + 1e-5),  M[M < threshold] = 0,  M <- M / (sum_j M[:, j] + 1e-5),

and the maps, in layer order then head order, act on the class probabilities S (n, R) resized to
the latent grid as one product: S_f = M_1 M_2 ... M_m S (the paper: multiplying the heads' maps;
"mean" uses the average map instead).

Contract (`zegkit.refine.base`): ``refiner(images in [0, 1], scores) -> DenseScores``. The scores
become probabilities by their own activation (`DenseScores.probabilities`), are compensated, and
come back as probabilities, DenseScores(refined, Activation("identity"), same rows), at the
images' resolution. So it can follow any method: CLIPer's coarse map (probabilities already), or
softmax(s · cos) of SCLIP. `diffusers` is an optional dependency (`pip install zegkit[diffusion]`),
imported only when weights are loaded; this module imports without it.

Precision: the UNet, VAE and text encoder run in the dtype they are loaded with (the Segmenter's
precision; the code runs SD in float16). The noise schedule, the normalisation of the attention
maps and their product with the probabilities run in float32: products of ten row-stochastic
4096 x 4096 maps lose the small entries in half precision.

Deviations from the code: the noise is seeded; the image is resized bilinearly with antialiasing
(the code's tensor preprocessing resizes by nearest neighbour); scores at image resolution are
resized to the latent grid with antialiasing; the product is applied right to left to the scores
(m matrix-score products instead of m - 1 n x n matrix products; the same result).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from zegkit.backbone.loading import hub_offline
from zegkit.inference import resize
from zegkit.refine.base import check_refiner_inputs
from zegkit.scores import Activation, DenseScores

SD_MODEL = "stabilityai/stable-diffusion-2-1-base"  # code default `--sd-version v2.1`
SD_IMAGE_SIZE = 512  # `image_processor.preprocess(img, height=512, width=512)`
SD_TIMESTEP = 101  # scheduler.timesteps[45] of SD 2.1 base's PNDM schedule with 50 steps
SELF_ATTENTION_LAYERS = (  # DIFFUSION_LAYERS[-4], [-6] of the code, in its product order
    "up_blocks.3.attentions.1.transformer_blocks.0.attn1",
    "up_blocks.3.attentions.0.transformer_blocks.0.attn1",
)
# `attention_thr` of the code's ViT-B/16 Context / Context59 / Object / Stuff / ADE configs
# (scripts/config/vit-b-16/*.yaml @ 85fbe81; VOC 0.1, Cityscapes 0.35). One key sets both of
# CLIPer's thresholds: this refiner's and the propagation of its coarse map.
ATTENTION_THRESHOLD = 0.2
MAP_EPS = 1e-5  # added to column maxima and row sums in `Pipeline.refinement`
AGGREGATIONS = ("product", "mean")  # the code's "SFSA" (default) and "mean"
SUBFOLDERS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
PIXEL_TOLERANCE = 1e-3  # slack on the [0, 1] range check of images


def diffusers_available() -> bool:
    """Whether the optional dependency `diffusers` can be imported."""
    try:
        importlib.import_module("diffusers")
    except ImportError:
        return False
    return True


def _import_diffusers():
    try:
        return importlib.import_module("diffusers")
    except ImportError:
        raise RuntimeError(
            "The diffusion refiner needs `diffusers`, which is not installed. Install it with "
            "`pip install zegkit[diffusion]` (or `pip install diffusers`)."
        ) from None


@dataclass
class DiffusionRefinerConfig:
    """Settings of the Stable Diffusion self-attention refiner.

    Attributes:
        model: hub id or local directory in diffusers layout (subfolders unet/, vae/, scheduler/,
            text_encoder/, tokenizer/); the paper uses SD 2.1 base.
        layers: UNet self-attention layers (module names, `attn1`) whose maps are multiplied, in
            product order (the code's up_blocks[3] attentions 1 then 0, 64 x 64 latent grid).
            All must work on the same number of tokens.
        timestep: diffusion timestep of the single noising step (code: 101).
        image_size: side of the square the image is stretched to before the VAE (code: 512).
        threshold: map entries below this, after the column-max rescaling, are zeroed (code
            `attention_thr`: 0.2 for most ViT-B/16 datasets, 0.1 for VOC, 0.35 for Cityscapes).
        aggregation: "product" of all heads' maps (paper) or their "mean".
        prompt: text prompt of the UNet pass (code: empty).
        seed: seed of the noise, so a refinement is reproducible (the code's noise is unseeded).
    """

    model: str = SD_MODEL
    layers: tuple[str, ...] = field(default_factory=lambda: SELF_ATTENTION_LAYERS)
    timestep: int = SD_TIMESTEP
    image_size: int = SD_IMAGE_SIZE
    threshold: float = ATTENTION_THRESHOLD
    aggregation: str = "product"
    prompt: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        if not self.layers:
            raise ValueError("layers must name at least one UNet self-attention layer.")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}."
            )
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}.")
        if self.image_size < 8 or self.image_size % 8:
            raise ValueError(
                f"image_size must be a positive multiple of 8 (the VAE's stride), got "
                f"{self.image_size}."
            )
        if self.timestep < 0:
            raise ValueError(f"timestep must be >= 0, got {self.timestep}.")


class SelfAttentionRecorder:
    """A diffusers attention processor that computes attention as usual and records its
    probabilities, (B, heads, queries, keys), in `store[name]`.

    Args:
        name: the key under which this layer's probabilities are stored.
        store: the dictionary shared with the owner (e.g. a DiffusionRefiner).
    """

    def __init__(self, name: str, store: dict[str, Tensor]) -> None:
        self.name = name
        self.store = store

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.dim() == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)  # (B, h*w, C)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(
            attention_mask, context.shape[1], hidden_states.shape[0]
        )
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
            if encoder_hidden_states is None:
                context = hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, n, d)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probabilities = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, n, m)
        self.store[self.name] = probabilities.unflatten(0, (-1, attn.heads))
        out = attn.batch_to_head_dim(probabilities @ value)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if spatial:
            out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def propagation_matrices(maps: Sequence[Tensor], threshold: float) -> list[Tensor]:
    """The code's per-head normalisation of recorded self-attention maps.

    Args:
        maps: per layer, probabilities (B, heads, n, n).
        threshold: entries below it (after dividing each column by its max) are zeroed.

    Returns:
        Per layer and head, in that order, matrices (B, n, n) in float32 whose rows sum to ~1.
    """
    matrices = []
    for layer_maps in maps:
        for head in layer_maps.float().unbind(1):  # (B, n, n)
            head = head / (head.amax(dim=-2, keepdim=True) + MAP_EPS)
            head = torch.where(head < threshold, torch.zeros_like(head), head)
            matrices.append(head / (head.sum(dim=-1, keepdim=True) + MAP_EPS))
    return matrices


def compensate(matrices: Sequence[Tensor], scores: Tensor, aggregation: str = "product") -> Tensor:
    """Apply the aggregated self-attention to class scores on the maps' grid.

    Args:
        matrices: (B, n, n) each, from `propagation_matrices`.
        scores: (B, K, h, w) with h * w = n.
        aggregation: "product": M_1 M_2 ... M_m S, "mean": mean(M) S.

    Returns:
        (B, K, h, w) float32.
    """
    batch, classes, height, width = scores.shape
    if matrices[0].shape[-1] != height * width:
        raise ValueError(
            f"Scores on a {height} x {width} grid do not match attention maps over "
            f"{matrices[0].shape[-1]} tokens."
        )
    flat = scores.float().flatten(2).transpose(1, 2)  # (B, n, K)
    if aggregation == "product":
        for matrix in reversed(matrices):
            flat = matrix @ flat
    elif aggregation == "mean":
        flat = torch.stack(list(matrices)).mean(0) @ flat
    else:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")
    return flat.transpose(1, 2).reshape(batch, classes, height, width)


class DiffusionRefiner(nn.Module):
    """Refine class scores with Stable Diffusion self-attention (see the module docstring).

    Args:
        unet: a diffusers UNet2DConditionModel; its chosen layers get a recording processor.
        vae: a diffusers AutoencoderKL.
        alphas_cumprod: the noise schedule's cumulative ᾱ_t (num_train_timesteps,), e.g. a
            diffusers scheduler's `alphas_cumprod`.
        prompt_embeds: the prompt's text-encoder states (1, tokens, dim) the UNet is conditioned on.
        config: the refiner's settings (model is only informative here).

    Raises:
        ValueError: a layer that is not a self-attention layer of `unet` (the valid ones are
            listed), or a timestep outside the schedule.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        alphas_cumprod: Tensor,
        prompt_embeds: Tensor,
        config: DiffusionRefinerConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or DiffusionRefinerConfig()
        if not 0 <= self.config.timestep < len(alphas_cumprod):
            raise ValueError(
                f"timestep {self.config.timestep} is outside the schedule's "
                f"0..{len(alphas_cumprod) - 1}."
            )
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone())
        self.register_buffer("prompt_embeds", prompt_embeds.detach().clone())
        self._maps: dict[str, Tensor] = {}
        self._install_recorders()

    def _install_recorders(self) -> None:
        processors = dict(self.unet.attn_processors)
        valid = sorted(
            name.removesuffix(".processor")
            for name in processors
            if not self.unet.get_submodule(name.removesuffix(".processor")).is_cross_attention
        )
        for layer in self.config.layers:
            if layer not in valid:
                raise ValueError(
                    f"{layer!r} is not a self-attention layer of this UNet; choose from {valid}."
                )
            processors[f"{layer}.processor"] = SelfAttentionRecorder(layer, self._maps)
        self.unet.set_attn_processor(processors)

    @classmethod
    def from_pretrained(
        cls,
        config: DiffusionRefinerConfig | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **overrides,
    ) -> DiffusionRefiner:
        """Load Stable Diffusion weights (hub id or local diffusers directory) as a refiner.

        Honours HF_HUB_OFFLINE: offline, only local directories and the hub cache are used.

        Args:
            config: settings; `overrides` replace its fields (None values ignored).
            device: where the models live.
            dtype: weight dtype of the UNet, VAE and text encoder (the Segmenter's precision;
                float16 halves memory on GPUs, as the code runs).
            **overrides: fields of `DiffusionRefinerConfig` (e.g. threshold=0.1).

        Raises:
            ValueError: an override that is not a field of `DiffusionRefinerConfig`.
            RuntimeError: `diffusers` is not installed, or the hub cannot provide the weights.
            FileNotFoundError: a local directory that does not exist or lacks a subfolder.
        """
        config = _with_overrides(config or DiffusionRefinerConfig(), overrides)
        diffusers = _import_diffusers()
        from transformers import CLIPTextModel, CLIPTokenizer

        from zegkit.backbone.tokenizer import check_tokenizer

        source = _check_source(config.model)
        offline = hub_offline()

        def load(loader, subfolder, **kwargs):
            try:
                return loader.from_pretrained(
                    source, subfolder=subfolder, local_files_only=offline, **kwargs
                )
            except (OSError, ValueError) as error:
                raise RuntimeError(_missing_weights_message(config.model, offline, error)) from None

        unet = load(diffusers.UNet2DConditionModel, "unet", torch_dtype=dtype)
        vae = load(diffusers.AutoencoderKL, "vae", torch_dtype=dtype)
        scheduler = load(diffusers.DDPMScheduler, "scheduler")
        tokenizer = load(CLIPTokenizer, "tokenizer")
        text_encoder = load(CLIPTextModel, "text_encoder", dtype=dtype).to(device)
        check_tokenizer(tokenizer, text_encoder.config.vocab_size, f"{config.model}/tokenizer")
        tokens = tokenizer(
            [config.prompt],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        with torch.no_grad():
            prompt_embeds = text_encoder(tokens).last_hidden_state  # (1, 77, dim)
        del text_encoder
        refiner = cls(unet, vae, scheduler.alphas_cumprod, prompt_embeds, config)
        return refiner.to(device)

    # ---- attention ---------------------------------------------------------------------------
    @torch.no_grad()
    def attention_maps(self, images: Tensor) -> list[Tensor]:
        """Self-attention probabilities of the chosen layers for images in [0, 1].

        Args:
            images: B x 3 x H x W, values in [0, 1].

        Returns:
            Per layer of `config.layers`, (B, heads, n, n) in the UNet's dtype.
        """
        _check_pixel_range(images)
        size = self.config.image_size
        dtype = next(self.vae.parameters()).dtype
        pixels = resize(images.float(), (size, size)) * 2 - 1  # [-1, 1], as SD's VAE expects
        latents = self.vae.encode(pixels.to(dtype)).latent_dist.mean
        latents = latents * self.vae.config.scaling_factor
        generator = torch.Generator().manual_seed(self.config.seed)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        alpha = self.alphas_cumprod[self.config.timestep]
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        context = self.prompt_embeds.to(dtype).expand(images.shape[0], -1, -1)
        self._maps.clear()
        try:
            self.unet(noisy, self.config.timestep, encoder_hidden_states=context)
            return [self._maps[layer] for layer in self.config.layers]
        finally:
            self._maps.clear()

    def forward(self, images: Tensor, scores: DenseScores) -> DenseScores:
        """Refine the scores' probabilities with the images' diffusion self-attention.

        Args:
            images: B x 3 x H x W, values in [0, 1] (not CLIP-normalised: the VAE needs colours).
            scores: B x R x H x W dense scores; their activation turns them into probabilities,
                which are resized to the attention grid.

        Returns:
            The refined probabilities B x R x H x W (float32) with an "identity" activation and
            the rows of ``scores``.

        Raises:
            ValueError: images and scores that do not belong together, images outside [0, 1],
                or layers whose tokens do not form a square grid.
        """
        check_refiner_inputs(images, scores)
        matrices = propagation_matrices(self.attention_maps(images), self.config.threshold)
        side = math.isqrt(matrices[0].shape[-1])
        if side * side != matrices[0].shape[-1]:
            raise ValueError(
                f"Attention over {matrices[0].shape[-1]} tokens is not a square grid; choose "
                "self-attention layers of one square resolution."
            )
        grid = resize(scores.probabilities(), (side, side))
        refined = compensate(matrices, grid, self.config.aggregation)
        refined = resize(refined, tuple(images.shape[-2:]))
        return DenseScores(refined, Activation("identity"), scores.rows)


def _with_overrides(
    config: DiffusionRefinerConfig, overrides: dict[str, object]
) -> DiffusionRefinerConfig:
    """``config`` with the fields in ``overrides`` replaced (None values ignored).

    Raises:
        ValueError: a key that is not a field of `DiffusionRefinerConfig` (the valid ones listed).
    """
    valid = sorted(f.name for f in fields(DiffusionRefinerConfig))
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown diffusion refiner option(s) {unknown}; valid options are {valid}."
        )
    return replace(config, **{key: value for key, value in overrides.items() if value is not None})


def _check_pixel_range(images: Tensor) -> None:
    """Raise ValueError for images B x 3 x H x W whose values are not in [0, 1]."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"Need images B x 3 x H x W, got shape {tuple(images.shape)}; add a batch dimension "
            "with unsqueeze(0) for one image."
        )
    low, high = images.min().item(), images.max().item()
    if low < -PIXEL_TOLERANCE or high > 1 + PIXEL_TOLERANCE:
        raise ValueError(
            f"The diffusion refiner needs pixel values in [0, 1]; got [{low:.3g}, {high:.3g}] "
            "(CLIP-normalised or 0-255 images must be converted back first)."
        )


def require_weights(model: str) -> None:
    """Check, without loading anything, that the refiner for ``model`` can be built here.

    Args:
        model: hub id or local diffusers directory (`DiffusionRefinerConfig.model`).

    Raises:
        RuntimeError: `diffusers` is not installed, or HF_HUB_OFFLINE is set and the hub id is
            not in the local cache (the message says what to download).
        FileNotFoundError: a local directory that does not exist or lacks a subfolder.
    """
    _import_diffusers()
    _check_source(model)
    if not _looks_local(model) and hub_offline() and not _in_hub_cache(model):
        raise RuntimeError(_missing_weights_message(model, True, "it is not in the cache"))


def _looks_local(model: str) -> bool:
    """Whether ``model`` names a directory rather than a hub id ("namespace/name")."""
    return Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or (
        model.count("/") > 1
    )


def _in_hub_cache(model: str) -> bool:
    """Whether the hub cache holds the UNet config of ``model`` (a proxy for a download)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "unet/config.json"), str)


def _check_source(model: str) -> str:
    """A local directory must exist and hold the diffusers subfolders; hub ids pass through."""
    if not _looks_local(model):
        return model
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"Stable Diffusion directory {model!r} does not exist. Pass a hub id such as "
            f"{SD_MODEL!r} or a directory in diffusers layout with subfolders {SUBFOLDERS}."
        )
    missing = [name for name in SUBFOLDERS if not (path / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"Stable Diffusion directory {model!r} lacks the subfolder(s) {missing}; a diffusers "
            f"model directory has {SUBFOLDERS} (e.g. `hf download {SD_MODEL} --local-dir DIR`)."
        )
    return str(path)


def _missing_weights_message(model: str, offline: bool, reason: object) -> str:
    """Why the weights of ``model`` could not be had, and how to download them."""
    where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the hub"
    return (
        f"Could not load Stable Diffusion weights {model!r} from {where}: {reason}. Download them "
        f"with `hf download {model} --include 'unet/*' 'vae/*' 'scheduler/*' "
        "'text_encoder/*' 'tokenizer/*'` (into the Hugging Face cache; add --local-dir DIR and "
        f"pass DIR to keep a copy: a diffusers directory with subfolders {SUBFOLDERS})."
    )
