"""One-way [CLS] navigation, written once for ClsCLIP and its untrained stand-in.

ClsCLIP (arXiv 2304.06212) answers one (image, class) pair per pass of the vision tower: the
class's token replaces the visual [CLS] at the input of a few shallow layers. This module holds
the mechanics both `methods/clsclip.py` and `methods/clsclip_standin.py` use: which layers are
replaced (`replaced_layers`), the pair-batched injected passes (`injected_passes`), and which
vocabulary rows are scored by a pass at all (`scored_rows`: a class named "background" is not a
class the text [CLS] can describe, so it never gets a pass).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from zegkit.backbone import BlockSurgery, ClipBackbone, TokenInjection
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


def injected_passes(
    backbone: ClipBackbone,
    pixels: Tensor,
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
    """One vision pass per (image, class) pair with the class token in the replaced layers.

    Args:
        backbone: the frozen CLIP.
        pixels: (B, 3, H, W) normalised crops.
        image, row: (n,) the pairs' image and class indices.
        layers: the replaced layers, in the order of `tokens`' slots.
        tokens: the class token of each pair for each replaced layer.
        readout: last-layer tokens -> one score map per pair.
        pair_batch: pairs per backbone call (bounds memory).
        surgery: attention variant of the last block ("vanilla": CLIP's own).
        extra_cls: layer -> (B, C) image tokens put into the [CLS] slot of further layers
            (ClsCLIP's "restore" of the visual [CLS] after the replaced layers).

    Returns:
        (n, h, w) scores.
    """
    blocks = None if surgery == "vanilla" else {-1: BlockSurgery(surgery)}
    maps = []
    for start in range(0, image.numel(), pair_batch):
        images, rows = image[start : start + pair_batch], row[start : start + pair_batch]
        override = {layer: tokens(slot, images, rows) for slot, layer in enumerate(layers)}
        for layer, cls in (extra_cls or {}).items():
            override[layer] = cls[images]
        out = backbone.forward_intermediates(
            pixels[images], indices=[], surgery=blocks, inject=TokenInjection(cls=override)
        )
        maps.append(readout(out.hidden, out.grid, images, rows))
    return torch.cat(maps)
