"""The fold-protocol table of ClsCLIP's proof: per result file of `zegkit eval --protocol
<fold set>`, each fold's 1-way episode mIoU, the mean over folds, and the mean FB-IoU.

    python benchmarks/clsclip_folds.py runs/clsclip/eval_*.json \
        --json benchmarks/results/clsclip_folds.json

Rows are named by the file's stem (e.g. eval_naive.json -> naive); every file must come from the
same fold set (the same seeded episodes), which the script checks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zegkit.io import save_json_atomic


def row(path: Path) -> dict:
    """One result file's row: the fold set, per-fold mIoU, mean mIoU and mean FB-IoU."""
    result = json.loads(path.read_text())
    if "folds" not in result:
        raise SystemExit(f"{path} is not a fold-set result of `zegkit eval --protocol <fold set>`.")
    inference = result["settings"].get("inference", {})
    return {"protocol": result["settings"]["protocol"],
            "folds": {fold["protocol"]: round(fold["mIoU"], 2) for fold in result["folds"]},
            "mIoU": round(result["mIoU"], 2), "FB-IoU": round(result["FB-IoU"], 2),
            "episodes": result["num_episodes"], "short_side": inference.get("short_side"),
            "proposals": inference.get("proposals")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="result JSON files")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()
    table = {path.stem.removeprefix("eval_"): row(path) for path in args.results}
    protocols = {entry["protocol"] for entry in table.values()}
    if len(protocols) != 1:
        raise SystemExit(f"The results come from different fold sets {sorted(protocols)}.")
    folds = list(next(iter(table.values()))["folds"])
    header = f"{'row':28s} " + " ".join(f"{fold[-5:]:>7s}" for fold in folds)
    print(f"{header} {'mIoU':>7s} {'FB-IoU':>7s}  short side, proposals")
    for name, entry in table.items():
        cells = " ".join(f"{entry['folds'][fold]:7.2f}" for fold in folds)
        print(f"{name:28s} {cells} {entry['mIoU']:7.2f} {entry['FB-IoU']:7.2f}  "
              f"{entry['short_side']}, {entry['proposals']}")
    if args.json:
        save_json_atomic(table, args.json)


if __name__ == "__main__":
    main()
