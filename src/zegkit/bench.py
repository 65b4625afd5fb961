"""`zegkit bench`: each method's seconds per image against the plain CLIP vision forward over the
same crops, and its peak memory, per model, vocabulary size and precision.

    zegkit bench                                   # every method, 10 and 150 classes, both models
    zegkit bench --methods sclip cliper --classes 150 --repeats 3 --json bench.json

Models: a ViT-B/16-shaped CLIP with random weights built from a `CLIPConfig` (speed and memory do
not depend on the weights, and none need downloading), and the shipped `zegkit/tiny-synthetic`.
Trained methods run with their freshly initialised parts (their cost does not depend on the values
either). One image of 448 x 597 (a 4:3 photo at the default short side 448: 15 crops of 224 at
stride 112) is labelled with `Segmenter.predict`, the evaluation path.

Each row alternates the method and the plain forward (`transformers`' `CLIPVisionTransformer` over
the same crops, same crop batch, same autocast) N times in one process after one warm-up of each:
seconds are medians, the ratio is the median of the N paired ratios (robust to a busy neighbour
that slows both). Peak memory is the process's resident-set high-water mark (Linux VmHWM, reset
before one extra labelling call via /proc/self/clear_refs after returning freed memory with
malloc_trim), so it includes the loaded model; elsewhere the process's lifetime peak
(`resource.ru_maxrss`) is reported and marked so. The CPU model, its bf16 flags and torch's thread
count are part of the output.

A method that states its own floor (`forward_floor`: the plain forwards per crop its design needs
at least, e.g. ClsCLIP's encoder pass per class after shared shallow layers) also gets its ratio
to that floor, "x floor"; other rows show "-" there.

"x FLOPs" is the work of one labelling call against the plain forward's, counted by
`torch.utils.flop_counter` (matrix products, convolutions, attention): it does not depend on the
machine or on what else runs on it, so it shows extra work where timings on a busy machine cannot.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from zegkit.backbone import ClipBackbone, load_clip
from zegkit.hardware import (
    PRECISIONS,
    cpu_bf16_flags,
    cpu_model,
    glibc,
    native_bf16,
    resolve_precision,
    usable_cores,
)
from zegkit.inference import (
    InferenceConfig,
    pad_to,
    precision_context,
    sliding_crops,
)
from zegkit.io import save_json_atomic
from zegkit.methods import METHODS, Method, create_method
from zegkit.segmenter import Segmenter

# name: (patch, width, layers, heads, mlp) of OpenAI's vision towers
VIT_SHAPES = {
    "ViT-B/16": (16, 768, 12, 12, 3072),
    "ViT-L/14": (14, 1024, 24, 16, 4096),
}
RANDOM_B16 = "random-ViT-B/16"
TINY = "zegkit/tiny-synthetic"
MODELS = (RANDOM_B16, TINY)
IMAGE_SIZE = (448, 597)  # a 4:3 photo resized to the default short side 448
CLASS_COUNTS = (10, 150)
REPEATS = 5
# CLIPer is timed fusion-only: its compensation needs Stable Diffusion weights.
METHOD_SETTINGS: dict[str, dict[str, object]] = {"cliper": {"compensation": False}}
# One template: the per-image cost does not depend on how many templates built the embeddings.
TEMPLATES = "single"
# The random model's tokenizer, trained on these words (the class names' other characters
# fall back to its byte-level alphabet).
TOKENIZER_WORDS = "a photo of the person dog grass sky road car tree building water wall"
KIB = 1024
GIB = 1024**3
CLEAR_PEAK_RSS = "5"  # Linux: writing 5 to /proc/<pid>/clear_refs resets VmHWM to VmRSS


def random_backbone(
    patch: int, width: int, layers: int, heads: int, mlp: int, projection: int = 512
) -> ClipBackbone:
    """A CLIP with the given vision shape, ViT-B's text tower and random (seeded) weights."""
    from transformers import CLIPConfig, CLIPModel

    from zegkit.backbone.tokenizer import train_clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config=dict(
            hidden_size=width,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            patch_size=patch,
            image_size=224,
        ),
        text_config=dict(vocab_size=1000, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        projection_dim=projection,
    )
    tokenizer = train_clip_tokenizer([TOKENIZER_WORDS] * 4, vocab_size=1000)
    return ClipBackbone(CLIPModel(config), tokenizer, f"random-{patch}-{width}x{layers}")


