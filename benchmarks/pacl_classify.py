"""Zero-shot classification on held-out proving-ground scenes, with and without PACL.

    python benchmarks/pacl_classify.py --data-root runs/pacl-synthetic/held_out \
        --checkpoint runs/pacl-synthetic/last.safetensors \
        --output benchmarks/results/pacl_classify.json

Each scene is classified among the 20 proving-ground classes by `zegkit.classify` (ImageNet
template ensemble): `naive` is CLIP's own classifier (global image embedding), `pacl` the pooled
compatibility φ(x, y_c) of a trained checkpoint. Scenes hold several classes, so the metrics are
those of `zegkit.train.pretrain_clip.presence_report`: top-1 present (the best class is in the
scene), mean presence AUC (stuff / things), and single-shape top-1 (scenes with one thing class:
the best thing class is that one, chance 1/11).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from zegkit.classify import image_scores
from zegkit.data import load_dataset, synthetic
from zegkit.io import save_json_atomic
from zegkit.segmenter import load_segmenter
from zegkit.train.pretrain_clip import presence_report

REPORTED = ("top1_present", "presence_auc", "presence_auc_stuff", "presence_auc_things",
            "single_shape_top1", "single_shape_scenes")


def scene_presence(root: Path) -> np.ndarray:
    """(N, K) bool: which classes each scene's mask shows."""
    dataset = load_dataset("synthetic", root)
    classes = np.arange(len(synthetic.CLASSES))
    return np.stack([np.isin(classes, dataset[i][1].unique().numpy())
                     for i in range(len(dataset))])


def method_scores(method: str, model: str, checkpoint: Path | None, root: Path,
                  batch: int = 25) -> np.ndarray:
    """(N, K) classification scores of every held-out scene over synthetic.CLASSES."""
    segmenter = load_segmenter(method, model, checkpoint=checkpoint)
    segmenter.set_vocabulary(list(synthetic.CLASSES))
    dataset = load_dataset("synthetic", root)
    scores = []
    for first in range(0, len(dataset), batch):
        images = [dataset[i][0].float() / 255 for i in range(first, min(first + batch,
                                                                        len(dataset)))]
        scores.append(image_scores(segmenter, images).numpy())
    return np.concatenate(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, required=True,
                        help="held-out scenes written by `zegkit synth` / `zegkit train`")
    parser.add_argument("--checkpoint", type=Path, action="append", required=True,
                        help="PACL checkpoint(s); repeatable (label = its run folder)")
    parser.add_argument("--model", default="zegkit/tiny-synthetic",
                        help="the frozen CLIP (default: zegkit/tiny-synthetic)")
    parser.add_argument("--output", type=Path, required=True, help="result JSON")
    args = parser.parse_args()
    present = scene_presence(args.data_root)
    runs = {"naive (CLIP)": method_scores("naive", args.model, None, args.data_root)}
    for checkpoint in args.checkpoint:
        runs[f"pacl ({checkpoint.parent.name})"] = method_scores(
            "pacl", args.model, checkpoint, args.data_root)
    rows = {}
    for name, scores in runs.items():
        report = presence_report(scores, present)
        rows[name] = {key: report[key] for key in REPORTED}
        print(name, json.dumps({k: round(v, 4) for k, v in rows[name].items()}))
    rows["_how"] = (f"{len(present)} held-out scenes ({args.data_root}), 20 classes, ImageNet "
                    f"templates, model {args.model}; python benchmarks/pacl_classify.py")
    save_json_atomic(rows, args.output)


if __name__ == "__main__":
    main()
