"""The inference protocol: resize, sliding window, batched crops, stitching, class decisions.

The field's shared protocol (SCLIP's, adopted by ClearCLIP, NACLIP and others): resize so the short
side is S, slide a crop window with a stride, average the overlapping scores, resize them to the
input, optionally refine (PAMR), turn them into class probabilities as the method says
(`zegkit.scores`), argmax, and give pixels whose best class probability is below a threshold the
background label 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from zegkit.hardware import PRECISIONS, autocast_dtype
from zegkit.scores import EXP_FLOOR, Activation

# mmseg's Resize(scale=(2048, S), keep_ratio=True) in the field's configs: the long side is capped.
MAX_LONG_SIDE = 2048
MODES = ("slide", "whole")
# Below-threshold pixels go to the class with this display name (the datasets' class 0).
BACKGROUND_NAME = "background"
UINT8_MAX = 255

# Bytes of full-resolution scores the class decision expands at once: the rows of one band of
# lines (`StitchedScores.blocks`), as many as fit (`decide_stitched`).
DECISION_CHUNK_BYTES = 64 * 2**20
FLOAT32_BYTES = 4
# Scores within this fraction of the largest score's magnitude of beating a row still contend
# with it (`StitchedScores.contenders`): float rounding of the expanded scores stays far below.
CONTENDER_SLACK = 1e-5

CropScores = Callable[[Tensor], Tensor]


@dataclass
class InferenceConfig:
    """How images are fed to a method and how its scores become labels.

    Attributes:
        short_side: resize so the short side has this many pixels (None keeps the input size).
            448 suits ViT-B/16 with 224 crops; the SCLIP protocol uses 336 for most datasets.
        mode: "slide" (crop windows, scores averaged where they overlap) or "whole" (one pass over
            the resized image, position embeddings interpolated).
        crop: sliding-window size in pixels (224, CLIP's training size).
        stride: sliding-window step in pixels (112: every pixel is seen by up to 4 crops).
        crop_batch: crops per backbone call; bounds memory (crops of one image and of all images in
            a batch are pooled and cut into chunks of this size).
        background_threshold: pixels whose best class probability is below this get label 0,
            the background class (None: off). For datasets whose class 0 is background.
        refine: refiners applied to the stitched scores at input resolution, after the method's
            own ("none", "pamr", "diffusion", or names joined by "+"; see zegkit.refine).
        precision: "auto" (bf16 where the device runs it natively: GPUs with bf16, CPUs with
            AVX-512 BF16 or AMX; fp32 elsewhere, e.g. AVX2-only CPUs, where bf16 is emulated
            and several times slower), "fp32", or "bf16" (autocast). `Segmenter.settings`
            records what "auto" resolved to.
        proposals: ClsCLIP+'s local zoom-in (`zegkit.zoom`): "self" (boxes around the
            components of the method's own mask) or a COCO-style boxes JSON file; applied by
            `Segmenter.segment` and the episode protocols. None: off.
        compile: run the method's forward (backbone included) through torch.compile, compiled
            at the first batch of crops (35-40 s of CPU on a ViT-B/16) and reused; then 0.7-0.9x
            the eager time per image on a CPU (README). It changes how the same operations are
            rounded, not what they compute (labels: 99.7-100% equal to eager ones), so an
            evaluation may resume with it changed.
    """

    short_side: int | None = 448
    mode: str = "slide"
    crop: int = 224
    stride: int = 112
    crop_batch: int = 32
    background_threshold: float | None = None
    refine: str = "none"
    precision: str = "auto"
    proposals: str | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.proposals not in (None, "self") and not Path(self.proposals).expanduser().is_file():
            raise FileNotFoundError(
                f"proposals {self.proposals!r} is neither 'self' nor a boxes file; pass 'self' "
                "or a COCO-style JSON of boxes (see zegkit.zoom)."
            )
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {PRECISIONS}, got {self.precision!r}."
            )
        for name in ("crop", "stride", "crop_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.stride > self.crop:
            raise ValueError(
                f"stride ({self.stride}) larger than crop ({self.crop}) would leave pixels unseen."
            )
        if self.short_side is not None and self.short_side < 1:
            raise ValueError(f"short_side must be positive or None, got {self.short_side}.")
        threshold = self.background_threshold
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"background_threshold is a probability in [0, 1], got {threshold}.")


def precision_context(precision: str, device: str | torch.device) -> AbstractContextManager:
    """Autocast to the dtype of `precision` (a PRECISIONS name, "auto" resolved for `device`)
    on `device`; fp32 disables it."""
    dtype = autocast_dtype(precision, device)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


def resized_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """Size after scaling the short side to `short_side`, the long side capped at MAX_LONG_SIDE."""
    if short_side is None:
        return height, width
    scale = min(short_side / min(height, width), MAX_LONG_SIDE / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (B, C, H, W); antialiased when shrinking."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrinking = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(
        images, size=size, mode="bilinear", align_corners=False, antialias=shrinking
    )


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows covering [0, length): a step of `stride`, the last flush with the
    end (SCLIP / mmseg slide inference). An input shorter than the crop gets one window at 0."""
    steps = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(steps)]


