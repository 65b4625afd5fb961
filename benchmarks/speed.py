"""Time per image of each method vs the plain backbone forward over the same crops.

A ViT-B/16-shaped CLIP with random weights (speed does not depend on the weights) segments a
448 x 597 image (15 sliding-window crops of 224 at stride 112) with each method; the baseline is
one plain vision forward over those 15 crops. Prints seconds per image and the ratio, per precision.

    python benchmarks/speed.py [--repeats 3] [--precisions fp32 bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import VIT_SHAPES, random_backbone

from zegkit.backbone import ClipBackbone
from zegkit.inference import PRECISIONS, InferenceConfig, window_starts
from zegkit.io import atomic_write
from zegkit.methods import METHODS, create_method
from zegkit.segmenter import Segmenter

IMAGE_SIZE = (448, 597)  # a 4:3 photo resized to short side 448, the default protocol
# CLIPer is timed fusion-only: Stable Diffusion weights cannot be had offline.
METHOD_SETTINGS = {"cliper": {"compensation": False}}
CLASSES = ["person", "dog", "grass", "sky", "road", "car", "tree", "building", "water", "wall"]


def timed(fn, repeats: int) -> float:
    """Best wall-clock seconds of `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def plain_forward(backbone: ClipBackbone, config: InferenceConfig, image: torch.Tensor):
    """The reference: one unmodified vision forward over the same crops, same batching."""
    pixels = backbone.normalize(image)
    crops = torch.cat(
        [
            pixels[:, :, y : y + config.crop, x : x + config.crop]
            for y in window_starts(IMAGE_SIZE[0], config.crop, config.stride)
            for x in window_starts(IMAGE_SIZE[1], config.crop, config.stride)
        ]
    )
    dtype = PRECISIONS[config.precision]

    def run() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            for start in range(0, len(crops), config.crop_batch):
                backbone.forward_intermediates(crops[start : start + config.crop_batch], indices=[])

    return run, len(crops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per entry (default: 3)")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32", "bf16"],
        choices=sorted(PRECISIONS),
        help="(default: fp32 bf16)",
    )
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS), help="(default: all)")
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()

    backbone = random_backbone(*VIT_SHAPES["ViT-B/16"])
    image = torch.rand(1, 3, *IMAGE_SIZE)
    rows = []
    print(f"threads={torch.get_num_threads()} image={IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}")
    for precision in args.precisions:
        config = InferenceConfig(short_side=None, precision=precision)
        reference, n_crops = plain_forward(backbone, config, image)
        base = timed(reference, args.repeats)
        print(f"\n{precision}: plain forward over {n_crops} crops: {base:.3f} s")
        print(f"{'method':<12}{'s/image':>10}{'x plain':>10}")
        for name in args.methods:
            segmenter = Segmenter(
                backbone, create_method(name, **METHOD_SETTINGS.get(name, {})), config
            )
            segmenter.set_vocabulary(CLASSES)
            seconds = timed(lambda s=segmenter: s.predict(image), args.repeats)
            rows.append(
                dict(
                    precision=precision,
                    method=name,
                    seconds=seconds,
                    plain_seconds=base,
                    ratio=seconds / base,
                )
            )
            print(f"{name:<12}{seconds:>10.3f}{seconds / base:>10.2f}")
    if args.json:
        with atomic_write(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