def load_bench_model(name: str) -> ClipBackbone:
    """RANDOM_B16 (built, random weights) or any model `load_clip` loads (e.g. TINY)."""
    if name == RANDOM_B16:
        return random_backbone(*VIT_SHAPES["ViT-B/16"])
    return load_clip(name)


def class_names(count: int) -> list[str]:
    """The first `count` ADE20K class names (with their synonyms), then "object <i>"."""
    from zegkit.data.base import shipped_class_names

    ade = shipped_class_names("ade150")
    return ade[:count] + [f"object {index}" for index in range(len(ade), count)]


def bench_method(name: str, backbone: ClipBackbone) -> Method:
    """Method `name` for timing: METHOD_SETTINGS applied, trained parts freshly initialised."""
    method = create_method(name, **METHOD_SETTINGS.get(name, {}))
    method.build(backbone)
    return method


def plain_forward(backbone: ClipBackbone, image: torch.Tensor, config: InferenceConfig
                  ) -> tuple[Callable[[], None], int]:
    """The floor: `transformers`' own vision forward over the crops `config` cuts from `image`
    (B, 3, H, W) in [0, 1], batched and autocast as the Segmenter does; and the crop count."""
    crops, _ = sliding_crops(pad_to(backbone.normalize(image), config.crop), config)
    interpolate = config.crop != backbone.image_size

    @torch.no_grad()
    def run() -> None:
        with precision_context(config.precision, crops.device):
            for start in range(0, len(crops), config.crop_batch):
                chunk = crops[start : start + config.crop_batch]
                backbone.vision(pixel_values=chunk, interpolate_pos_encoding=interpolate)

    return run, len(crops)


