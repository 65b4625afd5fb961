"""The frozen CLIP backbone and zegkit's layer-by-layer vision forward over `transformers`' modules.

Weights, configs and tokenizers are borrowed from `transformers` (`CLIPModel`); zegkit owns only the
forward of the vision tower, because every method needs surgery inside specific layers: another
attention variant, a removed residual or feed-forward path, a replaced [CLS] token, intermediate
taps, attention maps. With no surgery the forward reproduces `transformers`' outputs (a test).
Module names are upstream's (`pre_layrnorm`, `layer_norm1`, `self_attn.q_proj`, `mlp.fc1`,
`post_layernorm`, `visual_projection`) so any block can be diffed against `transformers`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPModel, PreTrainedTokenizerBase

from zegkit.backbone.attention import VANILLA, BlockSurgery, Grid, attention_weights

# CLIP's pixel normalisation (OpenAI, used by every CLIP release zegkit loads unless its
# preprocessor_config.json says otherwise).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Intermediates:
    """What one vision forward returns.

    Attributes:
        hidden: output of the last layer run, (B, 1 + h*w, C), before post_layernorm.
        grid: patch grid (h, w).
        intermediates: per requested layer, (B, h*w, C) for output_fmt 'NLC' or (B, C, h, w)
            for 'NCHW'.
        intermediate_prefix: per requested layer, its [CLS] token (B, C).
        attention: layer index -> attention weights (B, heads, T, T), for return_attention.
    """

    hidden: Tensor
    grid: Grid
    intermediates: list[Tensor] = field(default_factory=list)
    intermediate_prefix: list[Tensor] = field(default_factory=list)
    attention: dict[int, Tensor] = field(default_factory=dict)

    @property
    def prefix(self) -> Tensor:
        """[CLS] token of the last layer run, (B, C)."""
        return self.hidden[:, 0]

    @property
    def tokens(self) -> Tensor:
        """Patch tokens of the last layer run, (B, h*w, C)."""
        return self.hidden[:, 1:]


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
        self._position_cache: dict[tuple, Tensor] = {}

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
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype)
        return (images - mean[:, None, None]) / std[:, None, None]

    def grid_size(self, pixels: Tensor) -> Grid:
        """Patch grid (h, w) of input (B, 3, H, W); pixels past the last full patch are unused."""
        return pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size

    def position_embedding(self, grid: Grid) -> Tensor:
        """Position embeddings (1, 1 + h*w, C) for a patch grid, bicubically resized as
        `transformers`' interpolate_pos_encoding does, and cached per grid (weights are frozen)."""
        table = self.vision.embeddings.position_embedding.weight
        key = (grid, table.device, table.dtype)
        if key not in self._position_cache:
            native = self.image_size // self.patch_size
            prefix, patches = table[:1], table[1:]
            if grid != (native, native):
                patches = patches.reshape(1, native, native, -1).permute(0, 3, 1, 2)
                patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
                patches = patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
            self._position_cache[key] = torch.cat([prefix, patches])[None]
        return self._position_cache[key]

    def embed(self, pixels: Tensor) -> Tensor:
        """Input tokens (B, 1 + h*w, C): patch embedding, [CLS], positions, pre-layernorm."""
        embeddings = self.vision.embeddings
        patches = embeddings.patch_embedding(pixels.to(embeddings.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # (B, h*w, C)
        cls = embeddings.class_embedding.expand(pixels.shape[0], 1, -1)
        tokens = torch.cat([cls.to(patches.dtype), patches], dim=1)
        return self.vision.pre_layrnorm(tokens + self.position_embedding(self.grid_size(pixels)))

    # ---- blocks ----------------------------------------------------------------------------
    def qkv(self, index: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Layer `index`'s queries, keys and values of layer_norm1(x), each (B, heads, T, d)."""
        layer = self.layers[index]
        h = layer.layer_norm1(x)
        attn = layer.self_attn
        batch, tokens, _ = x.shape

        def heads(projection: nn.Linear) -> Tensor:
            return projection(h).view(batch, tokens, self.num_heads, -1).transpose(1, 2)

        return heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)

    def block(
        self,
        index: int,
        x: Tensor,
        grid: Grid,
        surgery: BlockSurgery | None = None,
        return_attention: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Run encoder layer `index` on tokens x (B, T, C), with optional surgery.

        Returns:
            The layer's output (B, T, C) and, if return_attention, its attention weights
            (B, heads, T, T) under the surgery's variant (None otherwise).
        """
        surgery = surgery or VANILLA
        layer = self.layers[index]
        q, k, v = self.qkv(index, x)
        weights = None
        if return_attention:
            weights = attention_weights(surgery.attention, q, k, grid, **surgery.options)
            mixed = weights @ v
        else:
            mixed = surgery.attend(q, k, v, grid)
        out = self._merge_heads(index, mixed)
        x = x + out if surgery.residual else out
        if surgery.ffn:
            x = x + layer.mlp(layer.layer_norm2(x))
        return x, weights

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
        _, _, v = self.qkv(index, x.reshape(-1, *x.shape[-2:]))  # (lead*B, heads, T, d)
        v = v.reshape(*x.shape[:-2], *v.shape[1:])  # (..., B, heads, T, d)
        return self._merge_heads(index, weights.to(v.dtype) @ v)

    def _merge_heads(self, index: int, mixed: Tensor) -> Tensor:
        """Concatenate per-head outputs (..., heads, T, d) and apply layer `index`'s out_proj."""
        mixed = mixed.transpose(-3, -2).flatten(-2)  # (..., T, heads*d)
        return self.layers[index].self_attn.out_proj(mixed)

    def forward_intermediates(
        self,
        pixels: Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        stop_early: bool = False,
        norm: bool = False,
        output_fmt: str = "NLC",
        surgery: Mapping[int, BlockSurgery] | None = None,
        cls_override: Mapping[int, Tensor] | None = None,
        return_attention: Sequence[int] = (),
    ) -> Intermediates:
        """Run the vision tower layer by layer, with surgery and taps.

        Args:
            pixels: normalised images (B, 3, H, W); H and W need not be the native size.
            indices: layers whose outputs to return (timm convention: None = all, int n = last n,
                sequence = exactly these, negatives from the end).
            stop_early: stop after the last layer in `indices`, `return_attention` or `surgery`.
            norm: apply post_layernorm to the returned intermediates.
            output_fmt: 'NLC' -> (B, h*w, C), 'NCHW' -> (B, C, h, w).
            surgery: layer index -> BlockSurgery; other layers run unchanged.
            cls_override: layer index -> (B, C) token that replaces [CLS] before that layer runs.
            return_attention: layers whose attention weights (B, heads, T, T) to return.

        Returns:
            Intermediates; `hidden` is the output of the last layer run.
        """
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}.")
        taps = take_indices(self.num_layers, indices)
        surgery = self._resolve_layers(surgery or {}, "surgery")
        cls_override = self._resolve_layers(cls_override or {}, "cls_override")
        attention_layers = set(take_indices(self.num_layers, list(return_attention)))
        last = self.num_layers - 1
        if stop_early:
            last = max([*taps, *attention_layers, *surgery, *cls_override], default=last)
        grid = self.grid_size(pixels)
        x = self.embed(pixels)
        result = Intermediates(hidden=x, grid=grid)
        for index in range(last + 1):
            if index in cls_override:
                x = torch.cat([cls_override[index][:, None].to(x.dtype), x[:, 1:]], dim=1)
            x, weights = self.block(
                index, x, grid, surgery.get(index), return_attention=index in attention_layers
            )
            if weights is not None:
                result.attention[index] = weights
            if index in taps:
                self._tap(result, x, norm, output_fmt)
        result.hidden = x
        return result

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
        tokens = x[:, 1:]
        if output_fmt == "NCHW":
            tokens = tokens.transpose(1, 2).reshape(x.shape[0], -1, *result.grid)
        result.intermediates.append(tokens)
        result.intermediate_prefix.append(x[:, 0])

    # ---- joint space -----------------------------------------------------------------------
    def project(self, tokens: Tensor) -> Tensor:
        """Map vision tokens (..., C) into the joint image-text space (..., D)."""
        return self.model.visual_projection(self.vision.post_layernorm(tokens))

    def image_features(self, pixels: Tensor) -> Tensor:
        """CLIP image embeddings (B, D), not normalised: the projected final [CLS] token."""
        return self.project(self.forward_intermediates(pixels, indices=[]).prefix)
