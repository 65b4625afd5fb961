"""The frozen CLIP backbone and zegkit's layer-by-layer vision forward over `transformers`' modules.

Weights, configs and tokenizers are borrowed from `transformers` (`CLIPModel`); zegkit owns only the
forward of the vision tower, because every method needs surgery inside specific layers: another
attention variant, a removed residual or feed-forward path, a replaced [CLS] token, intermediate
taps, attention maps. With no surgery the forward reproduces `transformers`' outputs (a test).
Module names are upstream's (`pre_layrnorm`, `layer_norm1`, `self_attn.q_proj`, `mlp.fc1`,
`post_layernorm`, `visual_projection`) so any block can be diffed against `transformers`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zegkit.backbone.attention import VANILLA, BlockSurgery, Grid

if TYPE_CHECKING:  # imported where used: `transformers` takes seconds to import
    from transformers import CLIPModel, PreTrainedTokenizerBase

# CLIP's pixel normalisation (OpenAI, used by every CLIP release zegkit loads unless its
# preprocessor_config.json says otherwise).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageNet's, which the ZegCLIP family's released code normalises CLIP's input with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_pixels(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(images - mean) / std per channel, for images (B, 3, H, W) with values in [0, 1]."""
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype)
    return (images - mean_t[:, None, None]) / std_t[:, None, None]


@dataclass
class TokenInjection:
    """Tokens a method puts into the vision sequence, laid out as [CLS], prompts, patches, suffix.

    Attributes:
        cls: layer index -> (B, C) token that replaces [CLS] at the input of that layer (ClsCLIP).
        prompts: layer index -> (P, C) or (B, P, C) deep prompt tokens at the input of that layer,
            right after [CLS]: the first such layer inserts them, later ones replace the previous
            layer's prompt outputs, layers without an entry pass them on (VPT-deep, ZegCLIP).
            Every entry has the same P. They get no position embedding.
        suffix: (R, C) or (B, R, C) tokens appended after the patches at the input of
            `suffix_layer` (CLIP-RC's region tokens).
        suffix_layer: the layer whose input receives the suffix tokens.
        attention_mask: for the layers that see the suffix, (T, T) or (B, T, T) over the whole
            sequence: bool (True: may attend) or float (added to the attention logits).
    """

    cls: Mapping[int, Tensor] = field(default_factory=dict)
    prompts: Mapping[int, Tensor] = field(default_factory=dict)
    suffix: Tensor | None = None
    suffix_layer: int = 0
    attention_mask: Tensor | None = None

    def num_prompts(self) -> int:
        """P, the number of prompt tokens (0 without prompts).

        Raises:
            ValueError: prompt entries of different lengths.
        """
        lengths = {prompt.shape[-2] for prompt in self.prompts.values()}
        if len(lengths) > 1:
            raise ValueError(f"Every layer's prompts must have the same length, got {lengths}.")
        return lengths.pop() if lengths else 0


@dataclass
class Intermediates:
    """What one vision forward returns.

    Attributes:
        hidden: output of the last layer run, (B, T, C), T = num_prefix + h*w + num_suffix,
            before post_layernorm.
        grid: patch grid (h, w).
        num_prefix: tokens before the patches ([CLS] and any prompt tokens).
        num_suffix: tokens after the patches (e.g. region tokens).
        intermediates: per requested layer, its patch tokens (B, h*w, C) for output_fmt 'NLC'
            or (B, C, h, w) for 'NCHW'.
        intermediate_prefix: per requested layer, its [CLS] token (B, C).
        attention: layer index -> attention weights (B, heads, T, T), for return_attention.
        attention_sum: with sum_attention, the sum of those layers' weights (B, heads, T, T)
            instead (a running sum: one map in memory, not one per layer).
    """

    hidden: Tensor
    grid: Grid
    num_prefix: int = 1
    num_suffix: int = 0
    intermediates: list[Tensor] = field(default_factory=list)
    intermediate_prefix: list[Tensor] = field(default_factory=list)
    attention: dict[int, Tensor] = field(default_factory=dict)
    attention_sum: Tensor | None = None

    @property
    def prefix(self) -> Tensor:
        """[CLS] token of the last layer run, (B, C)."""
        return self.hidden[:, 0]

    @property
    def tokens(self) -> Tensor:
        """Patch tokens of the last layer run, (B, h*w, C)."""
        return self.patches(self.hidden)

    @property
    def suffix(self) -> Tensor:
        """Suffix tokens of the last layer run, (B, num_suffix, C)."""
        return self.hidden[:, self.hidden.shape[1] - self.num_suffix :]

    def patches(self, x: Tensor) -> Tensor:
        """The patch tokens (B, h*w, C) of a sequence laid out as this forward's."""
        return x[:, self.num_prefix : x.shape[1] - self.num_suffix]


