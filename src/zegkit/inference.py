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

# Bytes of scores the class decision expands at once: the rows a block of lines needs, at full
# resolution (`StitchedScores.blocks`), and before that, the grid lines of a run of such blocks
# expanded along the width (`StitchedScores._stripes`).
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
    runs of lines that mix the same grid lines (`_bands`) are expanded a block at a time:
    `blocks` yields them, `values` joins them, and the class decision (`decide_stitched`) reads
    them.

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
        """The scores of `rows` at full resolution, B x r x H x W float32, filled a block of
        lines at a time (no second full-size copy)."""
        batch, count, height, width = self.shape
        chosen = torch.zeros(count, dtype=torch.bool, device=self.grid.device)
        chosen[rows] = True
        scores = self.grid.new_empty(batch, int(chosen.sum()), height, width)
        for lines, block, _ in self.blocks(chosen.expand(len(self._bands), -1)):
            scores[:, :, lines] = block.permute(0, 3, 1, 2)
        return scores

    def blocks(self, rows: Tensor | None = None) -> Iterator[tuple[slice, Tensor, Tensor]]:
        """The scores at full resolution as (lines, block B x n x W x r, the block's r row
        indices) for runs of lines that cover H, each block holding every row or those that
        `rows` (bands x R bool, as `contenders` gives it) marks for the band of its lines.

        Rows come last and contiguous, so reductions over them run along memory. A block holds
        at most DECISION_CHUNK_BYTES, or one line. Its lines mix the same few grid lines
        (`_bands`), so each block costs a product over those alone.
        """
        batch, count, _, width = self.shape
        line_bytes = batch * width * FLOAT32_BYTES
        every = torch.arange(count, device=self.grid.device)
        for cells, bands in self._stripes:
            marked = every if rows is None else rows[bands].any(0).nonzero()[:, 0]
            selected = self.grid[:, :, cells] if rows is None else self.grid[:, marked, cells]
            with torch.autocast(self.grid.device.type, enabled=False):
                across = (selected @ self.along_x.T).permute(0, 2, 3, 1).contiguous()
            for band in bands:
                lines, band_cells = self._bands[band]
                part = across[:, band_cells.start - cells.start : band_cells.stop - cells.start]
                kept = marked
                if rows is not None:
                    positions = rows[band, marked].nonzero()[:, 0]
                    if not len(positions):  # no row is marked for these lines
                        continue
                    if len(positions) < len(marked):
                        part, kept = part[..., positions], marked[positions]
                part = part.reshape(batch, part.shape[1], -1)  # (B, c', W * r'), a view
                step = max(1, DECISION_CHUNK_BYTES // (line_bytes * len(kept)))
                for first in range(lines.start, lines.stop, step):
                    some = slice(first, min(first + step, lines.stop))
                    with torch.autocast(self.grid.device.type, enabled=False):
                        block = self.along_y[some, band_cells] @ part  # (B, n, W * r')
                    yield some, block.view(batch, -1, width, len(kept)), kept

    @cached_property
    def _bands(self) -> list[tuple[slice, slice]]:
        """Runs of lines that mix the same span of grid lines (lines, cells): a line mixes a
        few cells of a window or two, so a dense product would multiply mostly zeros."""
        return _runs(self.along_y)

    @cached_property
    def _stripes(self) -> list[tuple[slice, list[int]]]:
        """Runs of consecutive `_bands` (their indices) and the grid lines they mix (cells),
        each run as long as those grid lines of every row, expanded along the image's width
        (B x R x cells x W float32), fit DECISION_CHUNK_BYTES; one band at least."""
        batch, count, _, width = self.shape
        limit = DECISION_CHUNK_BYTES // (batch * count * width * FLOAT32_BYTES)  # grid lines
        stripes: list[tuple[slice, list[int]]] = []
        for index, (_, cells) in enumerate(self._bands):
            if stripes:  # the last stripe takes this band if their grid lines still fit
                span, members = stripes[-1]
                low, high = min(span.start, cells.start), max(span.stop, cells.stop)
                if high - low <= limit:
                    members.append(index)
                    stripes[-1] = (slice(low, high), members)
                    continue
            stripes.append((cells, [index]))
        return stripes

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

    One pass over `StitchedScores.blocks`. A block holds every row its lines need, so the
    labels (each pixel's best row's class: every activation is increasing in the score), a
    softmax's normaliser (for the background threshold and the means) and the means' sums come
    from the block alone. When only the best row counts (no means, no softmax threshold), a
    block holds only the rows that can be best in its lines (`StitchedScores.contenders`).
    With means, the rows are first reordered (`_synonym_order`) so that each class's max over
    its rows takes a few slices. Equal to the full computation up to float rounding; a tie goes
    to the first row in the block (with means an exact tie of two names' scores could go to
    the other name: names are unique, see `zegkit.text.parse_classes`).

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
    row_classes = row_classes.to(stitched.grid.device)
    if means:
        order, widths = _synonym_order(row_classes)
        stitched, row_classes = replace(stitched, grid=stitched.grid[:, order]), row_classes[order]
    if joint:  # the softmax's scaled scores; an axis matrix is cheaper to scale than each block
        stitched = replace(stitched, along_y=activation.scale * stitched.along_y)
    batch, _, height, width = stitched.shape
    labels = torch.empty((batch, height, width), dtype=torch.long, device=stitched.grid.device)
    confidence = None if background_threshold is None else stitched.grid.new_empty(labels.shape)
    # added up in place: a list of small tensors kept between the blocks fragments the heap
    sums = stitched.grid.new_zeros(batch, widths[0]) if means else None
    for lines, block, rows in stitched.blocks(None if joint or means else stitched.contenders()):
        best, best_row = block.max(dim=-1)  # (B, n, W)
        labels[:, lines] = row_classes[rows[best_row]]
        if joint:  # each row's probability times the normaliser, then the best row's probability
            block = block.sub_(best[..., None]).clamp_min_(EXP_FLOOR).exp_()
            best = block.sum(dim=-1).reciprocal_()
        elif confidence is not None:
            best = activation.probabilities(best, None)
        if confidence is not None:
            confidence[:, lines] = best
        if means:
            top = _class_max(block, widths)  # (B, n, W, K)
            sums += (torch.einsum("bnwk,bnw->bk", top, best) if joint
                     else activation.probabilities(top, None).sum(dim=(1, 2)))
    labels = _threshold(labels, confidence, background_threshold, background)
    if not means:
        return Decision(labels)
    class_means = torch.empty_like(sums)
    class_means[:, row_classes[: widths[0]]] = sums / (height * width)  # first rows: a class each
    return Decision(labels, class_means)


def _synonym_order(row_classes: Tensor) -> tuple[Tensor, list[int]]:
    """A reordering (R,) of class-major rows (R,) by depth: each class's first row, then each
    second row, and so on, the classes ordered by their row count (most first, then by index),
    so that at each depth the classes that have a row there come first; and how many do
    (widths, K at depth 0)."""
    counts = torch.bincount(row_classes)
    starts = counts.cumsum(0) - counts
    classes = torch.sort(counts, descending=True, stable=True).indices
    widths = [int((counts > depth).sum()) for depth in range(int(counts.max()))]
    order = torch.cat([starts[classes[:count]] + depth for depth, count in enumerate(widths)])
    return order, widths


def _class_max(block: Tensor, widths: list[int]) -> Tensor:
    """(..., K) each class's max over its rows of scores (..., R) in `_synonym_order`."""
    if len(widths) == 1:
        return block
    top = block[..., : widths[0]].clone()
    offset = widths[0]
    for count in widths[1:]:
        torch.maximum(top[..., :count], block[..., offset : offset + count], out=top[..., :count])
        offset += count
    return top


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
