"""Attention variants for surgery inside CLIP's vision blocks, chosen by name from one table.

Every variant maps the per-head queries and keys of a layer to attention weights (B, heads, T, T);
the block then mixes the layer's values with them. The training-free methods differ mainly in which
variant their last block uses and whether that block keeps its residual and feed-forward paths, so
a method declares a `BlockSurgery` per layer instead of rewriting the block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

Grid = tuple[int, int]
AttentionFn = Callable[..., Tensor]


def _scores(a: Tensor, b: Tensor) -> Tensor:
    """Scaled dot products a·bᵀ / sqrt(head_dim): (B, heads, T, T).

    The scale goes on a (T x d), not on the product (T x T): 3x fewer multiplications at d = 64
    and T = 197, and the same numbers there (1/8 is a power of two).
    """
    return (a * a.shape[-1] ** -0.5) @ b.transpose(-2, -1)


def vanilla(q: Tensor, k: Tensor, grid: Grid) -> Tensor:
    """CLIP's own attention: softmax(q·kᵀ / sqrt(d))."""
    return _scores(q, k).softmax(-1)


def query_query(q: Tensor, k: Tensor, grid: Grid) -> Tensor:
    """Self-correlation of queries, softmax(q·qᵀ / sqrt(d)) (ClearCLIP)."""
    return _scores(q, q).softmax(-1)


def key_key(q: Tensor, k: Tensor, grid: Grid) -> Tensor:
    """Self-correlation of keys, softmax(k·kᵀ / sqrt(d))."""
    return _scores(k, k).softmax(-1)


def correlative(q: Tensor, k: Tensor, grid: Grid) -> Tensor:
    """SCLIP's correlative self-attention: softmax(q·qᵀ/√d) + softmax(k·kᵀ/√d)."""
    return query_query(q, k, grid) + key_key(q, k, grid)


def identity(q: Tensor, k: Tensor, grid: Grid) -> Tensor:
    """Each token attends only to itself: the block passes its values through (MaskCLIP)."""
    tokens = q.shape[-2]
    return torch.eye(tokens, dtype=q.dtype, device=q.device).expand(*q.shape[:-2], tokens, tokens)


@lru_cache(maxsize=32)
def _gaussian_window(grid: Grid, std: float, prefix: int) -> Tensor:
    """NACLIP's neighbourhood bias Ω (T, T); zero in the prefix ([CLS]) rows and columns.

    Ω[p, p'] = exp(-|p - p'|² / (2 std²)) for patches at grid positions p, p' (peak 1, not
    normalised, covering the whole grid), as NACLIP's `gaussian_window` builds it.
    """
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    positions = torch.stack([ys.flatten(), xs.flatten()], dim=-1).float()  # (h*w, 2)
    squared = torch.cdist(positions, positions).pow(2)
    window = torch.zeros(prefix + h * w, prefix + h * w)
    window[prefix:, prefix:] = torch.exp(-squared / (2 * std**2))
    return window


def gaussian_key_key(q: Tensor, k: Tensor, grid: Grid, std: float = 5.0) -> Tensor:
    """NACLIP's neighbourhood attention: softmax(k·kᵀ/√d + Ω), Ω a Gaussian of grid distance
    added to the logits unscaled (std in patches; NACLIP's default 5)."""
    prefix = q.shape[-2] - grid[0] * grid[1]
    window = _gaussian_window(grid, float(std), prefix).to(q.device, q.dtype)
    return (_scores(k, k) + window).softmax(-1)


ATTENTION: dict[str, AttentionFn] = {
    "vanilla": vanilla,
    "qq": query_query,
    "kk": key_key,
    "qq+kk": correlative,
    "identity": identity,
    "gaussian_kk": gaussian_key_key,
}


def check_attention(kind: str) -> None:
    """Raise a ValueError naming `kind` and the valid variants if it is not in ATTENTION."""
    if kind not in ATTENTION:
        raise ValueError(f"Unknown attention variant {kind!r}; choose one of {sorted(ATTENTION)}.")


def attention_weights(kind: str, q: Tensor, k: Tensor, grid: Grid, **options: float) -> Tensor:
    """Attention weights (B, heads, T, T) of variant `kind` from per-head q, k (B, heads, T, d)."""
    check_attention(kind)
    return ATTENTION[kind](q, k, grid, **options)


@dataclass(frozen=True)
class BlockSurgery:
    """How one vision block runs: its attention variant and which of its paths it keeps.

    Attributes:
        attention: key of ATTENTION.
        residual: keep the residual connection around attention (x + attn(x)); without it the
            block outputs the attention branch alone (ClearCLIP's finding for the last block).
        ffn: keep the feed-forward (MLP) branch with its residual.
        options: keyword options of the attention variant, e.g. {"std": 5.0} for "gaussian_kk".
    """

    attention: str = "vanilla"
    residual: bool = True
    ffn: bool = True
    options: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_attention(self.attention)

    def weights(self, q: Tensor, k: Tensor, grid: Grid, mask: Tensor | None = None) -> Tensor:
        """Attention weights (B, heads, T, T) of this block's variant; see `attend` for `mask`."""
        if mask is None:
            return attention_weights(self.attention, q, k, grid, **self.options)
        self._check_mask()
        return (_scores(q, k) + _additive(mask, q)).softmax(-1)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, grid: Grid, mask: Tensor | None = None
    ) -> Tensor:
        """Mix values v (B, heads, T, d) with this block's attention; returns (B, heads, T, d).

        `mask` ((T, T) or (B, T, T); bool True = may attend, or float added to the logits) is
        supported by the vanilla attention, the only one a block with extra masked tokens runs.
        """
        if mask is not None:
            self._check_mask()
            return F.scaled_dot_product_attention(q, k, v, attn_mask=_additive(mask, q))
        if self.attention == "vanilla":
            return F.scaled_dot_product_attention(q, k, v)
        if self.attention == "identity":
            return v
        return attention_weights(self.attention, q, k, grid, **self.options) @ v

    def _check_mask(self) -> None:
        if self.attention != "vanilla":
            raise ValueError(
                f"An attention mask works with the 'vanilla' attention only, not "
                f"{self.attention!r}: apply surgery to layers without masked (suffix) tokens."
            )


def _additive(mask: Tensor, q: Tensor) -> Tensor:
    """A (T, T) or (B, T, T) mask as additive logits broadcastable to (B, heads, T, T)."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~mask.to(q.device), float("-inf")
        )
    mask = mask.to(q.device, q.dtype)
    return mask[:, None] if mask.ndim == 3 else mask


VANILLA = BlockSurgery()