def take_indices(num_layers: int, indices: int | Sequence[int] | None) -> list[int]:
    """Resolve timm-style `indices` to sorted non-negative layer indices.

    None means every layer; an int n means the last n layers; a sequence means exactly those layers
    (negative values count from the end).

    Raises:
        ValueError: an index outside the model's layers.
    """
    if indices is None:
        return list(range(num_layers))
    if isinstance(indices, int):
        if not 0 < indices <= num_layers:
            raise ValueError(f"indices={indices} must be in 1..{num_layers} (the last n layers).")
        return list(range(num_layers - indices, num_layers))
    resolved = []
    for index in indices:
        if not -num_layers <= index < num_layers:
            raise ValueError(
                f"Layer index {index} is outside this model's {num_layers} layers "
                f"(valid: {-num_layers}..{num_layers - 1})."
            )
        resolved.append(index % num_layers)
    return sorted(set(resolved))


def _batched(tokens: Tensor, x: Tensor) -> Tensor:
    """Tokens (N, C) or (B, N, C) as (B, N, C) in the dtype of the sequence x (B, T, C)."""
    if tokens.ndim == 2:
        tokens = tokens.expand(x.shape[0], *tokens.shape)
    if tokens.ndim != 3 or tokens.shape[0] != x.shape[0] or tokens.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"Injected tokens must be (N, {x.shape[-1]}) or ({x.shape[0]}, N, {x.shape[-1]}), "
            f"got {tuple(tokens.shape)}."
        )
    return tokens.to(x.dtype)


