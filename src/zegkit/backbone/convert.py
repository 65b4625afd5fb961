"""Convert an OpenAI CLIP / open_clip ViT state dict into a `transformers` CLIPModel's.

OpenAI's `clip` package (https://github.com/openai/CLIP, `clip/model.py`) and open_clip store a
ViT CLIP as `visual.*` (the image tower), bare text-tower keys (`token_embedding`, `transformer.*`,
`ln_final`, `text_projection`) and `logit_scale`. Its attention is `nn.MultiheadAttention`, whose
`in_proj_weight` stacks the query, key and value projections; its projections are matrices applied
as `x @ proj`, i.e. the transpose of an `nn.Linear` weight. `transformers` keeps q/k/v separate and
uses `nn.Linear`, so the conversion splits, transposes and renames, and nothing else: the numbers
are the same, so the converted model gives the same embeddings.

The state dict does not record the number of heads, the activation or the tokenizer's special ids;
they are arguments here, with OpenAI's values as defaults.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # imported where used: `transformers` takes seconds to import
    from transformers import CLIPConfig

# OpenAI `clip/model.py::build_model`: heads = width // 64 in both towers (open_clip: `head_width`).
OPENAI_HEAD_WIDTH = 64
# OpenAI CLIP uses QuickGELU (x * sigmoid(1.702 x)); many open_clip (LAION) models use exact GELU.
ACTIVATIONS = ("quick_gelu", "gelu")
# Scalars OpenAI's TorchScript archives carry next to the weights; `build_model` deletes them.
OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")
# Causal-mask buffer some open_clip versions saved; `transformers` builds its own mask.
ATTN_MASK_SUFFIX = "attn_mask"
# `transformers` treats eos_token_id == 2 as "pool at argmax(input_ids)" (configs from before its
# PR #24773); that is only right when the end-of-text token has the largest id.
LEGACY_EOS_TOKEN_ID = 2
# The text tower's token embedding, (vocab_size, width): the vocabulary a tokenizer must fit.
TOKEN_EMBEDDING_KEY = "token_embedding.weight"

_VISION_RENAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TEXT_RENAMES = {
    TOKEN_EMBEDDING_KEY: "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
# OpenAI matrices used as `x @ proj`; an nn.Linear weight is their transpose.
_TRANSPOSED = {
    "visual.proj": "visual_projection.weight",
    "text_projection": "text_projection.weight",
}
# Inside one residual block: OpenAI name -> transformers name (in_proj_* are split separately).
_BLOCK_RENAMES = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
}
_IN_PROJ = ("attn.in_proj_weight", "attn.in_proj_bias")
_TOWERS = {  # OpenAI block prefix -> transformers layer prefix
    "visual.transformer.resblocks": "vision_model.encoder.layers",
    "transformer.resblocks": "text_model.encoder.layers",
}
_RESNET_MARKERS = ("visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding")
_HF_MARKERS = (
    "vision_model.embeddings.patch_embedding.weight",
    "text_model.embeddings.token_embedding.weight",
)


def convert_openai_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    hidden_act: str = "quick_gelu",
    head_width: int = OPENAI_HEAD_WIDTH,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> tuple[CLIPConfig, dict[str, Tensor]]:
    """Convert an OpenAI CLIP / open_clip ViT state dict to a `transformers` config and state dict.

    Widths, layer counts, patch size, image size, vocabulary size, context length and projection
    size are read from tensor shapes. Every key is accounted for: the result has exactly the keys
    and shapes of `CLIPModel(config)`, so `load_state_dict(strict=True)` succeeds. Tensors keep
    their dtype (OpenAI archives are fp16); the caller casts.

    Args:
        state_dict: OpenAI layout (`visual.conv1.weight`, `transformer.resblocks.0.attn...`), e.g.
            `torch.jit.load(path).state_dict()` or an open_clip checkpoint without its `module.`
            prefix.
        hidden_act: the MLP activation, which the weights do not record: "quick_gelu" for OpenAI's
            models, "gelu" for open_clip models trained without QuickGELU.
        head_width: channels per attention head; heads = width // head_width in both towers.
        bos_token_id: start-of-text id of the paired tokenizer (default: vocab_size - 2, OpenAI's).
        eos_token_id: end-of-text id, where the text tower pools (default: vocab_size - 1).
        pad_token_id: padding id (default: the end-of-text id, as CLIP's tokenizer pads).

    Returns:
        (config, state dict in `transformers`' CLIPModel layout).

    Raises:
        ValueError: not a ViT CLIP state dict (ResNet CLIP, `transformers` layout, other model),
            keys missing or unexpected, shapes inconsistent, or invalid arguments.
    """
    _check_layout(state_dict)
    if hidden_act not in ACTIVATIONS:
        raise ValueError(
            f"hidden_act={hidden_act!r} is not supported; use one of {list(ACTIVATIONS)} "
            "('quick_gelu' for OpenAI CLIP, 'gelu' for open_clip models trained without QuickGELU)."
        )
    weights = {k: v for k, v in state_dict.items() if not _is_openai_only(k)}
    layers = {src: _count_layers(weights, src) for src in _TOWERS}
    _check_keys(weights, layers)
    config = _infer_config(weights, layers, hidden_act, head_width,
                           (bos_token_id, eos_token_id, pad_token_id))
    converted = _rename(weights, layers)
    _check_against_model(converted, config)
    return config, converted


def _check_layout(state_dict: Mapping[str, Tensor]) -> None:
    """Reject state dicts that are not OpenAI-layout ViT CLIPs, saying what they look like."""
    if any(key in state_dict for key in _RESNET_MARKERS):
        raise ValueError(
            "This is a ResNet CLIP (e.g. RN50): zegkit's methods edit ViT attention layers and "
            "support ViT CLIPs only. Use a ViT checkpoint such as ViT-B-16.pt or the hub id "
            "openai/clip-vit-base-patch16."
        )
    if any(key in state_dict for key in _HF_MARKERS):
        raise ValueError(
            "This state dict is already in the Hugging Face `transformers` layout "
            "(vision_model.*, text_model.*): load its directory (with config.json) instead of the "
            "weights file, or save the model with CLIPModel.save_pretrained(DIR)."
        )
    if "visual.conv1.weight" not in state_dict or TOKEN_EMBEDDING_KEY not in state_dict:
        sample = sorted(state_dict)[:5]
        raise ValueError(
            "Not an OpenAI CLIP / open_clip ViT state dict: expected keys such as "
            f"'visual.conv1.weight' and 'token_embedding.weight', found e.g. {sample}. "
            "Checkpoints from other libraries or of other models are not supported."
        )


def _is_openai_only(key: str) -> bool:
    """True for the non-weight entries OpenAI/open_clip save and `transformers` does not use."""
    return key in OPENAI_ONLY_KEYS or key.split(".")[-1] == ATTN_MASK_SUFFIX


def _count_layers(weights: Mapping[str, Tensor], block_prefix: str) -> int:
    """Number of residual blocks under `block_prefix` (highest index + 1; gaps are missing keys)."""
    pattern = re.compile(rf"^{re.escape(block_prefix)}\.(\d+)\.")
    indices = [int(m.group(1)) for key in weights if (m := pattern.match(key))]
    if not indices:
        raise ValueError(f"No transformer blocks found under '{block_prefix}.N.*'.")
    return max(indices) + 1


def _expected_keys(layers: Mapping[str, int]) -> set[str]:
    """All OpenAI-layout keys a ViT CLIP with these block counts must have."""
    keys = set(_VISION_RENAMES) | set(_TEXT_RENAMES) | set(_TRANSPOSED)
    for src, count in layers.items():
        for i in range(count):
            keys.update(f"{src}.{i}.{name}" for name in (*_BLOCK_RENAMES, *_IN_PROJ))
    return keys


def _check_keys(weights: Mapping[str, Tensor], layers: Mapping[str, int]) -> None:
    """Raise naming the missing and unexpected keys, so a truncated or foreign file is obvious."""
    expected = _expected_keys(layers)
    missing = sorted(expected - set(weights))
    unexpected = sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(
            f"The CLIP state dict does not match the OpenAI ViT layout ({len(expected)} weights "
            f"expected, {len(weights)} found). Missing keys: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}; unexpected keys: {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}. The file may be truncated, or come from a "
            "CLIP variant zegkit does not convert (e.g. attention pooling, custom text towers)."
        )


def _heads(width: int, head_width: int, tower: str) -> int:
    """Attention heads of a tower, as OpenAI computes them: width // head_width."""
    if head_width <= 0 or width % head_width:
        raise ValueError(
            f"The {tower} width {width} is not a multiple of head_width={head_width}, so the "
            "number of attention heads cannot be inferred. Pass the head_width the model was "
            f"trained with (OpenAI: {OPENAI_HEAD_WIDTH})."
        )
    return width // head_width


def _vision_config(weights: Mapping[str, Tensor], layers: int, head_width: int,
                   hidden_act: str) -> dict:
    """Image-tower config from tensor shapes: patch size from conv1, image size from the grid."""
    width, _, patch, _ = weights["visual.conv1.weight"].shape
    positions = weights["visual.positional_embedding"].shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise ValueError(
            f"visual.positional_embedding has {positions} rows; a square ViT needs 1 + grid^2."
        )
    return dict(
        hidden_size=width,
        intermediate_size=weights["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=_heads(width, head_width, "image tower"),
        patch_size=patch,
        image_size=grid * patch,
        hidden_act=hidden_act,
    )


def _text_config(weights: Mapping[str, Tensor], layers: int, head_width: int, hidden_act: str,
                 special_ids: tuple[int | None, int | None, int | None]) -> dict:
    """Text-tower config from tensor shapes, with the paired tokenizer's special ids."""
    vocab_size, width = weights[TOKEN_EMBEDDING_KEY].shape
    bos, eos, pad = special_ids
    eos = vocab_size - 1 if eos is None else eos  # OpenAI: <|endoftext|> = 49407, the last id
    bos = vocab_size - 2 if bos is None else bos  # OpenAI: <|startoftext|> = 49406
    pad = eos if pad is None else pad  # CLIP's tokenizer pads with <|endoftext|>
    if eos == LEGACY_EOS_TOKEN_ID and eos != vocab_size - 1:
        raise ValueError(
            f"eos_token_id={LEGACY_EOS_TOKEN_ID} makes transformers pool the text at the largest "
            "token id instead of at the end-of-text token, which is wrong for this vocabulary. "
            "Use a tokenizer whose end-of-text id is not 2."
        )
    return dict(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=weights["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=_heads(width, head_width, "text tower"),
        max_position_embeddings=weights["positional_embedding"].shape[0],
        hidden_act=hidden_act,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def _infer_config(weights: Mapping[str, Tensor], layers: Mapping[str, int], hidden_act: str,
                  head_width: int, special_ids: tuple[int | None, int | None, int | None],
                  ) -> CLIPConfig:
    """Build the CLIPConfig; both projections must map into the same joint space."""
    vision_dim = weights["visual.proj"].shape[-1]
    text_dim = weights["text_projection"].shape[-1]
    if vision_dim != text_dim:
        raise ValueError(
            f"visual.proj maps to {vision_dim} dimensions but text_projection to {text_dim}; "
            "a CLIP's two towers must share one embedding space."
        )
    vision = _vision_config(weights, layers["visual.transformer.resblocks"], head_width, hidden_act)
    text = _text_config(weights, layers["transformer.resblocks"], head_width, hidden_act,
                        special_ids)
    from transformers import CLIPConfig

    return CLIPConfig(
        vision_config=dict(vision, projection_dim=vision_dim),
        text_config=dict(text, projection_dim=text_dim),
        projection_dim=vision_dim,
        logit_scale_init_value=float(weights["logit_scale"]),
    )


def _rename(weights: Mapping[str, Tensor], layers: Mapping[str, int]) -> dict[str, Tensor]:
    """Map every OpenAI tensor to its `transformers` name(s): rename, transpose or split q/k/v."""
    out = {dst: weights[src] for src, dst in {**_VISION_RENAMES, **_TEXT_RENAMES}.items()}
    out.update({dst: weights[src].t().contiguous() for src, dst in _TRANSPOSED.items()})
    for src, dst in _TOWERS.items():
        for i in range(layers[src]):
            out.update(_convert_block(weights, f"{src}.{i}", f"{dst}.{i}"))
    return out


def _convert_block(weights: Mapping[str, Tensor], src: str, dst: str) -> dict[str, Tensor]:
    """One residual block: split the stacked (3 * width, ...) q/k/v projection, rename the rest."""
    out = {f"{dst}.{new}": weights[f"{src}.{old}"] for old, new in _BLOCK_RENAMES.items()}
    for old, kind in zip(_IN_PROJ, ("weight", "bias"), strict=True):
        stacked = weights[f"{src}.{old}"]  # (3 * width, width) or (3 * width,)
        if stacked.shape[0] % 3:
            raise ValueError(f"{src}.{old} has {stacked.shape[0]} rows, not 3 x width.")
        for name, part in zip(("q_proj", "k_proj", "v_proj"), stacked.chunk(3, dim=0), strict=True):
            out[f"{dst}.self_attn.{name}.{kind}"] = part.contiguous()
    return out


def _check_against_model(converted: Mapping[str, Tensor], config: CLIPConfig) -> None:
    """Compare keys and shapes with a weightless `CLIPModel(config)`; name any tensor that differs.

    The model is built on the meta device (no memory, no initialisation), so this check is cheap
    even for ViT-L.
    """
    from transformers import CLIPModel

    with torch.device("meta"):
        reference = CLIPModel(config).state_dict()
    missing = sorted(set(reference) - set(converted))
    extra = sorted(set(converted) - set(reference))
    if missing or extra:
        raise ValueError(
            f"Internal conversion error: keys missing {missing[:10]}, unexpected {extra[:10]}. "
            "Please report this with the checkpoint's name."
        )
    wrong = [
        f"{key}: {tuple(converted[key].shape)} (expected {tuple(shape)})"
        for key, shape in ((k, v.shape) for k, v in reference.items())
        if converted[key].shape != shape
    ]
    if wrong:
        raise ValueError(
            "The CLIP state dict has tensors whose shapes do not fit the architecture inferred "
            f"from it (in transformers' names): {wrong[:10]}. The file is corrupt or mixes "
            "weights of different models."
        )
