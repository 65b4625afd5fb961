"""ClsCLIP / ClsCLIP+ — "[CLS] Token is All You Need for Zero-Shot Semantic Segmentation", Wu,
Zhang, Jiang, Yang, Jin, Zeng, 2023 (arXiv 2304.06212). No public code; notes in CLSCLIP.md.

What the paper changes. For a target class A the text encoder's global token T_cls = F_t(A) (the
EOT "[CLS]" embedding) is mapped by a linear layer L_i to the vision width and *replaces* the
visual [CLS] token at the input of the shallow layers N1 <= i < N2 (best: layers 2, 3, 4 of
ViT-B/16); the other layers run as CLIP has them, the frozen encoder's patch tokens attend to the
injected class token, and a light K-layer transformer decoder (K = 2) turns the last layer's
tokens E_N into a foreground mask for A. One pass answers one (image, class) pair, as in the
1-way PASCAL-5i / COCO-20i episodes the paper evaluates. L_i and the decoder are trained on the
seen classes (inductive zero-shot); CLIP stays frozen. ClsCLIP+ adds a local zoom-in: a detector
(YOLOv7) proposes boxes, the boxes whose detected class is the target are cropped and segmented
by ClsCLIP one by one, and the region masks are merged with OR.

What zegkit implements.
- The one-way [CLS] navigation through the backbone's token injection
  (``TokenInjection.cls``), with every
  (image, class) pair a row of one batched backbone call (``pair_batch`` rows at a time). Output:
  one score map per class, B x K x h x w, from the class rows ``text.embeddings`` (synonyms
  averaged: each row costs a full backbone pass).
- The trained parts as ``ClsCLIPHead`` (the L_i and the decoder), loaded from ``checkpoint``;
  they will be trained by the trained-methods loop. With a head, the scores are the decoder's
  foreground logits, read with a sigmoid per class.
- Without a checkpoint, a parameter-free stand-in (not in the paper) so the method runs
  training-free: L_i becomes the minimum-norm inverse of CLIP's visual head (visual_projection
  after post_layernorm's gain, with a zero-mean constraint, so that the injected token projects
  back onto the text embedding), rescaled to the norm of the [CLS] token it replaces; the
  decoder becomes the cosine between the last layer's projected patch tokens and the class's
  text embedding (MaskCLIP-style readout, ``last_block_attention`` may swap the last block's
  attention, e.g. "qq+kk").
- ClsCLIP+'s merge (``zoom_in`` / ``merge_regions``) on proposals the caller supplies; zegkit
  ships no detector (deviation: the paper runs YOLOv7, and reports manual boxes as an oracle).

Deviations: the decoder's inner sizes (64-d, 4 heads, a LayerNorm + linear reduction, a linear
read-out per patch) are not given in what we could read of the paper and follow CLIPSeg's light
decoder; "layers 2, 3, 4" are read as 0-based encoder layer indices; the text token is CLIP's
projected, L2-normalised text embedding (for ViT-B/16 the text width and the joint dimension are
both 512, so the paper's T_cls in R^d does not say which).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zegkit.backbone import BlockSurgery, ClipBackbone, TokenInjection
from zegkit.backbone.attention import check_attention
from zegkit.backbone.loading import read_state_dict
from zegkit.methods.base import Method, MethodConfig
from zegkit.scores import Activation
from zegkit.text import TextEmbeddings

# The paper replaces the [CLS] of layers N1 <= i < N2 = 2, 3, 4 of ViT-B/16's 12 layers (its
# ablation on where to inject); other depths get the same fraction of the encoder.
PAPER_LAYERS = range(2, 5)
PAPER_DEPTH = 12
# Logit given to pixels outside every proposal box of a class that has boxes (ClsCLIP+): finite,
# so a pixel outside every box of every class gets a uniform softmax instead of NaN.
OUTSIDE = -1e4


@dataclass
class ClsCLIPConfig(MethodConfig):
    """ClsCLIP settings.

    Attributes:
        layers: encoder layers (0-based) whose input [CLS] is replaced by the class token. None:
            the paper's 2, 3, 4 for a 12-layer encoder, scaled to the depth (e.g. 4..9 of 24).
        checkpoint: file with trained ``ClsCLIPHead`` weights (safetensors or torch). None: the
            parameter-free stand-in for L_i and the decoder (see the module docstring).
        decoder_heads: attention heads of the decoder's layers (CLIPSeg's 4); the other decoder
            sizes are read from the checkpoint.
        last_block_attention: attention variant of the last block (a key of the backbone's
            ATTENTION table); "vanilla" is the paper's unmodified encoder.
        pair_batch: (image, class) pairs per backbone call; bounds memory, each pair is a full
            pass over one crop.
        logit_scale: temperature of the softmax over the cosine scores of the stand-in readout
            (the field's 40); a trained head's foreground logits go through a sigmoid instead.
    """

    layers: tuple[int, ...] | None = None
    checkpoint: str | None = None
    decoder_heads: int = 4
    last_block_attention: str = "vanilla"
    pair_batch: int = 32


# ---- trained parts -------------------------------------------------------------------------------
class ClsCLIPDecoder(nn.Module):
    """The light transformer decoder: last-layer tokens (N, 1 + h*w, C) -> foreground logits.

    Args:
        width: vision width C.
        dim: decoder width (CLIPSeg's reduce_dim, 64).
        depth: transformer layers (the paper's K = 2).
        heads: attention heads per layer.
    """

    def __init__(self, width: int, dim: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.reduce = nn.Linear(width, dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.out = nn.Linear(dim, 1)

    def forward(self, hidden: Tensor, grid: tuple[int, int]) -> Tensor:
        """Foreground logits (N, h, w) from tokens (N, 1 + h*w, C) ([CLS] first)."""
        x = self.reduce(self.norm(hidden))  # (N, T, dim)
        for block in self.blocks:
            x = block(x)
        return self.out(x[:, 1:]).squeeze(-1).reshape(-1, *grid)


class ClsCLIPHead(nn.Module):
    """ClsCLIP's trained parts: one projection L_i per replaced layer and the decoder.

    Args:
        embed_dim: dimension D of the text embeddings.
        width: vision width C.
        num_replaced: number of replaced layers (one L_i each).
        decoder_dim, decoder_depth, decoder_heads: see ClsCLIPDecoder.
    """

    def __init__(
        self,
        embed_dim: int,
        width: int,
        num_replaced: int,
        decoder_dim: int = 64,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
    ) -> None:
        super().__init__()
        self.token_proj = nn.ModuleList(nn.Linear(embed_dim, width) for _ in range(num_replaced))
        self.decoder = ClsCLIPDecoder(width, decoder_dim, decoder_depth, decoder_heads)

    @classmethod
    def for_backbone(
        cls, backbone: ClipBackbone, config: ClsCLIPConfig, **sizes: int
    ) -> ClsCLIPHead:
        """A freshly initialised head sized for `backbone` (to be trained)."""
        layers = replaced_layers(config, backbone.num_layers)
        sizes.setdefault("decoder_heads", config.decoder_heads)
        return cls(backbone.embed_dim, backbone.width, len(layers), **sizes)

    @property
    def embed_dim(self) -> int:
        return self.token_proj[0].in_features

    @property
    def width(self) -> int:
        return self.token_proj[0].out_features

    def cls_tokens(self, text: Tensor) -> Tensor:
        """Class tokens (L, K, C) for text embeddings (K, D), one slice per replaced layer."""
        return torch.stack([proj(text) for proj in self.token_proj])


def load_head(path: str | Path, decoder_heads: int = 4) -> ClsCLIPHead:
    """Load trained ClsCLIP weights; sizes are read from the tensors' shapes.

    Accepts a safetensors file or a torch file holding the head's state dict, a training
    checkpoint with it under "state_dict", or a method state dict (keys prefixed "head.").

    Raises:
        FileNotFoundError: no file at `path`.
        RuntimeError: the file does not hold a ClsCLIP head (missing, extra or misshapen weights).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No ClsCLIP checkpoint at {str(path)!r}. Pass the file written by zegkit's training "
            "loop, or checkpoint=None for the training-free stand-in."
        )
    state = read_state_dict(path)
    state = {key.removeprefix("head."): value for key, value in state.items()}
    if "token_proj.0.weight" not in state or "decoder.reduce.weight" not in state:
        raise RuntimeError(
            f"{str(path)!r} is not a ClsCLIP head: it lacks token_proj.0.weight / "
            f"decoder.reduce.weight (first keys: {sorted(state)[:5]})."
        )
    width, embed_dim = state["token_proj.0.weight"].shape
    head = ClsCLIPHead(
        embed_dim,
        width,
        num_replaced=_count(state, "token_proj."),
        decoder_dim=state["decoder.reduce.weight"].shape[0],
        decoder_depth=_count(state, "decoder.blocks."),
        decoder_heads=decoder_heads,
    )
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise RuntimeError(f"{str(path)!r} does not match a ClsCLIP head: {error}") from None
    return head


def _count(state: dict[str, Tensor], prefix: str) -> int:
    """Number of numbered sub-modules `prefix<i>.` in a state dict."""
    return len({key[len(prefix) :].split(".")[0] for key in state if key.startswith(prefix)})


# ---- the parameter-free stand-in -----------------------------------------------------------------
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


def cls_norms(backbone: ClipBackbone, pixels: Tensor, layers: Sequence[int]) -> Tensor:
    """Norms (L, B) of the unmodified [CLS] token at the input of each of `layers`."""
    norms: dict[int, Tensor] = {}
    if 0 in layers:
        norms[0] = backbone.embed(pixels)[:, 0].float().norm(dim=-1)
    earlier = sorted(layer - 1 for layer in layers if layer > 0)
    if earlier:
        out = backbone.forward_intermediates(pixels, indices=earlier, stop_early=True)
        for layer, prefix in zip(earlier, out.intermediate_prefix, strict=True):
            norms[layer + 1] = prefix.float().norm(dim=-1)
    return torch.stack([norms[layer] for layer in layers])


# ---- the method ----------------------------------------------------------------------------------
def replaced_layers(config: ClsCLIPConfig, depth: int) -> list[int]:
    """The 0-based layers whose input [CLS] is replaced, for an encoder of `depth` layers.

    Raises:
        ValueError: a configured layer outside the encoder, or none at all.
    """
    if config.layers is None:
        start = PAPER_LAYERS.start * depth // PAPER_DEPTH
        stop = max(start + 1, PAPER_LAYERS.stop * depth // PAPER_DEPTH)
        return list(range(start, stop))
    layers = sorted(set(config.layers))
    if not layers or layers[0] < 0 or layers[-1] >= depth:
        raise ValueError(
            f"ClsCLIP layers {config.layers} must be a non-empty set of 0-based layer indices "
            f"below the encoder's {depth} layers (the paper uses 2, 3, 4 of 12; None picks that)."
        )
    return layers


class ClsCLIP(Method):
    """One-way [CLS] navigation: each class's text token steers a full pass of the vision tower."""

    description = "text [CLS] replaces the visual [CLS] in shallow layers; a pass per class (2023)"
    rows = "classes"

    def __init__(self, config: ClsCLIPConfig) -> None:
        super().__init__(config)
        check_attention(config.last_block_attention)
        if config.pair_batch < 1:
            raise ValueError(f"pair_batch must be a positive integer, got {config.pair_batch}.")
        self.head: ClsCLIPHead | None = None
        if config.checkpoint is not None:
            self.head = load_head(config.checkpoint, config.decoder_heads)

    def activation(self) -> Activation:
        """A trained head's foreground logits: a sigmoid per class (each pass answers one class,
        as the paper's 1-way episodes); the stand-in's cosines: the softmax over classes."""
        if self.head is not None:
            return Activation("sigmoid")
        return super().activation()

    def forward(self, backbone: ClipBackbone, pixels: Tensor, text: TextEmbeddings) -> Tensor:
        """Scores (B, K, h, w) of crops `pixels` (B, 3, H, W) for each class row of `text`.

        With a head: the decoder's foreground logits. Without: cosine similarities of the
        projected patch tokens and the class's text embedding.
        """
        layers = replaced_layers(self.config, backbone.num_layers)
        classes = text.embeddings.to(device=pixels.device, dtype=torch.float32)  # (K, D)
        batch, num_classes = pixels.shape[0], classes.shape[0]
        if num_classes == 0:
            raise ValueError("ClsCLIP needs at least one class in the vocabulary.")
        tokens = self._class_tokens(backbone, pixels, classes, layers)
        attention = self.config.last_block_attention
        surgery = None if attention == "vanilla" else {-1: BlockSurgery(attention)}
        scores, total = [], batch * num_classes
        for start in range(0, total, self.config.pair_batch):
            stop = min(start + self.config.pair_batch, total)
            pairs = torch.arange(start, stop, device=pixels.device)
            image, row = pairs // num_classes, pairs % num_classes  # image-major order
            override = {layer: tokens(i, image, row) for i, layer in enumerate(layers)}
            out = backbone.forward_intermediates(
                pixels[image], indices=[], surgery=surgery, inject=TokenInjection(cls=override)
            )
            scores.append(self._readout(backbone, out.hidden, out.grid, classes[row]))
        return torch.cat(scores).reshape(batch, num_classes, *out.grid)

    def _class_tokens(
        self, backbone: ClipBackbone, pixels: Tensor, classes: Tensor, layers: list[int]
    ) -> Callable[[int, Tensor, Tensor], Tensor]:
        """A function (replaced-layer slot, image indices, class indices) -> tokens (n, C)."""
        if self.head is None:
            directions = lift_to_width(backbone, classes)  # (K, C)
            norms = cls_norms(backbone, pixels, layers)  # (L, B)
            return lambda slot, image, row: directions[row] * norms[slot, image, None]
        self._check_head(backbone, layers)
        projected = self.head.cls_tokens(classes.to(self.head.token_proj[0].weight.dtype))
        return lambda slot, image, row: projected[slot, row]

    def _readout(self, backbone: ClipBackbone, hidden: Tensor, grid: tuple[int, int],
                 text: Tensor) -> Tensor:
        """Scores (n, h, w) from last-layer tokens (n, 1 + h*w, C) and each row's text (n, D)."""
        if self.head is not None:
            return self.head.decoder(hidden.to(self.head.decoder.reduce.weight.dtype), grid)
        features = F.normalize(backbone.project(hidden[:, 1:]).float(), dim=-1)  # (n, h*w, D)
        return (features @ text[:, :, None]).reshape(-1, *grid)

    def _check_head(self, backbone: ClipBackbone, layers: list[int]) -> None:
        head = self.head
        if (head.embed_dim, head.width, len(head.token_proj)) != (
            backbone.embed_dim, backbone.width, len(layers)
        ):
            raise RuntimeError(
                f"The ClsCLIP checkpoint was trained for text dim {head.embed_dim}, vision width "
                f"{head.width} and {len(head.token_proj)} replaced layers, but this backbone "
                f"({backbone.name}) has {backbone.embed_dim}, {backbone.width} and the config "
                f"replaces layers {layers}. Use the backbone and layers it was trained with."
            )


# ---- ClsCLIP+: local zoom-in on proposals --------------------------------------------------------
@dataclass(frozen=True)
class Proposal:
    """A region proposal: a box in image pixels and the class the detector gave it.

    Attributes:
        box: (x0, y0, x1, y1), x1 and y1 exclusive; fractional values widen to whole pixels.
        label: the class (row of the vocabulary) the box was detected as.
        score: detector confidence (kept for callers that filter; the merge ignores it).
    """

    box: tuple[float, float, float, float]
    label: int
    score: float = 1.0


# (region pixels (1, 3, h, w), class rows) -> logits (1, len(rows), h, w) at the region's size.
RegionLogits = Callable[[Tensor, list[int]], Tensor]


def clip_box(proposal: Proposal, height: int, width: int) -> tuple[int, int, int, int]:
    """The proposal's box clamped to an image of (height, width).

    Raises:
        ValueError: the box is empty or lies outside the image.
    """
    left, top, right, bottom = proposal.box
    x0, y0, x1, y1 = math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"Proposal box {proposal.box} must have x0 < x1 and y0 < y1.")
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"Proposal box {proposal.box} lies outside the {height}x{width} image.")
    return x0, y0, x1, y1


def merge_regions(
    global_logits: Tensor,
    regions: Sequence[tuple[Proposal, Tensor]],
    keep_global: bool = False,
) -> Tensor:
    """ClsCLIP+'s OR merge of region predictions into the image's logits.

    A class with at least one region takes, at each pixel, the max of its regions' logits there
    (max is the soft OR), and OUTSIDE where none of its boxes reaches; with `keep_global` the
    max also includes the whole-image logits. Classes without regions keep the whole-image
    logits, so no proposals at all gives plain ClsCLIP.

    Args:
        global_logits: K x H x W whole-image logits.
        regions: (proposal, logits h_box x w_box for the proposal's class) pairs; boxes must be
            inside the image (see `clip_box`).
        keep_global: OR the regions with the whole-image prediction too (the paper ORs regions).

    Returns:
        K x H x W merged logits (float32).
    """
    out = global_logits.float().clone()
    height, width = out.shape[-2:]
    union: dict[int, Tensor] = {}
    for proposal, logits in regions:
        x0, y0, x1, y1 = clip_box(proposal, height, width)
        if tuple(logits.shape) != (y1 - y0, x1 - x0):
            raise ValueError(
                f"Region logits of shape {tuple(logits.shape)} do not fit box {proposal.box} "
                f"({y1 - y0} x {x1 - x0} pixels)."
            )
        canvas = union.setdefault(proposal.label, out.new_full((height, width), OUTSIDE))
        canvas[y0:y1, x0:x1] = torch.maximum(canvas[y0:y1, x0:x1], logits.float())
    for label, canvas in union.items():
        out[label] = torch.maximum(canvas, out[label]) if keep_global else canvas
    return out


def zoom_in(
    region_logits: RegionLogits,
    image: Tensor,
    global_logits: Tensor,
    proposals: Sequence[Proposal],
    keep_global: bool = False,
) -> Tensor:
    """ClsCLIP+: re-segment each proposal's crop for its class and OR the results in.

    Args:
        region_logits: segments a crop (1, 3, h, w) for the given class rows, returning logits
            (1, n, h, w) at the crop's size (it may zoom the crop up internally, e.g. a
            Segmenter resizing to its short side).
        image: 3 x H x W, the pixels `region_logits` expects.
        global_logits: K x H x W whole-image logits.
        proposals: boxes with detected classes, e.g. from a detector filtered to the vocabulary.
        keep_global: see `merge_regions`.

    Returns:
        K x H x W merged logits.

    Raises:
        ValueError: a proposal's class is not a row of `global_logits`, or its box is unusable.
    """
    num_classes, height, width = global_logits.shape
    regions = []
    for proposal in proposals:
        if not 0 <= proposal.label < num_classes:
            raise ValueError(
                f"Proposal label {proposal.label} is not a class index in 0..{num_classes - 1}; "
                "map detector classes to the vocabulary's rows first."
            )
        x0, y0, x1, y1 = clip_box(proposal, height, width)
        crop = image[None, :, y0:y1, x0:x1]
        logits = region_logits(crop, [proposal.label])[0, 0]
        regions.append((Proposal((x0, y0, x1, y1), proposal.label, proposal.score), logits))
    return merge_regions(global_logits, regions, keep_global)
