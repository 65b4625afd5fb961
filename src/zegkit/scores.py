"""Dense scores and how they become class probabilities: the contract between methods, refiners
and the class decision.

A method's scores are not always cosine similarities waiting for one shared softmax: CLIP-style
methods take softmax(s · cos) over the vocabulary at their own temperature s, ZegCLIP-family
decoders score each class with a sigmoid, and CLIPer's map is already a probability. So a method
says how its scores turn into probabilities (an `Activation`), and which text rows it scored:
every row of `TextEmbeddings.classifier` ("synonyms": one row per synonym when the vocabulary
takes the max over synonyms) or one row per class ("classes"). `DenseScores` carries the three
together through stitching and refinement; `class_probabilities` is the one place where rows
become classes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from zegkit.text import TextEmbeddings, reduce_synonym_logits

ACTIVATIONS = ("softmax", "sigmoid", "identity")
# exp() of less than this gives a float32 denormal (below 1.2e-38 from -87.3), which x86 CPUs
# compute some 100x slower; probabilities that small are clipped to exp(-80) = 1.8e-35.
EXP_FLOOR = -80.0
ROWS = ("synonyms", "classes")


@dataclass(frozen=True)
class Activation:
    """How scores become probabilities.

    Attributes:
        kind: "softmax" over all scored rows jointly (CLIP's zero-shot classifier), "sigmoid" on
            each row by itself (per-class decoders), or "identity" (already probabilities).
        scale: multiplies the scores before the softmax or sigmoid (a method's logit scale or
            temperature); must be 1 for "identity".
    """

    kind: str = "softmax"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATIONS:
            raise ValueError(f"Activation kind must be one of {ACTIVATIONS}, got {self.kind!r}.")
        if self.scale <= 0:
            raise ValueError(f"Activation scale must be positive, got {self.scale}.")
        if self.kind == "identity" and self.scale != 1.0:
            raise ValueError("An 'identity' activation (probabilities already) takes no scale.")

    def probabilities(self, values: Tensor, log_normalizer: Tensor | None) -> Tensor:
        """Probabilities of some of the rows, values (B, r, ...), in float32: a softmax needs the
        log of its normaliser over all rows, log_normalizer (B, ...) = logsumexp(scale · scores)
        over dim 1; sigmoid and identity take None."""
        values = values.float()
        if self.kind == "softmax":
            exponents = self.scale * values - log_normalizer[:, None]
            return exponents.clamp_min_(EXP_FLOOR).exp_()
        return self(values)

    def __call__(self, scores: Tensor) -> Tensor:
        """Probabilities of scores (B, R, ...) over dim 1, in float32."""
        scores = scores.float()
        if self.kind == "softmax":
            return (self.scale * scores).softmax(dim=1)
        if self.kind == "sigmoid":
            return (self.scale * scores).sigmoid()
        return scores


@dataclass(frozen=True)
class DenseScores:
    """Dense scores of a batch of images with what is needed to read them.

    Attributes:
        values: B x R x H x W scores (float).
        activation: how `values` become probabilities.
        rows: "synonyms" (R = rows of `TextEmbeddings.classifier`) or "classes" (R = classes).
    """

    values: Tensor
    activation: Activation
    rows: str = "synonyms"

    def __post_init__(self) -> None:
        if self.rows not in ROWS:
            raise ValueError(f"rows must be one of {ROWS}, got {self.rows!r}.")
        if self.values.ndim != 4:
            raise ValueError(
                f"Dense scores must be B x R x H x W, got shape {tuple(self.values.shape)}."
            )

    def with_values(self, values: Tensor, activation: Activation | None = None) -> DenseScores:
        """The same kind of scores with new values (and, if given, a new activation)."""
        return replace(self, values=values, activation=activation or self.activation)

    def probabilities(self) -> Tensor:
        """Per-row probabilities B x R x H x W (float32)."""
        return self.activation(self.values)


def row_classes(kind: str, rows: int, text: TextEmbeddings) -> Tensor:
    """The class of each of `rows` scored rows (R,), class-major: how `class_probabilities`
    maps rows to classes, for code that reduces rows chunk by chunk.

    Args:
        kind: what the rows are, "synonyms" or "classes" (`DenseScores.rows`).
        rows: how many rows were scored.
        text: the vocabulary.

    Raises:
        ValueError: the number of rows does not match what `kind` declares.
    """
    expected = text.classifier.shape[0] if kind == "synonyms" else text.num_classes
    if rows != expected:
        raise ValueError(
            f"Scores declared per {'classifier row' if kind == 'synonyms' else 'class'} have "
            f"{rows} rows for a vocabulary of {expected} such rows ({text.num_classes} classes)."
        )
    if kind == "synonyms" and text.synonym_reduce == "max" and rows != text.num_classes:
        return text.class_index
    return torch.arange(text.num_classes)


def class_probabilities(scores: DenseScores, text: TextEmbeddings) -> Tensor:
    """Per-class probabilities B x K x H x W: the activation, then each class takes the max over
    the rows of its synonyms (the field's use of class-name files with synonyms).

    Raises:
        ValueError: the number of score rows does not match what `scores.rows` declares.
    """
    probabilities = scores.probabilities()
    if scores.rows == "synonyms":
        return reduce_synonym_logits(probabilities, text)
    if probabilities.shape[1] != text.num_classes:
        raise ValueError(
            f"Scores declared per class have {probabilities.shape[1]} rows for a vocabulary of "
            f"{text.num_classes} classes."
        )
    return probabilities
