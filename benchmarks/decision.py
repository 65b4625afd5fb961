"""Seconds of the class decision alone (`decide_stitched`: labels only, as `predict` runs it, and
with each class's mean probability, as `Segmenter.segment` runs it) and how many rows the first
expands, on the shipped tiny CLIP's SCLIP scores of synthetic scenes: at the
stitched size (448 px, the short side) and resized to 600 x 800, with the 20 proving-ground
classes and with 130 ADE20K names added (150 classes, 258 rows with synonyms).

    python benchmarks/decision.py [--scenes 3] [--repeats 11] [--json out.json]

"expanded" is the fraction of (run of lines, row) pairs whose row can be best somewhere in the
run (`StitchedScores.contenders`); only those are expanded to pixels.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from zegkit.bench import TEMPLATES, bench_method, load_bench_model, machine
from zegkit.data.base import shipped_class_names
from zegkit.data.synthetic import CLASSES, generate_scene
from zegkit.inference import InferenceConfig, decide_stitched
from zegkit.io import save_json_atomic
from zegkit.scores import row_classes
from zegkit.segmenter import Segmenter

MODEL = "zegkit/tiny-synthetic"
SIZES = ((448, 448), (600, 800))
ADE_ADDED = 130  # ADE20K names sharing no synonym with the proving ground's classes


def vocabularies() -> dict[str, list[str]]:
    ours = set(CLASSES)
    ade = [name for name in shipped_class_names("ade150")
           if not {synonym.strip() for synonym in name.split(";")} & ours]
    return {"20 classes": list(CLASSES), "150 classes": list(CLASSES) + ade[:ADE_ADDED]}


def measure(segmenter: Segmenter, image: torch.Tensor, repeats: int) -> dict:
    """Median seconds over `repeats` of the decision without and with the means (alternating),
    and the fraction of (run of lines, row) pairs the first expands."""
    _, stitched = segmenter._stitched(image)
    rows = row_classes(segmenter.method.rows, stitched.shape[1], segmenter.text)
    activation = segmenter.method.activation()
    seconds = {False: [], True: []}
    for _ in range(repeats):
        for means in seconds:
            start = time.perf_counter()
            decide_stitched(stitched, activation, rows, means=means)
            seconds[means].append(time.perf_counter() - start)
    return {"rows": stitched.shape[1], "seconds": statistics.median(seconds[False]),
            "means_seconds": statistics.median(seconds[True]),
            "expanded": float(stitched.contenders().float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=3, help="scenes, seeds 1.. (default: 3)")
    parser.add_argument("--repeats", type=int, default=11, help="timed runs (default: 11)")
    parser.add_argument("--json", default=None, help="also save the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    backbone = load_bench_model(MODEL)
    rows = []
    for label, names in vocabularies().items():
        segmenter = Segmenter(backbone, bench_method("sclip", backbone),
                              InferenceConfig(precision="fp32"), templates=TEMPLATES)
        segmenter.set_vocabulary(names)
        for seed in range(1, args.scenes + 1):
            for size in SIZES:
                scene = generate_scene(seed, size=size)
                image = torch.from_numpy(np.asarray(scene.image)).permute(2, 0, 1)[None] / 255
                row = {"vocabulary": label, "scene": seed, "size": list(size),
                       **measure(segmenter, image.float(), args.repeats)}
                print(f"{label:12s} scene {seed} {size[0]}x{size[1]}: {row['rows']} rows, "
                      f"{row['seconds'] * 1000:.1f} ms, expanded {row['expanded']:.3f}; "
                      f"with means {row['means_seconds'] * 1000:.1f} ms")
                rows.append(row)
    if args.json:
        save_json_atomic({"machine": machine(), "model": MODEL, "method": "sclip",
                          "threads": 1, "rows": rows}, args.json)
        print(f"Saved {args.json}")


if __name__ == "__main__":
    main()
