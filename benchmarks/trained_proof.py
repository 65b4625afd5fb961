"""Collect the proving-ground proof of the trained methods: per run the last held-out evaluation
`zegkit train` logged, per method the mean and std over seeds, beside the training-free rows.

Runs are folders made by `zegkit train --recipe <method>-synthetic --set seed=S --out
RUNS/<name>-s<S>` (each evaluates on the same 100 held-out scenes, seed 1, at the end). The
training-free rows are `zegkit eval` results on a run's `held_out` folder (the same scenes):

    for m in naive maskclip sclip clearclip naclip; do zegkit eval --dataset synthetic \
        --data-root runs/proof/zegclip-synthetic-s0/held_out --method $m --bootstrap 200 \
        --output runs/free/$m.json; done
    python benchmarks/trained_proof.py runs/proof --training-free runs/free/*.json \
        --json benchmarks/results/trained_proof.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from zegkit.io import atomic_write

METRICS = ("mIoU", "mIoU(S)", "mIoU(U)", "hIoU")


def final_eval(run: Path) -> dict | None:
    """The last evaluation line of a finished dense-protocol run's log, with its step and
    throughput (None for an unfinished run or an episode-protocol one, e.g. ClsCLIP's folds)."""
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval" in line]
    recipe = json.loads((run / "recipe.json").read_text())
    if not evals or evals[-1]["step"] != recipe["iterations"] or "hIoU" not in evals[-1]["eval"]:
        return None
    speeds = [line["images_per_second"] for line in lines if "images_per_second" in line]
    return {**{k: evals[-1]["eval"][k] for k in METRICS}, "step": evals[-1]["step"],
            "images_per_second_median": statistics.median(speeds),
            "method_settings": recipe["method_settings"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="folder holding the run folders")
    parser.add_argument("--training-free", type=Path, nargs="*", default=[],
                        help="`zegkit eval` result files on the runs' held-out scenes")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()
    runs: dict[str, dict[str, dict]] = {}
    for log in sorted(args.runs.glob("*/log.jsonl")):
        match = re.fullmatch(r"(.+)-s(\d+)", log.parent.name)
        result = final_eval(log.parent) if match else None
        if result:
            runs.setdefault(match.group(1), {})[match.group(2)] = result
    table = {}
    for name, seeds in runs.items():
        row = {"seeds": sorted(seeds), "runs": seeds}
        for metric in METRICS:
            values = [run[metric] for run in seeds.values()]
            row[metric] = round(statistics.mean(values), 2)
            row[f"{metric}_std"] = round(statistics.stdev(values), 2) if len(values) > 1 else None
        table[name] = row
    free = {}
    for path in args.training_free:
        result = json.loads(path.read_text())
        free[result["settings"]["method"]] = {
            **{m: round(result[m], 2) for m in METRICS},
            "mIoU_ci95": result.get("mIoU_ci95"), "model": result["settings"]["model"],
            "precision": result["settings"]["resolved_precision"]}
    print(f"{'method':36s} " + " ".join(f"{m:>14s}" for m in METRICS))
    for name, row in free.items():
        print(f"{name + ' (training-free)':36s} " + " ".join(f"{row[m]:14.2f}" for m in METRICS))
    for name, row in table.items():
        cells = [f"{row[m]:6.2f} ± {row[m + '_std'] or 0:5.2f}" for m in METRICS]
        print(f"{name + ' (' + str(len(row['seeds'])) + ' seeds)':36s} " + " ".join(cells))
    if args.json:
        record = {"trained": table, "training_free": free}
        with atomic_write(args.json, "w") as handle:
            handle.write(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
