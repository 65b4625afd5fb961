"""What the browser UI does, without the browser: check uploads, keep segmenters, run, render.

Nothing here imports Gradio, so it is tested like the rest of the library. The UI (`app.py`) only
wires these functions to widgets.

- `check_upload` enforces the upload caps (bytes, pixels) before the image is decoded.
- `SegmenterPool` builds segmenters through the one builder, `load_segmenter`, and keeps them:
  one CLIP per model (shared by every method on it) and one `Segmenter` per method, model,
  checkpoint and refinement, each caching its vocabularies' text embeddings.
- `run_segmentation` is `Segmenter.segment` that also keeps the probability of the chosen class at
  every pixel (for the hover read-out); it calls the same `Segmenter.probabilities` and
  `decide_labels`, and `Segmentation.save` writes the same three files as `zegkit segment`.
- `render_result` draws the page's overlay with `zegkit.viz` (palette, overlay, legend entries).
- `user_message` turns any exception into a sentence for the page; tracebacks go to the log only.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from zegkit.data.base import IGNORE_INDEX
from zegkit.io import SUPPORTED_FORMATS, load_image, to_tensor
from zegkit.segmenter import Segmentation, Segmenter, load_segmenter
from zegkit.serve import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_MB
from zegkit.viz import MAX_PALETTE_CLASSES, legend_entries, overlay, palette

LOG = logging.getLogger("zegkit.serve")

# Segmenters kept in memory (method x model x checkpoint x refinement); the oldest is dropped.
DEFAULT_POOL_SIZE = 4
DEFAULT_OPACITY = 0.5
# Probabilities in the hover map are stored as 8-bit values (1/255 resolution).
HOVER_LEVELS = 255
_SAFE_STEM = re.compile(r"[^\w.-]+")


@dataclass(frozen=True)
class UploadLimits:
    """Caps on what one request may ask the server to decode and segment."""

    max_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS


def check_upload(path: str | Path, limits: UploadLimits) -> Image.Image:
    """The uploaded file as an RGB image, after checking its size and pixel count.

    The pixel count is read from the header, so a huge image is refused before it is decoded.

    Raises:
        ValueError: not an image, too many bytes or too many pixels (the message says which cap
            and the flag that raises it).
    """
    path = Path(path)
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise ValueError(
            f"The file is {size / 2**20:.1f} MB; this server accepts at most "
            f"{limits.max_bytes / 2**20:.0f} MB (start it with --max-upload-mb to raise the cap)."
        )
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(
            f"{path.name!r} is not a readable image. Upload a picture file ({SUPPORTED_FORMATS})."
        ) from error
    if width * height > limits.max_pixels:
        raise ValueError(
            f"The image is {width} x {height} = {width * height / 1e6:.1f} megapixels; this "
            f"server accepts at most {limits.max_pixels / 1e6:.1f} (start it with --max-pixels "
            f"to raise the cap, or upload a smaller image)."
        )
    return load_image(path)


def safe_stem(name: str) -> str:
    """A file stem made of letters, digits, '.', '_' and '-' only (upload names are user input)."""
    stem = _SAFE_STEM.sub("_", Path(name).stem).strip("._") or "image"
    return stem[:80]


class SegmenterPool:
    """Segmenters built once and reused across requests.

    Args:
        device, tokenizer, templates, settings: as for `load_segmenter` (the `zegkit serve`
            flags); templates None leaves the builder's default; `settings` are the user's
            setting flags, applied to every segmenter.
        capacity: segmenters kept; the least recently used goes when a new one is needed.
    """

    def __init__(
        self,
        *,
        device: str = "cpu",
        tokenizer: str | None = None,
        templates: str | None = None,
        settings: dict[str, object] | None = None,
        capacity: int = DEFAULT_POOL_SIZE,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"The segmenter pool needs room for at least 1; got {capacity}.")
        self.device = device
        self.tokenizer = tokenizer
        self.templates = templates
        self.settings = dict(settings or {})
        self.capacity = capacity
        self._backbones: OrderedDict[str, object] = OrderedDict()
        self._segmenters: OrderedDict[tuple, Segmenter] = OrderedDict()
        self.lock = threading.Lock()  # one inference at a time: models are shared, CPUs are few

    def get(
        self, method: str, model: str, checkpoint: str | None = None, refine: str | None = None
    ) -> Segmenter:
        """The segmenter for this choice, built on first use (the CLIP too, once per model)."""
        key = (method, model, checkpoint or None, refine or None)
        if key in self._segmenters:
            self._segmenters.move_to_end(key)
            return self._segmenters[key]
        settings = dict(self.settings)
        if refine:
            settings["refine"] = refine
        options = {} if self.templates is None else {"templates": self.templates}
        segmenter = load_segmenter(
            method,
            model,
            backbone=self._backbones.get(model),
            device=self.device,
            tokenizer=self.tokenizer,
            checkpoint=checkpoint or None,
            **options,
            **settings,
        )
        self._backbones[model] = segmenter.backbone
        self._backbones.move_to_end(model)
        self._segmenters[key] = segmenter
        while len(self._segmenters) > self.capacity:
            self._segmenters.popitem(last=False)
        in_use = {k[1] for k in self._segmenters}
        for name in [name for name in self._backbones if name not in in_use]:
            del self._backbones[name]
        return segmenter


@dataclass
class Result:
    """One method's result on one image, kept for re-rendering (toggles, opacity) and downloads.

    Attributes:
        method: the method's name.
        segmentation: labels (H, W), class names, mean scores, settings.
        confidence: (H, W) float32, probability of the chosen class at each pixel.
        files: the written files by kind ("labels", "overlay", "json").
        seconds: time from the request to the labels (model load included on first use).
    """

    method: str
    segmentation: Segmentation
    confidence: np.ndarray
    files: dict[str, Path]
    seconds: float


def run_segmentation(segmenter: Segmenter, image: Image.Image) -> tuple[Segmentation, np.ndarray]:
    """`segmenter.segment(image)` plus the probability of each pixel's label.

    The same steps as `Segmenter.segment` (probabilities, then `decide_labels` with the
    configured background threshold); a test holds the labels equal to `segment`'s.

    Returns:
        The Segmentation and a (H, W) float32 map of the chosen class's probability.
    """
    text = segmenter.text
    if text is None:
        raise RuntimeError("No vocabulary set: call segmenter.set_vocabulary([...]) first.")
    probabilities = segmenter.probabilities(to_tensor(image)[None])  # (1, K, H, W)
    labels = segmenter.decide(probabilities)  # (1, H, W)
    confidence = probabilities.gather(1, labels[:, None])[0, 0]  # (H, W)
    segmentation = Segmentation(
        labels=labels[0].cpu().numpy().astype(np.int64),
        class_names=list(text.class_names),
        scores=probabilities[0].mean(dim=(1, 2)).cpu().numpy(),
        settings=segmenter.settings(),
    )
    return segmentation, confidence.float().cpu().numpy()


def check_vocabulary(classes: Sequence[str]) -> None:
    """Refuse vocabularies the page cannot draw (the palette image holds 255 classes).

    Raises:
        ValueError: empty, or more classes than a palette label PNG can hold.
    """
    from zegkit.text import parse_classes

    parse_classes(classes)
    if len(classes) > MAX_PALETTE_CLASSES:
        raise ValueError(
            f"{len(classes)} classes given; the label PNG holds at most {MAX_PALETTE_CLASSES}. "
            f"Use fewer classes (or `zegkit segment` from Python for 16-bit labels)."
        )


def new_run_folder(out_dir: Path) -> Path:
    """A fresh, unguessable folder for one request's files, inside the output folder."""
    folder = out_dir / secrets.token_hex(8)
    folder.mkdir(parents=True)
    return folder