def pad_to(images: Tensor, size: int) -> Tensor:
    """Zero-pad (B, C, H, W) at the bottom/right so both sides are at least `size`.

    Images smaller than a crop are padded, not stretched: in normalised pixels zero is the mean
    colour, and the padded scores are cut away again after the pass.
    """
    pad_h, pad_w = max(size - images.shape[-2], 0), max(size - images.shape[-1], 0)
    return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images


def sliding_crops(padded: Tensor, config: InferenceConfig) -> tuple[Tensor, list[tuple[int, int]]]:
    """The sliding-window crops of images (B, 3, H, W) at least one crop in size (`pad_to`).

    Returns:
        crops (B * n, 3, crop, crop), image-major, and the n window corners (y, x).
    """
    boxes = [
        (y, x)
        for y in window_starts(padded.shape[-2], config.crop, config.stride)
        for x in window_starts(padded.shape[-1], config.crop, config.stride)
    ]
    crops = torch.stack(
        [padded[:, :, y : y + config.crop, x : x + config.crop] for y, x in boxes], 1
    )
    return crops.flatten(0, 1), boxes  # (B * n, 3, crop, crop)


@dataclass(frozen=True)
class StitchedScores:
    """A batch's dense scores at full resolution, kept factored so that no (R, H, W) tensor is
    needed until asked for: the score of row r at pixel (y, x) is
    ``along_y[y] @ grid[:, r] @ along_x[x]``.

    Stitching, averaging, cropping and resizing are linear and act on the two image axes
    separately, so the windows' scores are kept side by side at their own (patch) resolution in
    `grid` and each axis's chain of those steps is one matrix. A pixel mixes a few cells, so
    runs of lines that mix the same grid lines (`_bands`) are expanded one at a time: `blocks`
    yields them, `values` joins them, and the class decision (`decide_stitched`) reads them.

    Attributes:
        grid: B x R x gh x gw float32: window (i, j)'s scores (R, h, w) fill block (i, j).
        along_y: H x gh float32, how each line of the image mixes the grid's lines:
            non-negative weights summing to 1 per line (a weighted mean, as every step is).
        along_x: W x gw float32, the same for columns.
    """

    grid: Tensor
    along_y: Tensor
    along_x: Tensor

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, R, H, W) of the full-resolution scores."""
        return (*self.grid.shape[:2], self.along_y.shape[0], self.along_x.shape[0])

    def values(self, rows: slice = slice(None)) -> Tensor:
        """The scores of `rows` at full resolution, B x r x H x W float32, filled a band of
        lines at a time (no second full-size copy)."""
        batch, _, height, width = self.shape
        count = self.grid[:, rows].shape[1]
        scores = self.grid.new_empty(batch, count, height, width)
        for lines, block in self.blocks(rows):
            scores[:, :, lines] = block.permute(0, 3, 1, 2)
        return scores

    def blocks(self, rows: slice | Tensor = slice(None)) -> Iterator[tuple[slice, Tensor]]:
        """The scores of `rows` (a slice or indices) at full resolution as (lines, block) for
        runs of image lines that cover H, each block B x n x W x r (rows last, contiguous):
        reductions over the rows then run along memory, on a block small enough to stay in
        cache. A run of lines mixes the same few grid lines (`_bands`), so each block costs a
        product over those alone."""
        for lines, block, _ in self._line_blocks(rows):
            yield lines, block

    def contending_blocks(self, step: int) -> Iterator[tuple[slice, Tensor, Tensor]]:
        """`blocks` of only the rows that can be best somewhere in them (`contenders`), at
        most `step` rows at a time: (lines, block B x n x W x r, the block's r row indices)."""
        contending = self.contenders()  # (bands, R)
        for chunk in contending.any(0).nonzero()[:, 0].split(step):
            for lines, block, kept in self._line_blocks(chunk, contending[:, chunk]):
                yield lines, block, chunk if kept is None else chunk[kept]

    def _line_blocks(self, rows: slice | Tensor, contending: Tensor | None = None
                     ) -> Iterator[tuple[slice, Tensor, Tensor | None]]:
        """`blocks`, and which of `rows` each holds: all (None), or a band's rows marked in
        `contending` (bands x r bool), given as positions in `rows`."""
        batch, _, lines, _ = self.grid.shape
        selected = self.grid[:, rows]  # one gather when `rows` are indices
        width, count = self.along_x.shape[0], selected.shape[1]
        with torch.autocast(self.grid.device.type, enabled=False):
            across = selected @ self.along_x.T  # (B, r, gh, W)
            across = across.permute(0, 2, 3, 1).reshape(batch, lines, -1)  # (B, gh, W * r)
        for index, (band, cells) in enumerate(self._bands):
            part, kept = across[:, cells], None
            if contending is not None and not contending[index].all():
                kept = contending[index].nonzero()[:, 0]
                if not len(kept):  # none of these rows is best anywhere in this band
                    continue
                part = part.view(batch, -1, width, count)[..., kept].flatten(2)
            with torch.autocast(self.grid.device.type, enabled=False):
                block = self.along_y[band, cells] @ part  # (B, n, W * r')
            yield band, block.view(batch, -1, width, block.shape[-1] // width), kept

    @property
    def block_lines(self) -> int:
        """The most image lines one of `blocks`' blocks holds."""
        return max(band.stop - band.start for band, _ in self._bands)

    @cached_property
    def _bands(self) -> list[tuple[slice, slice]]:
        """Runs of lines that mix the same span of grid lines (lines, cells): a line mixes a
        few cells of a window or two, so a dense product would multiply mostly zeros."""
        return _runs(self.along_y)

    def contenders(self) -> Tensor:
        """(bands, R) bool: the rows that can be some pixel's best in each of `_bands`, found
        without expanding any. Pixels that mix the same span of grid cells form a tile, each
        pixel a weighted mean of those cells with non-negative weights, so a row whose maximum
        over a tile's cells is below another row's minimum over them is nowhere best in that
        tile. Rows within float rounding of that bound are kept."""
        # reductions over leading dimensions run along memory: grid as (gw, gh, B, R), then
        # each run of columns' extremes as (gh, runs, B, R)
        cells = self.grid.permute(3, 2, 0, 1).contiguous()
        columns = [span for _, span in _runs(self.along_x)]
        highest = torch.stack([cells[span].amax(0) for span in columns], 1)
        lowest = torch.stack([cells[span].amin(0) for span in columns], 1)
        slack = CONTENDER_SLACK * float(self.grid.abs().max())
        contending = []
        for _, span in self._bands:  # the tiles (runs, B, R) of one band of lines
            top = highest[span].amax(0)
            bar = lowest[span].amin(0).amax(-1, keepdim=True)  # the best row's minimum
            contending.append((top >= bar - slack).flatten(0, 1).any(0))
        return torch.stack(contending)

    def resized(self, size: tuple[int, int]) -> StitchedScores:
        """The same scores as `resize(self.values(), size)` gives them, the resize folded into
        the axis matrices."""
        if tuple(size) == tuple(self.shape[-2:]):
            return self
        resize_y, resize_x = resize_matrices(self.shape[-2:], size)
        return replace(self, along_y=resize_y.to(self.along_y.device) @ self.along_y,
                       along_x=resize_x.to(self.along_x.device) @ self.along_x)


def resize_matrices(size: tuple[int, int], new_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """`resize` from `size` (H, W) to `new_size` (H', W') as two matrices (H' x H, W' x W):
    ``resize(x, new_size) == my @ x @ mx.T`` (bilinear interpolation acts on each axis alone)."""
    if tuple(size) == tuple(new_size):
        return torch.eye(size[0]), torch.eye(size[1])
    antialias = new_size[0] < size[0] or new_size[1] < size[1]  # as `resize` decides
    return tuple(_axis_matrix(n, m, antialias) for n, m in zip(size, new_size, strict=True))


def _axis_matrix(length: int, new_length: int, antialias: bool) -> Tensor:
    """(new_length, length): bilinear resizing of one axis, read off by resizing one-hots."""
    # (1, length one-hots, 1, length): resized along the width, where torch's kernels treat
    # this layout as plainly contiguous (a (1, n, n, 1) one also reads as channels-last)
    one_hots = torch.eye(length)[None, :, None, :]
    resized = F.interpolate(one_hots, size=(1, new_length), mode="bilinear",
                            align_corners=False, antialias=antialias)
    return resized[0, :, 0, :].T


def _runs(matrix: Tensor) -> list[tuple[slice, slice]]:
    """Runs of consecutive rows of `matrix` with the same span of non-zero columns, as
    (rows, columns) slices."""
    nonzero = matrix != 0
    first = nonzero.int().argmax(dim=1).tolist()
    last = (nonzero.shape[1] - nonzero.flip(1).int().argmax(dim=1)).tolist()
    runs, start = [], 0
    for row in range(1, len(first) + 1):
        if row == len(first) or (first[row], last[row]) != (first[start], last[start]):
            runs.append((slice(start, row), slice(first[start], last[start])))
            start = row
    return runs


def _window_matrix(starts: Sequence[int], length: int, crop: int, cells: int) -> Tensor:
    """(length, len(starts) * cells): each position averages the windows covering it, window i
    contributing its `cells` scores resized to the crop (block i of the columns)."""
    resized = resize_matrices((cells, 1), (crop, 1))[0]  # (crop, cells)
    matrix = torch.zeros(length, len(starts) * cells)
    for index, start in enumerate(starts):
        matrix[start : start + crop, index * cells : (index + 1) * cells] = resized
    covering = torch.zeros(length)
    for start in starts:
        covering[start : start + crop] += 1
    return matrix / covering[:, None]


def sliding_scores(crop_scores: CropScores, pixels: Tensor, config: InferenceConfig
                   ) -> StitchedScores:
    """Stitch a method's scores over sliding crops of normalised `pixels` (B, 3, H, W).

    Crops of every image are batched together, `config.crop_batch` per call. As the field's
    protocol does, each crop's scores count as resized to the crop and each pixel is the mean
    over the crops covering it; the result keeps them at the crops' own resolution
    (`StitchedScores`), so memory does not grow with rows x pixels.

    Returns:
        The scores, (B, R, H, W) once expanded.
    """
    batch, _, height, width = pixels.shape
    padded = pad_to(pixels, config.crop)
    crops, _ = sliding_crops(padded, config)
    scores = torch.cat([
        crop_scores(crops[start : start + config.crop_batch]).float()
        for start in range(0, crops.shape[0], config.crop_batch)
    ])  # (B * n, R, h, w), image-major, windows row-major
    ys = window_starts(padded.shape[-2], config.crop, config.stride)
    xs = window_starts(padded.shape[-1], config.crop, config.stride)
    rows, h, w = scores.shape[1:]
    grid = scores.view(batch, len(ys), len(xs), rows, h, w).permute(0, 3, 1, 4, 2, 5)
    grid = grid.reshape(batch, rows, len(ys) * h, len(xs) * w)
    along_y = _window_matrix(ys, padded.shape[-2], config.crop, h)[:height]
    along_x = _window_matrix(xs, padded.shape[-1], config.crop, w)[:width]
    return StitchedScores(grid, along_y.to(grid.device), along_x.to(grid.device))


def whole_scores(crop_scores: CropScores, pixels: Tensor, patch_size: int) -> StitchedScores:
    """A method's scores over whole images (B, 3, H, W), as resized back to (H, W).

    The input is zero-padded to a multiple of the patch size so every pixel lies in a patch.
    """
    height, width = pixels.shape[-2:]
    pad_h, pad_w = -height % patch_size, -width % patch_size
    scores = crop_scores(F.pad(pixels, (0, pad_w, 0, pad_h))).float()
    along_y, along_x = resize_matrices(scores.shape[-2:], (height + pad_h, width + pad_w))
    device = scores.device
    return StitchedScores(scores, along_y[:height].to(device), along_x[:width].to(device))


def decide_labels(
    probabilities: Tensor, background_threshold: float | None, background: int | None = None
) -> Tensor:
    """Argmax labels (B, H, W) of probabilities (B, K, H, W); pixels whose best probability is
    below the threshold get the `background` class (`background_class` finds it by name).

    Raises:
        ValueError: a threshold without a background index (no class would be a silent guess).
    """
    best, labels = probabilities.max(dim=1)
    return _threshold(labels, best, background_threshold, background)


def _threshold(labels: Tensor, best: Tensor, background_threshold: float | None,
               background: int | None) -> Tensor:
    """`labels` with the `background` class where the best probability `best` is below the
    threshold (both (B, H, W)); see `decide_labels`."""
    if background_threshold is not None:
        if background is None:
            raise ValueError("A background threshold needs the index of the background class.")
        labels[best < background_threshold] = background
    return labels


@dataclass
class Decision:
    """The class decision of a batch.

    Attributes:
        labels: (B, H, W) int64 class indices, background threshold applied.
        mean_probabilities: (B, K) each class's probability averaged over the pixels, when
            asked for (None otherwise).
    """

    labels: Tensor
    mean_probabilities: Tensor | None = None


def decide_stitched(
    stitched: StitchedScores,
    activation: Activation,
    row_classes: Tensor,
    background_threshold: float | None = None,
    background: int | None = None,
    means: bool = False,
) -> Decision:
    """`decide_labels(class_probabilities(...))` of stitched scores without holding them.

    The rows are expanded to pixels a block of lines and a run of rows at a time
    (`StitchedScores.blocks`, DECISION_CHUNK_BYTES) and folded into running (B, H, W) maps:
    the labels are the class of each pixel's best row
    (every activation is increasing in the score, so the best row is the most probable; ties
    go to the first row, as an argmax does). When nothing but the best row counts (no means,
    no softmax threshold), only the rows that can be best somewhere are expanded
    (`StitchedScores.contenders`). A softmax's normaliser, needed only for the
    background threshold and the means, is summed in the same pass, shifted by an upper bound
    of each pixel's best score (`_best_score_bound`) so no exponential overflows; the means
    take a second pass. Equal to the full computation up to float rounding.

    Args:
        stitched: scores (B, R, H, W) over the method's rows.
        activation: how the scores become probabilities (over all R rows jointly).
        row_classes: (R,) the class of each row, class-major (`zegkit.scores.row_classes`).
        background_threshold, background: as `decide_labels`.
        means: also return each class's mean probability over the pixels.

    Raises:
        ValueError: a threshold without a background index.
    """
    joint = activation.kind == "softmax" and (background_threshold is not None or means)
    prune = not (joint or means)  # only each pixel's best row counts
    shift = activation.scale * _best_score_bound(stitched) if joint else None
    batch, _, height, width = stitched.shape
    best = stitched.grid.new_full((batch, height, width), float("-inf"))
    best_row = torch.zeros(best.shape, dtype=torch.long, device=best.device)
    total = torch.zeros_like(best) if joint else None
    step = _rows_per_block(stitched)
    blocks = stitched.contending_blocks(step) if prune else _every_block(stitched, step)
    for lines, block, rows in blocks:  # (B, n, W, r) and the r rows' indices
        block_best, block_row = block.max(dim=-1)
        better = block_best > best[:, lines]  # ties keep the earlier row, as argmax does
        kept_row = best_row[:, lines]
        torch.where(better, rows[block_row], kept_row, out=kept_row)
        torch.maximum(best[:, lines], block_best, out=best[:, lines])
        if joint:
            exponents = activation.scale * block - shift[:, lines, :, None]
            total[:, lines] += exponents.clamp_min_(EXP_FLOOR).exp_().sum(dim=-1)
    log_normalizer = shift + total.log() if joint else None
    labels = row_classes.to(best_row.device)[best_row]
    if background_threshold is not None:
        confidence = activation.probabilities(best[:, None], log_normalizer)[:, 0]
        labels = _threshold(labels, confidence, background_threshold, background)
    if not means:
        return Decision(labels)
    starts = _class_starts(row_classes.cpu())
    return Decision(labels, _class_means(stitched, activation, row_classes.cpu(), starts,
                                          _class_chunks(starts, stitched), log_normalizer))


def _class_means(stitched: StitchedScores, activation: Activation, row_classes: Tensor,
                 starts: list[int], chunks: list[slice], log_normalizer: Tensor | None
                 ) -> Tensor:
    """(B, K) each class's probability averaged over the pixels: a class's probability is
    that of its best row (the activation is increasing), so one exponential per class."""
    batch, classes, height, width = stitched.shape[0], len(starts) - 1, *stitched.shape[2:]
    sums = stitched.grid.new_zeros(batch, classes)
    for chunk in chunks:
        rows = slice(starts[chunk.start], starts[chunk.stop])
        row_class = (row_classes[rows] - chunk.start).to(stitched.grid.device)
        for lines, block in stitched.blocks(rows):  # (B, n, W, r)
            top = _class_max(block, row_class, chunk.stop - chunk.start)
            normalizer = None if log_normalizer is None else log_normalizer[:, lines]
            probabilities = activation.probabilities(top.permute(0, 3, 1, 2), normalizer)
            sums[:, chunk] += probabilities.sum(dim=(2, 3))
    return sums / (height * width)


def _class_max(block: Tensor, row_class: Tensor, classes: int) -> Tensor:
    """(..., k): each class's max over its rows of scores (..., r) whose rows belong to the
    classes `row_class` (r,) in 0..k-1."""
    if block.shape[-1] == classes:
        return block
    out = block.new_full((*block.shape[:-1], classes), float("-inf"))
    return out.scatter_reduce(-1, row_class.expand_as(block), block, reduce="amax",
                              include_self=False)


def _best_score_bound(stitched: StitchedScores) -> Tensor:
    """(B, H, W), at least each pixel's best score over the rows and close to it: the rows' max
    over the grid, stitched and resized like the scores (each pixel's score is a weighted mean
    of grid cells with non-negative weights, so its max over rows is at most the same mean of
    the cells' maxima)."""
    bound = replace(stitched, grid=stitched.grid.amax(dim=1, keepdim=True))
    return bound.values()[:, 0]


def _class_starts(row_classes: Tensor) -> list[int]:
    """The first row of each class and the row count (K + 1 ints) of class-major rows (R,)."""
    classes = int(row_classes[-1]) + 1
    return torch.searchsorted(row_classes, torch.arange(classes + 1)).tolist()


def _class_chunks(starts: list[int], stitched: StitchedScores) -> list[slice]:
    """Runs of whole classes (slices of class indices) whose rows in one of `stitched.blocks`'
    blocks (B x n x W x r float32) fit DECISION_CHUNK_BYTES; one class at least."""
    budget = _rows_per_block(stitched)
    chunks, first = [], 0
    for last in range(1, len(starts) - 1):  # does class `last` still fit the run from `first`?
        if starts[last + 1] - starts[first] > budget:
            chunks.append(slice(first, last))
            first = last
    chunks.append(slice(first, len(starts) - 1))
    return chunks


def _every_block(stitched: StitchedScores, step: int) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """`stitched.blocks` of all rows, `step` at a time, as `contending_blocks` gives them."""
    count = stitched.shape[1]
    for first in range(0, count, step):
        rows = slice(first, min(first + step, count))
        indices = torch.arange(rows.start, rows.stop, device=stitched.grid.device)
        yield from ((lines, block, indices) for lines, block in stitched.blocks(rows))


def _rows_per_block(stitched: StitchedScores) -> int:
    """How many rows one of `stitched.blocks`' blocks (B x n x W x r float32) may hold within
    DECISION_CHUNK_BYTES; 1 at least."""
    batch, _, _, width = stitched.shape
    return max(1, DECISION_CHUNK_BYTES // (batch * stitched.block_lines * width * FLOAT32_BYTES))


def background_class(classes: Sequence[Sequence[str]]) -> int:
    """The index of the class named "background" (any case), which below-threshold pixels get.

    Args:
        classes: synonym lists per class, the display name first (`zegkit.text.parse_classes`).

    Raises:
        ValueError: no class is named "background": without one a threshold would hand
            uncertain pixels to a real class.
    """
    for index, names in enumerate(classes):
        if names[0].casefold() == BACKGROUND_NAME:
            return index
    raise ValueError(
        f"A background threshold gives uncertain pixels the class named {BACKGROUND_NAME!r}, "
        f"and these classes have none ({[names[0] for names in classes][:10]}). Add it, e.g. "
        f"--classes \"{BACKGROUND_NAME}, cat, dog\" (it is scored like any class), or drop "
        "the threshold."
    )


def unit_images(images: object) -> Tensor:
    """Check an image batch and return it as float32 (B, 3, H, W) in [0, 1].

    uint8 tensors (0..255) are scaled by 1/255; float tensors must already lie in [0, 1] (an
    image in 0..255 or CLIP-normalised would otherwise be silently misread).

    Raises:
        TypeError: not a torch tensor.
        ValueError: another layout or dtype, no pixels, NaN/inf, or values outside [0, 1].
    """
    if not isinstance(images, Tensor):
        raise TypeError(
            f"images must be a torch.Tensor (B, 3, H, W) in [0, 1], got {type(images).__name__}. "
            "For a path, PIL image or (H, W, 3) array use Segmenter.segment(); or convert: "
            "torch.from_numpy(array).permute(2, 0, 1)[None] / 255."
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
    if images.numel() == 0:
        raise ValueError(f"images have no pixels (shape {tuple(images.shape)}).")
    if images.dtype == torch.uint8:
        return images.float() / UINT8_MAX
    if not images.is_floating_point():
        raise ValueError(
            f"images must be float in [0, 1] or uint8, got dtype {images.dtype}; convert with "
            ".float() / 255 for 0..255 values."
        )
    images = images.float()
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values.")
    low, high = (float(value) for value in torch.aminmax(images))
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"images must hold values in [0, 1], got [{low:g}, {high:g}]: divide 0..255 values "
            "by 255; pass images before normalisation (each method normalises them itself)."
        )
    return images
