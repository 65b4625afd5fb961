"""Refinement of dense scores, chosen by name: ``REFINERS = {"none", "pamr", "diffusion"}``.

Every refiner follows one contract (`zegkit.refine.base`): ``refiner(images B x 3 x H x W in
[0, 1], scores: DenseScores at H x W) -> DenseScores``. The Segmenter runs them at one point of the
pipeline, after stitching, at image resolution, before the class decision: first the refiners a
method applies as part of itself (`Method.refiners()`), then the user's chain
(`InferenceConfig.refine`, e.g. "diffusion+pamr").
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from zegkit.refine.base import NoRefine
from zegkit.refine.diffusion import DiffusionRefiner
from zegkit.refine.pamr import PAMR, PAMR_DILATIONS, PAMR_ITERATIONS

CHAIN_SEPARATOR = "+"


def _none(*, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    return NoRefine()


def _pamr(
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    num_iter: int = PAMR_ITERATIONS,
    dilations: Sequence[int] = PAMR_DILATIONS,
) -> nn.Module:
    """PAMR has no weights: it runs in float32 on the images' device whatever `device`/`dtype`."""
    return PAMR(num_iter=num_iter, dilations=dilations)


def _diffusion(*, device: str | torch.device, dtype: torch.dtype, **options: object) -> nn.Module:
    """Options are the fields of `DiffusionRefinerConfig` (model, threshold, layers, ...)."""
    return DiffusionRefiner.from_pretrained(device=device, dtype=dtype, **options)


# name -> builder(*, device, dtype, **options)
REFINERS: dict[str, Callable[..., nn.Module]] = {
    "none": _none,
    "pamr": _pamr,
    "diffusion": _diffusion,
}

_DESCRIPTIONS = {
    "none": "no refinement",
    "pamr": "PAMR: scores propagated along colour-similar neighbours (Araslanov & Roth 2020)",
    "diffusion": "Stable Diffusion self-attention compensation of probabilities (CLIPer, needs "
    "zegkit[diffusion] and SD weights)",
}


def list_refiners() -> dict[str, str]:
    """Refiner names with a one-line description each."""
    return {name: _DESCRIPTIONS[name] for name in sorted(REFINERS)}


def create_refiner(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **options: object,
) -> nn.Module:
    """Build the refiner called ``name`` (a key of ``REFINERS``).

    Args:
        name: "none", "pamr" or "diffusion".
        device: where a refiner with weights (diffusion) lives.
        dtype: the weight dtype of a refiner with weights (the Segmenter's precision).
        **options: the refiner's settings, e.g. ``num_iter=10, dilations=(8, 16)`` for PAMR or
            ``model=..., threshold=0.1`` for diffusion; None values are dropped so that unset
            CLI flags keep the defaults.

    Raises:
        ValueError: unknown name or option (the valid ones are listed), or an invalid value.
    """
    if name not in REFINERS:
        raise ValueError(f"Unknown refiner {name!r}; choose one of {sorted(REFINERS)}.")
    options = {key: value for key, value in options.items() if value is not None}
    builder = REFINERS[name]
    signature = inspect.signature(builder)
    try:
        signature.bind(device=device, dtype=dtype, **options)
    except TypeError as error:
        valid = sorted(set(signature.parameters) - {"device", "dtype"})
        raise ValueError(
            f"Bad options {sorted(options)} for refiner {name!r} ({error}); valid options are "
            f"{valid}."
        ) from None
    return builder(device=device, dtype=dtype, **options)


def parse_refine_chain(text: str) -> list[str]:
    """The refiner names of a chain such as "pamr", "none" or "diffusion+pamr", in order.

    "none" stands for no refinement and is left out of the result ("none" gives []).

    Raises:
        ValueError: a name that is not a refiner (the valid ones and the syntax are listed).
    """
    names = [part.strip() for part in text.split(CHAIN_SEPARATOR)]
    unknown = [name for name in names if name not in REFINERS]
    if unknown:
        raise ValueError(
            f"Unknown refiner(s) {unknown} in refine={text!r}: use one of {sorted(REFINERS)}, or "
            f"several joined by {CHAIN_SEPARATOR!r} and run in that order, e.g. 'diffusion+pamr'."
        )
    return [name for name in names if name != "none"]