# ---- rendering --------------------------------------------------------------------------------
def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def hover_map(labels: np.ndarray, confidence: np.ndarray) -> Image.Image:
    """The hover read-out as an RGB PNG: red = class index, green = probability x 255."""
    pixels = np.zeros((*labels.shape, 3), dtype=np.uint8)  # (H, W, 3)
    pixels[..., 0] = labels.astype(np.uint8)
    pixels[..., 1] = np.rint(np.clip(confidence, 0.0, 1.0) * HOVER_LEVELS).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _percent(fraction: float) -> str:
    """Area as the overlay legend of `zegkit.viz` writes it ("<0.1%" for a sliver)."""
    percent = 100.0 * fraction
    return "<0.1%" if percent < 0.05 else f"{percent:.1f}%"


def render_result(
    result: Result, image: Image.Image, opacity: float, shown: Sequence[str] | None
) -> str:
    """HTML for one result: the overlay (hidden classes unblended), hover data and a legend.

    Args:
        result: what `run_segmentation` produced.
        image: the input image.
        opacity: weight of the class colours, in [0, 1].
        shown: class names to colour; None colours all.
    """
    seg = result.segmentation
    names = seg.class_names
    visible = set(names if shown is None else shown)
    labels = seg.labels.copy()
    for index, name in enumerate(names):
        if name not in visible:
            labels[seg.labels == index] = IGNORE_INDEX
    picture = overlay(image, labels, names, alpha=float(opacity), legend=False)
    colours = palette(len(names))
    rows = []
    for entry in legend_entries(seg.labels, names):
        colour = "#" + "".join(f"{int(c):02x}" for c in colours[entry.index])
        state = "" if entry.name in visible else " zk-hidden"
        rows.append(
            f'<tr class="zk-legend-row{state}" data-class="{html.escape(entry.name)}">'
            f'<td><span class="zk-swatch" style="background:{colour}"></span></td>'
            f'<td class="zk-name">{html.escape(entry.name)}</td>'
            f'<td class="zk-area">{_percent(entry.fraction)}</td>'
            f'<td class="zk-score">{float(seg.scores[entry.index]):.2f}</td></tr>'
        )
    caption = (
        f"{html.escape(result.method)} · {seg.labels.shape[1]}×{seg.labels.shape[0]} · "
        f"{result.seconds:.2f} s"
    )
    return (
        f'<div class="zk-result" data-method="{html.escape(result.method)}">'
        f'<div class="zk-caption">{caption}</div>'
        f'<div class="zk-figure"><img class="zk-overlay" alt="overlay" '
        f'src="{_png_data_url(picture)}" '
        f'data-hover="{_png_data_url(hover_map(seg.labels, result.confidence))}" '
        f"data-classes='{html.escape(json.dumps(names), quote=True)}'>"
        f'<div class="zk-tip" hidden></div></div>'
        f'<table class="zk-legend"><thead><tr><th></th><th>class</th><th>area</th>'
        f"<th>mean p</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


# ---- errors -----------------------------------------------------------------------------------
def user_message(error: BaseException) -> str:
    """A sentence for the page; anything unexpected is logged with its traceback."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return (
            "Out of memory while segmenting. Upload a smaller image, use fewer classes, or start "
            "the server with a smaller --crop-batch or --short-side."
        )
    if isinstance(error, (ValueError, FileNotFoundError, RuntimeError, OSError)):
        text = str(error).strip() or type(error).__name__
        return text.splitlines()[0] if len(text) > 2000 else text
    LOG.exception("zegkit serve: unexpected error", exc_info=error)
    return f"Unexpected error ({type(error).__name__}); the server log has the details."
