"""Proving-ground quality table: every method, and PAMR after each, on held-out synthetic scenes.

Writes a fixed held-out set of generated scenes (a seed training never uses), measures the shipped
tiny CLIP's zero-shot image classification, then the zero-shot segmentation of every method:
mIoU over all classes, seen, unseen and their harmonic mean, pixel accuracy and seconds per image,
with scene-bootstrap 95% intervals of mIoU and of each row's paired difference to naive (same
refinement). Printed as a table and saved as JSON.

    python benchmarks/quality.py [--num 200] [--json results/quality.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.tiny_sd import TINY_LAYERS, save_tiny_random_pipeline  # noqa: E402

from zegkit.backbone import load_clip  # noqa: E402
from zegkit.data import load_dataset  # noqa: E402
from zegkit.data.synthetic import write_dataset  # noqa: E402
from zegkit.evaluate import compare_results, evaluate, save_results  # noqa: E402
from zegkit.refine import create_refiner  # noqa: E402
from zegkit.segmenter import load_segmenter  # noqa: E402
from zegkit.train.pretrain_clip import evaluate as classification_quality  # noqa: E402

HELDOUT_SEED = 20261123  # scenes of this seed are never generated for training
TINY_SD_IMAGE_SIZE = 64  # the random tiny SD attends over a 32 x 32 latent grid
# (row name, method, method settings, use the random tiny Stable Diffusion refiner)
ROWS = [
    ("naive", "naive", {}, False),
    ("maskclip", "maskclip", {}, False),
    ("sclip", "sclip", {}, False),
    ("clearclip", "clearclip", {}, False),
    ("naclip", "naclip", {}, False),
    ("cliper (fusion only)", "cliper", {"compensation": False}, False),
    ("cliper + random tiny SD", "cliper", {"compensation": False}, True),
    ("clsclip_standin (untrained, not ClsCLIP)", "clsclip_standin", {}, False),
]
COLUMNS = ("mIoU", "mIoU(S)", "mIoU(U)", "hIoU", "aAcc")
BOOTSTRAP = 1000  # scene resamples of the intervals


def random_sd_refiner(workdir: Path, backbone) -> torch.nn.Module:
    """CLIPer's compensation module on a tiny random-weight Stable Diffusion (no trained SD
    can be had offline): shows the mechanism end to end, not the paper's gain."""
    path = save_tiny_random_pipeline(workdir / "tiny-sd", backbone.tokenizer)
    return create_refiner(
        "diffusion", model=str(path), layers=TINY_LAYERS, image_size=TINY_SD_IMAGE_SIZE
    )


def run_row(backbone, dataset, method: str, settings: dict, refine: str, sd_refiner) -> dict:
    """Evaluate one method + refinement on the held-out set; returns the metrics."""
    segmenter = load_segmenter(
        method, backbone=backbone, protocol="zegkit-synthetic", refine=refine, **settings
    )
    if sd_refiner is not None:  # in the place of CLIPer's own compensation, before the user's
        segmenter.refiners.insert(0, sd_refiner)
    start = time.perf_counter()
    result = evaluate(
        segmenter, dataset, progress=False, num_workers=0, seen=dataset.seen,
        unseen=dataset.unseen, bootstrap=BOOTSTRAP,
    )
    result["seconds_per_image"] = (time.perf_counter() - start) / len(dataset)
    return result


def _cell(value: float | None) -> str:
    return f"{'-':>9}" if value is None else f"{value:>9.2f}"


def _interval(low_high: list[float]) -> str:
    return f"[{low_high[0]:.1f}, {low_high[1]:.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="zegkit/tiny-synthetic",
        help="CLIP weights (default: zegkit/tiny-synthetic)",
    )
    parser.add_argument("--num", type=int, default=200, help="held-out scenes (default: 200)")
    parser.add_argument("--size", type=int, default=224, help="scene side in pixels (default: 224)")
    parser.add_argument("--json", type=Path, default=None, help="also save the table here")
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone = load_clip(args.model)
    model: CLIPModel = backbone.model
    classification = classification_quality(
        model, backbone.tokenizer, num_scenes=args.num, seed=HELDOUT_SEED
    )
    print(
        f"zero-shot classification on {args.num} held-out scenes: top-1 class present "
        f"{100 * classification['top1_present']:.1f}%, presence AUC "
        f"{100 * classification['presence_auc']:.1f}"
    )

    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
        root = write_dataset(Path(workdir) / "heldout", args.num, seed=HELDOUT_SEED, size=args.size)
        dataset = load_dataset("synthetic", root)
        sd_refiner = random_sd_refiner(Path(workdir), backbone)
        header = f"{'method':<28}{'refine':<7}" + "".join(f"{c:>9}" for c in COLUMNS)
        print(f"\n{header}{'s/img':>8}  mIoU 95%      - naive [95%]")
        for name, method, settings, use_sd in ROWS:
            for refine in ("none", "pamr"):
                result = run_row(
                    backbone, dataset, method, settings, refine, sd_refiner if use_sd else None
                )
                naive = rows.get(f"naive | {refine}", result)
                result["minus_naive"] = compare_results(result, naive, BOOTSTRAP)
                rows[f"{name} | {refine}"] = result
                cells = "".join(_cell(result[c]) for c in COLUMNS)
                difference = result["minus_naive"]["mIoU"]
                print(f"{name:<28}{refine:<7}{cells}{result['seconds_per_image']:>8.3f}  "
                      f"{_interval(result['mIoU_ci95']):<14}{difference['difference']:+.2f} "
                      f"{_interval(difference['ci95'])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        save_results(
            args.json,
            {
                "model": args.model,
                "scenes": args.num,
                "size": args.size,
                "heldout_seed": HELDOUT_SEED,
                "classification": classification,
                "segmentation": {  # without the per-scene counts behind the intervals
                    row: {k: v for k, v in result.items() if k != "per_image"}
                    for row, result in rows.items()
                },
            },
        )
        print(f"\nSaved {args.json}")


if __name__ == "__main__":
    main()
