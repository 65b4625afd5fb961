"""One-way [CLS] navigation, written once for ClsCLIP and its untrained stand-in.

ClsCLIP (arXiv 2304.06212) answers one (image, class) pair per pass of the vision tower: the
class's token replaces the visual [CLS] at the input of a few shallow layers. This module holds
the mechanics both `methods/clsclip.py` and `methods/clsclip_standin.py` use: which layers are
replaced (`replaced_layers`), the unmodified image tokens entering given layers (`layer_inputs`),
the pair-batched injected passes (`injected_passes`), their cost floor (`encoder_floor`), and
which vocabulary rows are scored by a pass at all (`scored_rows`: a class named "background" is
not a class the text [CLS] can describe, so it never gets a pass).

The layers before the first replaced one do not depend on the class: they run once per crop
(`layer_inputs`), and only the rest of the encoder runs once per (crop, class) pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from zegkit.backbone import BlockSurgery, ClipBackbone
from zegkit.inference import BACKGROUND_NAME
from zegkit.text import TextEmbeddings

# The paper replaces the [CLS] of layers N1 <= i < N2 = 2, 3, 4 of ViT-B/16's 12 layers (its
# ablation on where to inject); other depths get the same fraction of the encoder.
PAPER_LAYERS = range(2, 5)
PAPER_DEPTH = 12

# (replaced-layer slot, image indices (n,), class indices (n,)) -> tokens (n, C) for that layer.
ClassTokens = Callable[[int, Tensor, Tensor], Tensor]
# (last-layer tokens (n, 1 + h*w, C), grid, image indices (n,), class indices (n,)) -> (n, h, w).
Readout = Callable[[Tensor, tuple[int, int], Tensor, Tensor], Tensor]


def replaced_layers(layers: Sequence[int] | None, depth: int) -> list[int]:
    """The 0-based layers whose input [CLS] is replaced, for an encoder of `depth` layers.

    Args:
        layers: the configured layers; None: the paper's 2, 3, 4 of 12 scaled to `depth`.
        depth: the encoder's number of layers.

    Raises:
        ValueError: a configured layer outside the encoder, or none at all.
    """
    if layers is None:
        start = PAPER_LAYERS.start * depth // PAPER_DEPTH
        stop = max(start + 1, PAPER_LAYERS.stop * depth // PAPER_DEPTH)
        return list(range(start, stop))
    chosen = sorted(set(layers))
    if not chosen or chosen[0] < 0 or chosen[-1] >= depth:
        raise ValueError(
            f"ClsCLIP layers {tuple(layers)} must be a non-empty set of 0-based layer indices "
            f"below the encoder's {depth} layers (the paper uses 2, 3, 4 of 12; None picks that)."
        )
    return chosen


def scored_rows(text: TextEmbeddings) -> list[int]:
    """The class rows that get an injected pass: every class but one named "background"."""
    return [index for index, names in enumerate(text.synonyms)
            if names[0].casefold() != BACKGROUND_NAME]


def image_major_pairs(num_images: int, rows: Sequence[int], device: torch.device
                      ) -> tuple[Tensor, Tensor]:
    """(image indices, class indices) of every image x row pair, image-major, each (n,)."""
    rows_t = torch.as_tensor(list(rows), dtype=torch.long, device=device)
    image = torch.arange(num_images, device=device).repeat_interleave(len(rows))
    return image, rows_t.repeat(num_images)


def layer_inputs(backbone: ClipBackbone, pixels: Tensor, layers: Sequence[int]
                 ) -> dict[int, Tensor]:
    """The unmodified image tokens (B, T, C) entering each of `layers`, from one partial pass.

    Args:
        backbone: the frozen CLIP.
        pixels: (B, 3, H, W) normalised crops.
        layers: 0-based layer indices (0: the embeddings after pre_layrnorm).

    Returns:
        layer -> its input tokens, [CLS] first.
    """
    inputs = {0: backbone.embed(pixels)} if 0 in layers else {}
    earlier = sorted({layer - 1 for layer in layers if layer > 0})
    if earlier:
        out = backbone.forward_intermediates(pixels, indices=earlier, stop_early=True)
        for layer, prefix, tokens in zip(earlier, out.intermediate_prefix, out.intermediates,
                                         strict=True):
            inputs[layer + 1] = torch.cat([prefix[:, None], tokens], dim=1)  # (B, 1 + h*w, C)
    return inputs


def encoder_floor(layers: Sequence[int], depth: int, passes: int) -> float:
    """The least `passes` injected passes per crop can cost, in plain forwards of a `depth`-layer
    encoder: the layers before the first replaced one once, the others once per pass
    ((2 + 10 K) / 12 for ViT-B/16's layers 2, 3, 4 and K classes; embeddings not counted)."""
    return (layers[0] + (depth - layers[0]) * passes) / depth


def injected_passes(
    backbone: ClipBackbone,
    start: Tensor,
    grid: tuple[int, int],
    image: Tensor,
    row: Tensor,
    layers: Sequence[int],
    tokens: ClassTokens,
    readout: Readout,
    *,
    pair_batch: int,
    surgery: str = "vanilla",
    extra_cls: dict[int, Tensor] | None = None,
) -> Tensor:
    """One pass per (image, class) pair from the first replaced layer on, the class token in the
    replaced layers.

    Args:
        backbone: the frozen CLIP.
        start: (B, T, C) the image tokens entering `layers[0]` (`layer_inputs`), shared by all
            pairs of an image: the layers before it do not depend on the class.
        grid: the patch grid (h, w).
        image, row: (n,) the pairs' image and class indices.
        layers: the replaced layers, ascending, in the order of `tokens`' slots.
        tokens: the class token of each pair for each replaced layer.
        readout: last-layer tokens -> one score map per pair.
        pair_batch: pairs per backbone call (bounds memory).
        surgery: attention variant of the last block ("vanilla": CLIP's own).
        extra_cls: layer -> (B, C) image tokens put into the [CLS] slot of further layers
            (ClsCLIP's "restore" of the visual [CLS] after the replaced layers).

    Returns:
        (n, h, w) scores.
    """
    last = backbone.num_layers - 1
    blocks = {} if surgery == "vanilla" else {last: BlockSurgery(surgery)}
    maps = []
    for first in range(0, image.numel(), pair_batch):
        images, rows = image[first : first + pair_batch], row[first : first + pair_batch]
        cls = {layer: tokens(slot, images, rows) for slot, layer in enumerate(layers)}
        for layer, token in (extra_cls or {}).items():
            cls[layer] = token[images]
        x = start[images]  # (n, T, C): each pair's copy of its image's shared shallow tokens
        # block by block: forward_intermediates starts from pixels, these layers from `start`
        for index in range(layers[0], last + 1):
            if index in cls:
                x = torch.cat([cls[index][:, None].to(x.dtype), x[:, 1:]], dim=1)
            x, _ = backbone.block(index, x, grid, blocks.get(index))
        maps.append(readout(x, grid, images, rows))
    return torch.cat(maps)
