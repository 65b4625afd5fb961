"""The one contract every refiner follows, and the refiner that does nothing.

A refiner is an `nn.Module` called as ``refiner(images, scores) -> DenseScores``: ``images`` are the
B x 3 x H x W images in [0, 1] the scores belong to, ``scores`` a `zegkit.scores.DenseScores` at
the same H x W. A refiner returns scores of the same rows at H x W; it keeps the activation when it
refines the values themselves (PAMR on logits) and returns probabilities with an "identity"
activation when it works on probabilities (the diffusion refiner).
"""

from __future__ import annotations

from torch import Tensor, nn

from zegkit.scores import DenseScores


def check_refiner_inputs(images: Tensor, scores: DenseScores) -> None:
    """Check that ``images`` (B x 3 x H x W) and ``scores`` (B x R x H x W) belong together.

    Raises:
        ValueError: not a batch of RGB images, another batch size, another resolution, or
            scores that are not floating point; the message says how to fix it.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"Refiners need images B x 3 x H x W in [0, 1], got shape {tuple(images.shape)}; add "
            "a batch dimension with unsqueeze(0) for a single image."
        )
    values = scores.values
    if images.shape[0] != values.shape[0]:
        raise ValueError(
            f"The image batch ({images.shape[0]}) and the score batch ({values.shape[0]}) differ; "
            "pass one image per score map."
        )
    if tuple(values.shape[-2:]) != tuple(images.shape[-2:]):
        raise ValueError(
            f"Refiners take scores at the image's resolution {tuple(images.shape[-2:])}, got "
            f"{tuple(values.shape[-2:])}; resize them first with zegkit.inference.resize."
        )
    if not values.is_floating_point():
        raise ValueError(f"Scores must be a float tensor, got {values.dtype}.")


class NoRefine(nn.Module):
    """The ``"none"`` refiner: returns the scores unchanged (after the same input checks)."""

    def forward(self, images: Tensor, scores: DenseScores) -> DenseScores:
        """Return ``scores`` as they are.

        Args:
            images: B x 3 x H x W in [0, 1].
            scores: B x R x H x W dense scores.
        """
        check_refiner_inputs(images, scores)
        return scores
