"""ClsCLIP stand-in: ClsCLIP-style [CLS] injection with NOTHING trained. Not the paper's method.

An ablation, reported next to `naive` (the same readout without injection) so that the
injection's own effect is visible. ClsCLIP itself (arXiv 2304.06212, `methods/clsclip.py`)
trains the maps L_i and a decoder; this stand-in replaces both by parameter-free guesses:

- L_i: the minimum-norm inverse of CLIP's visual head (visual_projection after post_layernorm's
  gain, with a zero-mean constraint, so that the injected token projects back onto the text
  embedding), rescaled to the norm of the [CLS] token it replaces. The head it inverts maps
  LAST-layer tokens to the joint space; layers 2-4, where the token goes, live in another basis
  (shared/research/clsclip.md §8), so this is a guess at the direction, right only in scale.
- The decoder: the cosine between the last layer's projected patch tokens and the class's text
  embedding (naive CLIP dense prediction; `last_block_attention` may swap the last block's
  attention, e.g. "qq+kk"), softmax over the vocabulary.

Every vocabulary row (a "background" row too) gets its own injected pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from zegkit.backbone import ClipBackbone
from zegkit.backbone.attention import check_attention
from zegkit.methods.base import Method, MethodConfig
from zegkit.methods.cls_injection import (
    encoder_floor,
    image_major_pairs,
    injected_passes,
    layer_inputs,
    replaced_layers,
)
from zegkit.text import TextEmbeddings


@dataclass
class ClsCLIPStandinConfig(MethodConfig):
    """Stand-in settings.

    Attributes:
        layers: encoder layers (0-based) whose input [CLS] is replaced by the lifted class
            token. None: the paper's 2, 3, 4 for a 12-layer encoder, scaled to the depth.
        last_block_attention: attention variant of the last block (a key of the backbone's
            ATTENTION table); "vanilla" is CLIP's unmodified last block.
        pair_batch: (image, class) pairs per backbone call; bounds memory.
        logit_scale: temperature of the softmax over the cosine scores (the field's 40).
    """

    layers: tuple[int, ...] | None = None
    last_block_attention: str = "vanilla"
    pair_batch: int = 32


def lift_to_width(backbone: ClipBackbone, text: Tensor) -> Tensor:
    """Unit directions (K, C) in the vision width that CLIP's visual head maps onto `text` (K, D).

    Solves, with minimum norm, W_p (γ ⊙ n) = t and sum(n) = 0 (W_p visual_projection, γ the gain
    of post_layernorm): a zero-mean n is left unchanged by the layer norm's centring, so
    project(s · n) = t / std(n) + W_p β for any scale s, i.e. it points back at t.
    """
    weight = backbone.model.visual_projection.weight.float()  # (D, C)
    gain = backbone.vision.post_layernorm.weight.float()  # (C,)
    system = torch.cat([weight * gain, torch.ones_like(gain)[None]])  # (D + 1, C)
    target = torch.cat([text.float(), text.new_zeros(text.shape[0], 1).float()], dim=1)
    return F.normalize(target @ torch.linalg.pinv(system).T, dim=-1)  # (K, C)


class ClsCLIPStandin(Method):
    """Untrained ClsCLIP-style injection: lifted text token in, cosine readout out."""

    description = ("UNTRAINED approximation of ClsCLIP's [CLS] injection (inverse-head lift, "
                   "cosine readout), an ablation beside naive; not the paper's method")
    rows = "classes"

    def __init__(self, config: ClsCLIPStandinConfig) -> None:
        super().__init__(config)
        check_attention(config.last_block_attention)
        if config.pair_batch < 1:
            raise ValueError(f"pair_batch must be a positive integer, got {config.pair_batch}.")

    def forward_floor(self, backbone: ClipBackbone, text: TextEmbeddings) -> float:
        """Plain encoder forwards per crop that `forward` needs at least (`encoder_floor`)."""
        layers = replaced_layers(self.config.layers, backbone.num_layers)
        return encoder_floor(layers, backbone.num_layers, text.num_classes)

    def forward(self, backbone: ClipBackbone, pixels: Tensor, text: TextEmbeddings) -> Tensor:
        """Cosine scores (B, K, h, w) of crops (B, 3, H, W), one injected pass per class row."""
        layers = replaced_layers(self.config.layers, backbone.num_layers)
        classes = text.embeddings.to(device=pixels.device, dtype=torch.float32)  # (K, D)
        if classes.shape[0] == 0:
            raise ValueError("The ClsCLIP stand-in needs at least one class in the vocabulary.")
        directions = lift_to_width(backbone, classes)  # (K, C)
        inputs = layer_inputs(backbone, pixels, layers)  # layer -> (B, T, C)
        norms = torch.stack([inputs[layer][:, 0].float().norm(dim=-1) for layer in layers])

        def tokens(slot: int, image: Tensor, row: Tensor) -> Tensor:
            return directions[row] * norms[slot, image, None]  # norms: (L, B)

        def readout(hidden: Tensor, grid: tuple[int, int], image: Tensor, row: Tensor) -> Tensor:
            features = F.normalize(backbone.project(hidden[:, 1:]).float(), dim=-1)  # (n, hw, D)
            return (features @ classes[row][:, :, None]).reshape(-1, *grid)

        image, row = image_major_pairs(pixels.shape[0], range(classes.shape[0]), pixels.device)
        scores = injected_passes(backbone, inputs[layers[0]], backbone.grid_size(pixels), image,
                                 row, layers, tokens, readout, pair_batch=self.config.pair_batch,
                                 surgery=self.config.last_block_attention)
        return scores.reshape(pixels.shape[0], classes.shape[0], *scores.shape[-2:])