def paired_seconds(method: Callable[[], object], plain: Callable[[], object], repeats: int
                   ) -> tuple[float, float, float]:
    """(median method seconds, median plain seconds, median of the paired ratios) over `repeats`
    alternating runs, after one warm-up of each."""
    method(), plain()
    pairs = [(_seconds(method), _seconds(plain)) for _ in range(repeats)]
    return (statistics.median(m for m, _ in pairs), statistics.median(p for _, p in pairs),
            statistics.median(m / p for m, p in pairs))


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of `fn`, as `torch.utils.flop_counter` counts them
    (matrix products, convolutions, attention; element-wise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_memory(fn: Callable[[], object]) -> tuple[int, str]:
    """(bytes, how measured): the process's resident-set peak while `fn` runs (see the module
    docstring), the loaded model included."""
    gc.collect()
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text(CLEAR_PEAK_RSS)
    except OSError:
        fn()
        return _lifetime_peak(), "process lifetime peak RSS (ru_maxrss)"
    fn()
    status = Path("/proc/self/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * KIB, "peak RSS during the call (VmHWM after clear_refs)"


def _lifetime_peak() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * KIB  # bytes on macOS, KiB on Linux


@dataclass
class BenchRow:
    """One measured case; seconds per image, ratio = method / plain forward (paired median)."""

    model: str
    method: str
    classes: int
    precision: str
    seconds: float
    plain_seconds: float
    ratio: float
    peak_gib: float
    crops: int
    flop_ratio: float  # the method's counted FLOPs / the plain forward's (see `flops`)
    floor: float | None = None  # the method's own floor in plain forwards (None: not stated)

    @property
    def floor_ratio(self) -> float | None:
        """Seconds against `floor` plain forwards (ratio / floor), None without a floor."""
        return None if self.floor is None else self.ratio / self.floor


def resolve_precisions(names: Sequence[str]) -> list[str]:
    """"auto" as the precision it picks here (bf16 where native, else fp32), duplicates dropped.

    Raises:
        ValueError: a name not in PRECISIONS.
    """
    resolved = []
    for name in names:
        chosen = resolve_precision(name, "cpu")
        if chosen not in resolved:
            resolved.append(chosen)
    return resolved


def bench_model(backbone: ClipBackbone, model: str, methods: Sequence[str],
                classes: Sequence[int], precisions: Sequence[str], repeats: int,
                report: Callable[[BenchRow], None]) -> tuple[list[BenchRow], str]:
    """Measure every (precision, class count, method) on one backbone; `report` sees each row.

    Returns:
        The rows and how peak memory was measured.
    """
    image = torch.rand(1, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    rows, measure = [], ""
    for precision in precisions:
        config = InferenceConfig(precision=precision)
        plain, crops = plain_forward(backbone, image, config)
        plain_flops = flops(plain)
        for count in classes:
            names = class_names(count)
            for name in methods:
                segmenter = Segmenter(backbone, bench_method(name, backbone), config,
                                      templates=TEMPLATES)
                segmenter.set_vocabulary(names)
                label = partial(segmenter.predict, image)
                seconds, plain_seconds, ratio = paired_seconds(label, plain, repeats)
                peak, measure = peak_memory(label)
                method = segmenter.method
                floor = (method.forward_floor(backbone, segmenter.text)
                         if hasattr(method, "forward_floor") else None)
                row = BenchRow(model, name, count, precision, seconds, plain_seconds, ratio,
                               peak / GIB, crops, flops(label) / plain_flops, floor)
                report(row)
                rows.append(row)
    return rows, measure


def machine() -> dict[str, object]:
    """What the numbers depend on: CPU, its bf16 flags, torch's threads, the usable cores."""
    return {
        "cpu": cpu_model(),
        "cpu_bf16_flags": cpu_bf16_flags(),
        "native_bf16": native_bf16("cpu"),
        "torch_threads": torch.get_num_threads(),
        "usable_cores": usable_cores(),
        "torch": torch.__version__,
    }


HEADER = (f"{'model':<22}{'method':<16}{'K':>5}{'prec':>6}{'s/image':>10}{'plain s':>9}"
          f"{'x plain':>9}{'x floor':>9}{'x FLOPs':>9}{'peak GB':>9}")


def format_row(row: BenchRow) -> str:
    """One table line (HEADER's columns); GB = GiB."""
    floor = "-" if row.floor_ratio is None else f"{row.floor_ratio:.2f}"
    return (f"{row.model:<22}{row.method:<16}{row.classes:>5}{row.precision:>6}"
            f"{row.seconds:>10.3f}{row.plain_seconds:>9.3f}{row.ratio:>9.2f}{floor:>9}"
            f"{row.flop_ratio:>9.3f}{row.peak_gib:>9.2f}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `zegkit bench`."""
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        metavar="METHOD",
                        help="methods to time (default: all; ClsCLIP runs a ViT pass per class "
                        f"and crop, minutes per image at 150 classes): {', '.join(METHODS)}")
    parser.add_argument("--classes", nargs="+", type=int, default=list(CLASS_COUNTS),
                        help="vocabulary sizes: the first K ADE20K classes (default: "
                        f"{' '.join(map(str, CLASS_COUNTS))})")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "auto"], choices=PRECISIONS,
                        help="precisions; auto is bf16 where this hardware runs it natively "
                        "(default: fp32 auto)")
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        help=f"{RANDOM_B16} (built with random weights) and/or any model "
                        f"`--model` takes (default: {' '.join(MODELS)})")
    parser.add_argument("--repeats", type=int, default=REPEATS,
                        help=f"paired timed runs per row (default: {REPEATS})")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the machine and the rows here (default: none)")


def run(args: argparse.Namespace) -> None:
    """Run `zegkit bench` with parsed arguments: print the table, write the JSON if asked."""
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}.")
    if min(args.classes) < 1:
        raise ValueError(f"--classes must be positive counts, got {args.classes}.")
    precisions = resolve_precisions(args.precisions)
    info = machine()
    print(", ".join(f"{key}={value}" for key, value in info.items()))
    print(f"image {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, {args.repeats} paired runs per row")
    print(HEADER, flush=True)
    rows, measure = [], ""
    for model in args.models:
        backbone = load_bench_model(model)
        found, measure = bench_model(backbone, model, args.methods, args.classes, precisions,
                                     args.repeats, lambda row: print(format_row(row), flush=True))
        rows.extend(found)
        del backbone
    print(f"peak GB: {measure}")
    if args.json is not None:
        record = {"machine": info, "image": list(IMAGE_SIZE), "repeats": args.repeats,
                  "memory": measure,
                  "rows": [{**asdict(row), "floor_ratio": row.floor_ratio} for row in rows]}
        save_json_atomic(record, args.json)
