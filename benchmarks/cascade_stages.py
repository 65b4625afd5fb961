"""Which of a trained Cascade-CLIP's stages carries the seen and the unseen classes: each stage's
mask alone, all of them (the method), and all but one, on the run's held-out scenes.

Runs are folders made by `zegkit train --recipe cascade-clip-synthetic --set seed=S --out
RUNS/cascade-clip-synthetic-sS` (see benchmarks/trained_proof.py).

    python benchmarks/cascade_stages.py runs/proof/cascade-clip-synthetic-s* \
        --json benchmarks/results/cascade_stages.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from zegkit.data import load_dataset
from zegkit.data.protocols import get_protocol
from zegkit.evaluate import evaluate
from zegkit.io import atomic_write
from zegkit.segmenter import load_segmenter

METRICS = ("mIoU", "mIoU(S)", "mIoU(U)")


def stage_sets(stages: int) -> dict[str, tuple[int, ...] | None]:
    """Named subsets of the stages: each alone, all, and all but each one."""
    subsets: dict[str, tuple[int, ...] | None] = {f"stage {s}": (s,) for s in range(stages)}
    subsets["all (the method)"] = None
    for left_out in range(stages):
        subsets[f"all but stage {left_out}"] = tuple(s for s in range(stages) if s != left_out)
    return subsets


def run_stages(run: Path) -> dict[str, dict[str, float]]:
    """Metrics of every stage subset of one run's final checkpoint on its held-out scenes."""
    recipe = json.loads((run / "recipe.json").read_text())
    held_out = load_dataset("synthetic", run / "held_out")
    seen, unseen = get_protocol(recipe["protocol"]).split_indices(held_out.class_names)
    segmenter = load_segmenter("cascade_clip", recipe["model"], protocol=recipe["protocol"],
                               checkpoint=run / "last.safetensors")
    stages = len(segmenter.method.config.stages) + 1
    rows = {}
    for name, subset in stage_sets(stages).items():
        segmenter.method.config.summed_stages = subset
        result = evaluate(segmenter, held_out, progress=False, num_workers=0, seen=seen,
                          unseen=unseen, limit=recipe["eval_images"])
        rows[name] = {metric: round(result[metric], 2) for metric in METRICS}
        print(f"{run.name:32s} {name:20s} " + " ".join(f"{rows[name][m]:8.2f}" for m in METRICS))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="Cascade-CLIP run folders")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()
    torch.manual_seed(0)
    per_run = {run.name: run_stages(run) for run in args.runs}
    names = next(iter(per_run.values())).keys()
    summary = {}
    for name in names:
        values = {m: [rows[name][m] for rows in per_run.values()] for m in METRICS}
        summary[name] = {m: round(statistics.mean(v), 2) for m, v in values.items()}
        summary[name].update({f"{m}_std": round(statistics.stdev(v), 2) if len(v) > 1 else None
                              for m, v in values.items()})
    print(f"\nmean over {len(per_run)} runs")
    for name, row in summary.items():
        print(f"{name:20s} " + " ".join(f"{m} {row[m]:6.2f} ± {row[m + '_std'] or 0:4.2f}"
                                        for m in METRICS))
    if args.json:
        with atomic_write(args.json, "w") as handle:
            json.dump({"summary": summary, "runs": per_run}, handle, indent=2)


if __name__ == "__main__":
    main()
