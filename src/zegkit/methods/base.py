"""The method contract and the mechanics the training-free methods share.

A method turns normalised crops into dense scores over the vocabulary's text rows, and says how
those scores become probabilities (`activation`: its own temperature and softmax, sigmoid, or
probabilities already) and which rows it scored (`rows`). Most methods do it in two separable
steps, so a method's feature surgery can feed another classifier or decoder: `dense_features`
(B, D, h, w) in the joint space, then cosine similarity with the text embeddings. Methods whose
visual pass depends on the text (e.g. ClsCLIP) override `forward` instead.

Trained methods also create backbone-sized parameters in `build(backbone)`, return their loss on a
`Batch` (masks) or a `CaptionBatch` (image-caption pairs) from `loss`, and are saved and loaded as
one file by `zegkit.methods.checkpoint`; their trained tensors are exactly `state_dict()` (the
frozen backbone is not part of a method). `image_scores` is the method's zero-shot image
classifier (CLIP's global embedding unless the method has its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zegkit.backbone import BlockSurgery, ClipBackbone
from zegkit.config import check_positive_finite
from zegkit.scores import Activation
from zegkit.text import TextEmbeddings

# (name, options) of a refiner a method applies as part of itself; see zegkit.refine.
RefinerSpec = tuple[str, dict[str, object]]


def token_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Reshape patch tokens (B, h*w, D) into an L2-normalised feature map (B, D, h, w)."""
    batch, _, dim = tokens.shape
    features = tokens.transpose(1, 2).reshape(batch, dim, *grid)
    return F.normalize(features, dim=1)


def cosine_logits(features: Tensor, text: Tensor) -> Tensor:
    """Cosine similarities (B, Q, h, w) float32 of features (B, D, h, w) and text rows (Q, D).

    Float32 also under bf16 autocast: bf16 keeps 8 bits of a cosine (steps of 2^-9 near 0.3), so
    close classes tied or swapped on a few percent of the pixels once a logit scale of ~100
    spread them (the shipped tiny model, fp32 vs bf16 labels: naive 94.1% -> 99.8% agreement).
    Not slower: 15 crops of ViT-B/16 features x 150 rows took 9-11 ms of CPU, 26-27 in bf16.
    """
    with torch.autocast(features.device.type, enabled=False):
        features = F.normalize(features.float(), dim=1).permute(0, 2, 3, 1)  # (B, h, w, D)
        return (features @ text.float().T).permute(0, 3, 1, 2)


@dataclass
class MethodConfig:
    """Settings every method has.

    Attributes:
        logit_scale: temperature s of softmax(s · cos) over the vocabulary; each method's default
            is its paper's (a protocol or the user may set another).
    """

    logit_scale: float = 40.0

    def __post_init__(self) -> None:
        # 0 or a negative scale inverts or flattens the ranking, NaN/inf make every score NaN.
        check_positive_finite("logit_scale", self.logit_scale)


@dataclass
class Batch:
    """A training batch for a trained method's `loss`.

    Attributes:
        pixels: (B, 3, H, W) images normalised for the backbone.
        labels: (B, H, W) int64 class indices into the vocabulary; IGNORE_INDEX is not scored.
        seen: (K,) bool, the classes the loss may see (the zero-shot split's seen classes);
            None: every class of the vocabulary.
    """

    pixels: Tensor
    labels: Tensor
    seen: Tensor | None = None


@dataclass
class CaptionBatch:
    """A training batch of image-caption pairs (methods trained without masks, e.g. PACL).

    Attributes:
        pixels: (B, 3, H, W) images normalised for the backbone.
        captions: B captions, captions[i] describing image i.
    """

    pixels: Tensor
    captions: list[str]


class Method(nn.Module):
    """A zero-shot segmentation method: normalised crops + text embeddings -> dense scores.

    Subclasses set `description` (one line for `zegkit methods`) and implement `dense_features`,
    or override `forward` when their visual pass needs the text. `rows` is "synonyms" when the
    scores are over `text.classifier` (one row per synonym if the vocabulary takes the max over
    synonyms) and "classes" when they are over `text.embeddings` (one row per class).
    """

    description: str = ""
    rows: str = "synonyms"

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        self.config = config

    def activation(self) -> Activation:
        """How this method's scores become probabilities: softmax(logit_scale · scores)."""
        return Activation("softmax", self.config.logit_scale)

    def normalize(self, backbone: ClipBackbone, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] normalised as this method feeds them to the backbone
        (the backbone's own mean/std unless the method was trained with others)."""
        return backbone.normalize(images)

    def default_templates(self) -> str | tuple[str, ...]:
        """The prompt templates vocabularies use unless the user names others."""
        return "imagenet"

    def refiners(self) -> tuple[RefinerSpec, ...]:
        """Refiners the method's paper applies as part of the method (none by default); the
        Segmenter runs them before the user's `refine` chain."""
        return ()

    def dense_features(self, backbone: ClipBackbone, pixels: Tensor) -> Tensor:
        """L2-normalised dense features (B, D, h, w) in the joint image-text space."""
        raise NotImplementedError(f"{type(self).__name__} has no text-independent dense features.")

    def forward(self, backbone: ClipBackbone, pixels: Tensor, text: TextEmbeddings) -> Tensor:
        """Scores (B, R, h, w) of crops `pixels` (B, 3, H, W) against the text rows (`rows`)."""
        return cosine_logits(self.dense_features(backbone, pixels), text.classifier)

    def image_scores(self, backbone: ClipBackbone, pixels: Tensor, text_rows: Tensor) -> Tensor:
        """Zero-shot classification scores (B, K) of whole images against text rows (K, D):
        CLIP's own, the cosine of the global image embedding with each row."""
        image = F.normalize(backbone.image_features(pixels), dim=-1)
        return image @ F.normalize(text_rows.to(image.dtype), dim=-1).T

    # ---- training ------------------------------------------------------------------------------
    def build(self, backbone: ClipBackbone) -> None:
        """Create the parameters sized for `backbone` (trained methods); training-free: nothing.

        Called once before training or before loading trained tensors.
        """

    @property
    def trainable(self) -> bool:
        """Whether the method has parameters to train."""
        return any(True for _ in self.trainable_parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimiser should update (the backbone is never among them)."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def loss(self, backbone: ClipBackbone, batch: Batch | CaptionBatch,
             text: TextEmbeddings | None) -> dict[str, Tensor]:
        """Loss terms on a batch; their sum is minimised. Training-free methods have none.

        `text` is the training vocabulary's embeddings (None for caption data without one).

        Returns:
            {"loss": total, <term>: value, ...}, scalars.
        """
        raise NotImplementedError(
            f"{type(self).__name__} is training-free: it has no parameters and no loss."
        )


class LastBlockMethod(Method):
    """Methods that change only the last vision block, then project patch tokens (MaskCLIP family).

    Subclasses implement `surgery()`: the last block's attention variant and kept paths (None
    leaves the block as CLIP has it).
    """

    def surgery(self) -> BlockSurgery | None:
        raise NotImplementedError

    def dense_features(self, backbone: ClipBackbone, pixels: Tensor) -> Tensor:
        surgery = self.surgery()
        out = backbone.forward_intermediates(
            pixels, indices=[], surgery={-1: surgery} if surgery else None
        )
        return token_map(backbone.project(out.tokens), out.grid)