class ClipBackbone(nn.Module):
    """A frozen `transformers` CLIPModel with a vision forward that methods can edit.

    Args:
        model: the CLIP model (weights are frozen and the model put in eval mode).
        tokenizer: its tokenizer, already checked.
        name: identifier of the weights (hub id, path or short name), used in caches and reports.
        mean: per-channel pixel mean of the model's preprocessing.
        std: per-channel pixel std of the model's preprocessing.
    """

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.mean, self.std = tuple(mean), tuple(std)
        vision = model.vision_model
        self.vision = vision
        self.layers = vision.encoder.layers
        self.patch_size: int = vision.config.patch_size
        self.image_size: int = vision.config.image_size
        self.width: int = vision.config.hidden_size
        self.num_heads: int = vision.config.num_attention_heads
        self.embed_dim: int = model.config.projection_dim
        self.num_layers: int = len(self.layers)
        self.num_prefix_tokens: int = 1  # the [CLS] token; prompt tokens come with an injection
        self._position_cache: dict[tuple, Tensor] = {}
        self._cast_cache: dict[tuple, tuple] = {}  # (layer id, dtype) -> (state, weight, bias)

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of both projection heads: tells two CLIPs apart whatever their names."""
        digest = hashlib.sha256()
        for weight in (self.model.visual_projection.weight, self.model.text_projection.weight):
            digest.update(weight.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    # ---- text ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Projected EOT embeddings (N, D) of `texts`, padded to the longest, not normalised."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(
            self.device
        )
        output = self.model.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        return output.pooler_output

    # ---- pixels ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def normalize(self, images: Tensor) -> Tensor:
        """Normalise images (B, 3, H, W) with values in [0, 1] as the model was trained."""
        return normalize_pixels(images, self.mean, self.std)

    def grid_size(self, pixels: Tensor) -> Grid:
        """Patch grid (h, w) of input (B, 3, H, W); pixels past the last full patch are unused."""
        return pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size

    def position_embedding(self, grid: Grid) -> Tensor:
        """Position embeddings (1, 1 + h*w, C) for a patch grid, bicubically resized as
        `transformers`' interpolate_pos_encoding does, and cached per grid; the cache key holds
        the table's storage and version, so loading other weights never reuses a stale entry.
        Under torch.compile they are computed in the graph (storage addresses do not trace)."""
        table = self.vision.embeddings.position_embedding.weight
        if torch.compiler.is_compiling():
            return self._resized_positions(table, grid)
        key = (grid, table.device, table.dtype, table.data_ptr(), table._version)
        if key not in self._position_cache:
            self._position_cache.clear()
            self._position_cache[key] = self._resized_positions(table, grid)
        return self._position_cache[key]

    def _resized_positions(self, table: Tensor, grid: Grid) -> Tensor:
        """The position table (1 + n*n, C) bicubically resized to `grid`, (1, 1 + h*w, C)."""
        native = self.image_size // self.patch_size
        prefix, patches = table[:1], table[1:]
        if grid != (native, native):
            patches = patches.reshape(1, native, native, -1).permute(0, 3, 1, 2)
            patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
            patches = patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
        return torch.cat([prefix, patches])[None]

    def embed(self, pixels: Tensor, position_rounding: torch.dtype | None = None) -> Tensor:
        """Input tokens (B, 1 + h*w, C): patch embedding, [CLS], positions, pre-layernorm.

        `position_rounding` rounds the (resized) position embeddings through that dtype first,
        as code that keeps them in float16 does (CLIPer's released `upsample_pos_emb`).
        """
        embeddings = self.vision.embeddings
        # oneDNN's AMX bf16 convolution (brg_conv_fwd in torch 2.13) returns wrong patches, off
        # by as much as their own size, for a grid one patch wide and 5 or more tall (whole
        # images 16-31 px wide): such a grid is embedded in float32 on a CPU
        one_column = pixels.device.type == "cpu" and self.grid_size(pixels)[1] == 1
        with torch.autocast("cpu", enabled=False) if one_column else nullcontext():
            patches = embeddings.patch_embedding(pixels.to(embeddings.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # (B, h*w, C)
        cls = embeddings.class_embedding.expand(pixels.shape[0], 1, -1)
        tokens = torch.cat([cls.to(patches.dtype), patches], dim=1)
        positions = self.position_embedding(self.grid_size(pixels))
        if position_rounding is not None:
            positions = positions.to(position_rounding).to(positions.dtype)
        return self.vision.pre_layrnorm(tokens + positions)

    # ---- blocks ----------------------------------------------------------------------------
    def qkv(self, index: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Layer `index`'s queries, keys and values of layer_norm1(x), each (B, heads, T, d)."""
        layer = self.layers[index]
        h = layer.layer_norm1(x)
        attn = layer.self_attn
        return self._heads(attn.q_proj, h), self._heads(attn.k_proj, h), self._heads(attn.v_proj, h)

    def values(self, index: int, x: Tensor) -> Tensor:
        """Layer `index`'s values of layer_norm1(x) (B, heads, T, d), without queries and keys."""
        layer = self.layers[index]
        return self._heads(layer.self_attn.v_proj, layer.layer_norm1(x))

    def _heads(self, projection: nn.Linear, h: Tensor) -> Tensor:
        """A projection of normalised tokens h (B, T, C) split into heads: (B, heads, T, d)."""
        batch, tokens, _ = h.shape
        return self._linear(projection, h).view(batch, tokens, self.num_heads, -1).transpose(1, 2)

    def block(
        self,
        index: int,
        x: Tensor,
        grid: Grid,
        surgery: BlockSurgery | None = None,
        return_attention: bool = False,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Run encoder layer `index` on tokens x (B, T, C), with optional surgery.

        `attention_mask` ((T, T) or (B, T, T), bool True = may attend, or additive float) works
        with the vanilla attention (the frozen CLIP's own); other variants refuse it.

        Returns:
            The layer's output (B, T, C) and, if return_attention, its attention weights
            (B, heads, T, T) under the surgery's variant (None otherwise).
        """
        surgery = surgery or VANILLA
        x, weights = self._attention_step(index, x, grid, surgery, return_attention,
                                          attention_mask)
        return self._ffn_step(index, x, surgery), weights

    def _attention_step(self, index: int, x: Tensor, grid: Grid, surgery: BlockSurgery,
                        return_attention: bool, attention_mask: Tensor | None
                        ) -> tuple[Tensor, Tensor | None]:
        """`block`'s attention half: tokens after the attention (and residual), the weights."""
        q, k, v = self.qkv(index, x)
        weights = None
        if return_attention:
            weights = surgery.weights(q, k, grid, attention_mask)
            mixed = weights @ v
        else:
            mixed = surgery.attend(q, k, v, grid, attention_mask)
        out = self._merge_heads(index, mixed)
        return (x + out if surgery.residual else out), weights

    def _ffn_step(self, index: int, x: Tensor, surgery: BlockSurgery) -> Tensor:
        """`block`'s feed-forward half (with its residual), where the surgery keeps it."""
        if not surgery.ffn:
            return x
        return x + self._mlp(index, self.layers[index].layer_norm2(x))

    def attention_branch(self, index: int, x: Tensor, weights: Tensor) -> Tensor:
        """Layer `index`'s attention branch with given attention weights: out_proj(weights · v).

        For methods that build the attention themselves (e.g. CLIPer's fused early attention);
        no residual and no feed-forward path.

        Args:
            index: the layer whose values and output projection are used.
            x: input tokens (..., B, T, C); leading dimensions share `weights`.
            weights: attention (B, heads, T, T).

        Returns:
            (..., B, T, C).
        """
        v = self.values(index, x.reshape(-1, *x.shape[-2:]))  # (lead*B, heads, T, d)
        v = v.reshape(*x.shape[:-2], *v.shape[1:])  # (..., B, heads, T, d)
        return self._merge_heads(index, weights.to(v.dtype) @ v)

    def _merge_heads(self, index: int, mixed: Tensor) -> Tensor:
        """Concatenate per-head outputs (..., heads, T, d) and apply layer `index`'s out_proj."""
        mixed = mixed.transpose(-3, -2).flatten(-2)  # (..., T, heads*d)
        return self._linear(self.layers[index].self_attn.out_proj, mixed)

    def _mlp(self, index: int, x: Tensor) -> Tensor:
        """Layer `index`'s feed-forward branch, fc2(act(fc1(x))) as `transformers`' CLIPMLP."""
        mlp = self.layers[index].mlp
        return self._linear(mlp.fc2, mlp.activation_fn(self._linear(mlp.fc1, x)))

    def _linear(self, linear: nn.Linear, x: Tensor) -> Tensor:
        """`linear(x)`, with the frozen weights cast to the autocast dtype once, not per call.

        Under autocast a linear layer casts its weight and bias on every call (autocast keeps
        casts only of weights that require grad; the backbone's are frozen): a bf16 ViT-B/16
        forward spent about 13% of its time in those copies. The casts are kept per layer and
        dtype (2 bytes a weight for bf16) and renewed when the weights change; they are the
        values autocast would use, so results are the same. Under torch.compile the graph casts
        them (storage addresses do not trace).
        """
        device = x.device.type
        if not torch.is_autocast_enabled(device) or torch.compiler.is_compiling():
            return linear(x)
        dtype = torch.get_autocast_dtype(device)
        if dtype == linear.weight.dtype:
            return linear(x)
        weight, bias = self._cast_weights(linear, dtype)
        return F.linear(x.to(dtype), weight, bias)

    def _cast_weights(self, linear: nn.Linear, dtype: torch.dtype
                      ) -> tuple[Tensor, Tensor | None]:
        """`linear`'s weight and bias in `dtype`, cast once (see `_linear`)."""
        weight, bias = linear.weight, linear.bias
        state = (weight.data_ptr(), weight._version, None if bias is None else bias._version)
        key = (id(linear), dtype)
        cached = self._cast_cache.get(key)
        if cached is None or cached[0] != state:
            # plain tensors even when first asked for under inference_mode (training reuses them)
            with torch.inference_mode(False), torch.no_grad():
                cast = weight.to(dtype), None if bias is None else bias.to(dtype)
            cached = self._cast_cache[key] = (state, *cast)
        return cached[1], cached[2]

    def forward_intermediates(
        self,
        pixels: Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        stop_early: bool = False,
        norm: bool = False,
        output_fmt: str = "NLC",
        surgery: Mapping[int, BlockSurgery] | None = None,
        inject: TokenInjection | None = None,
        return_attention: Sequence[int] = (),
        sum_attention: bool = False,
        position_rounding: torch.dtype | None = None,
    ) -> Intermediates:
        """Run the vision tower layer by layer, with surgery, injected tokens and taps.

        Gradients flow from the outputs into injected tokens (the weights stay frozen).

        Args:
            pixels: normalised images (B, 3, H, W); H and W need not be the native size.
            indices: layers whose outputs to return (timm convention: None = all, int n = last n,
                sequence = exactly these, negatives from the end).
            stop_early: stop after the last layer in `indices`, `return_attention`, `surgery` or
                `inject`.
            norm: apply post_layernorm to the returned intermediates.
            output_fmt: 'NLC' -> (B, h*w, C), 'NCHW' -> (B, C, h, w).
            surgery: layer index -> BlockSurgery; other layers run unchanged.
            inject: tokens to replace or insert at given layers (see TokenInjection).
            return_attention: layers whose attention weights (B, heads, T, T) to return.
            sum_attention: return the sum of those weights (`Intermediates.attention_sum`, in
                layer order) instead of each layer's.
            position_rounding: see `embed`.

        Returns:
            Intermediates; `hidden` is the output of the last layer run.
        """
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}.")
        inject = inject or TokenInjection()
        taps = take_indices(self.num_layers, indices)
        surgery = self._resolve_layers(surgery or {}, "surgery")
        cls = self._resolve_layers(inject.cls, "inject.cls")
        prompts = self._resolve_layers(inject.prompts, "inject.prompts")
        suffix_layer = None
        if inject.suffix is not None:
            suffix_layer = take_indices(self.num_layers, [inject.suffix_layer])[0]
        attention_layers = set(take_indices(self.num_layers, list(return_attention)))
        last = self.num_layers - 1
        if stop_early:
            suffix = [] if suffix_layer is None else [suffix_layer]
            edited = [*surgery, *cls, *prompts, *suffix]
            last = max([*taps, *attention_layers, *edited], default=last)
        grid = self.grid_size(pixels)
        x = self.embed(pixels, position_rounding)
        result = Intermediates(hidden=x, grid=grid)
        inject.num_prompts()  # one length for every layer's prompts, or a clear error now
        for index in range(last + 1):
            x = self._inject(x, index, cls, prompts, result)
            if index == suffix_layer:
                x = torch.cat([x, _batched(inject.suffix, x)], dim=1)
                result.num_suffix = x.shape[1] - result.num_prefix - grid[0] * grid[1]
            mask = inject.attention_mask if result.num_suffix else None
            layer_surgery = surgery.get(index) or VANILLA
            x, weights = self._attention_step(
                index, x, grid, layer_surgery, index in attention_layers, mask
            )
            # weights leave before the feed-forward half: summed, they need not outlive it
            self._keep_attention(result, index, weights, sum_attention)
            del weights
            x = self._ffn_step(index, x, layer_surgery)
            if index in taps:
                self._tap(result, x, norm, output_fmt)
        result.hidden = x
        return result

    @staticmethod
    def _keep_attention(result: Intermediates, index: int, weights: Tensor | None,
                        sum_attention: bool) -> None:
        """Store layer `index`'s attention weights in `result`, or add them to its sum."""
        if weights is None:
            return
        if not sum_attention:
            result.attention[index] = weights
        elif result.attention_sum is None:  # a copy: the sum grows in place, weights may be
            result.attention_sum = weights.clone()  # saved for grad
        else:
            result.attention_sum.add_(weights)

    def _inject(self, x: Tensor, index: int, cls: Mapping[int, Tensor],
                prompts: Mapping[int, Tensor], result: Intermediates) -> Tensor:
        """Replace [CLS] and insert or replace prompt tokens at the input of layer `index`."""
        if index in cls:
            x = torch.cat([cls[index][:, None].to(x.dtype), x[:, 1:]], dim=1)
        if index in prompts:
            prompt = _batched(prompts[index], x)
            inserted = result.num_prefix == self.num_prefix_tokens
            rest = x[:, self.num_prefix_tokens if inserted else result.num_prefix :]
            x = torch.cat([x[:, : self.num_prefix_tokens], prompt, rest], dim=1)
            result.num_prefix = self.num_prefix_tokens + prompt.shape[1]
        return x

    def _resolve_layers(self, by_layer: Mapping[int, object], what: str) -> dict[int, object]:
        """Map possibly negative layer keys to non-negative ones, rejecting out-of-range keys."""
        resolved = take_indices(self.num_layers, list(by_layer))
        if len(resolved) != len(by_layer):
            raise ValueError(f"{what} names the same layer twice: {sorted(by_layer)}.")
        return {index % self.num_layers: value for index, value in by_layer.items()}

    def _tap(self, result: Intermediates, x: Tensor, norm: bool, output_fmt: str) -> None:
        """Record one layer's output in `result` in the requested format."""
        if norm:
            x = self.vision.post_layernorm(x)
        tokens = result.patches(x)
        if output_fmt == "NCHW":
            tokens = tokens.transpose(1, 2).reshape(x.shape[0], -1, *result.grid)
        result.intermediates.append(tokens)
        result.intermediate_prefix.append(x[:, 0])

    # ---- joint space -----------------------------------------------------------------------
    def project(self, tokens: Tensor) -> Tensor:
        """Map vision tokens (..., C) into the joint image-text space (..., D)."""
        return self._linear(self.model.visual_projection, self.vision.post_layernorm(tokens))

    def image_features(self, pixels: Tensor) -> Tensor:
        """CLIP image embeddings (B, D), not normalised: the projected final [CLS] token."""
        return self.project(self.forward_intermediates(pixels, indices=[]).prefix)
