"""1-way episodes: the fold lists, a deterministic sampler, the metrics against a direct
computation, an oracle and an empty predictor, and `zegkit eval` with a fold protocol."""

import json

import numpy as np
import pytest
import torch

from zegkit.data import load_dataset
from zegkit.data.base import shipped_class_names
from zegkit.data.protocols import FOLD_SETS, PROTOCOLS, fold_protocols, get_protocol
from zegkit.data.synthetic import CLASSES, write_dataset
from zegkit.evaluate.episodes import (
    Episode,
    episode_candidates,
    episode_counts,
    episode_metrics,
    evaluate_episodes,
    fold_mean,
    sample_episodes,
)
from zegkit.evaluate.runs import run_episode_eval, run_eval


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    write_dataset(root, 6, seed=3, size=64)
    return load_dataset("synthetic", root)


def test_fold_lists_follow_the_few_shot_layouts():
    pascal = [p.unseen for p in fold_protocols("pascal-5i")]
    assert pascal[0] == ("aeroplane", "bicycle", "bird", "boat", "bottle")
    assert pascal[3] == ("potted plant", "sheep", "sofa", "train", "tv monitor")
    coco = [p.unseen for p in fold_protocols("coco-20i")]
    assert coco[0][:5] == ("person", "airplane", "boat", "parking meter", "dog")  # 1, 5, 9, ...
    assert [len(fold) for fold in coco] == [20] * 4
    for name in FOLD_SETS:
        folds = [set(p.unseen) for p in fold_protocols(name)]
        assert len(set().union(*folds)) == sum(map(len, folds))  # disjoint
    synthetic = set().union(*(p.unseen for p in fold_protocols("synthetic-4x5")))
    assert synthetic == set(CLASSES)
    assert get_protocol("pascal-5i-fold2").episodes == 1000
    assert fold_protocols("pascal-5i-fold2") == [PROTOCOLS["pascal-5i-fold2"]]
    assert fold_protocols("sclip-voc21") is None and fold_protocols("nonsense") is None
    seen, unseen = get_protocol("pascal-5i-fold0").split_indices(shipped_class_names("voc21"))
    assert unseen == [1, 2, 3, 4, 5] and 0 in seen and len(seen) == 16


def test_sampler_is_deterministic_and_draws_candidates():
    candidates = [Episode(i, c) for i in range(7) for c in (1, 2)]
    first = sample_episodes(candidates, 50, seed=4)
    assert first == sample_episodes(candidates, 50, seed=4)
    assert first != sample_episodes(candidates, 50, seed=5)
    assert set(first) <= set(candidates) and len(first) == 50
    with pytest.raises(ValueError, match=">= 1"):
        sample_episodes(candidates, 0, seed=0)


def test_candidates_are_the_pairs_above_the_pixel_filter(scenes):
    classes = [0, 1, 9, 10]
    got = episode_candidates(scenes, classes, min_pixels=50)
    expected = []
    for index in range(len(scenes)):
        mask = scenes.read_checked_mask(index)
        expected += [Episode(index, c) for c in sorted(classes) if (mask == c).sum() >= 50]
    assert got == expected and got
    with pytest.raises(ValueError, match="no episode"):
        episode_candidates(scenes, classes, min_pixels=64 * 64 + 1)


def _direct(episodes, predictions, masks, classes):
    """IoU per class summed over its episodes and FB-IoU over all, written out pixel by pixel."""
    totals = {c: [0, 0] for c in classes}
    fb = [[0, 0], [0, 0]]
    for (label, prediction, mask) in zip(episodes, predictions, masks, strict=True):
        for p, m in zip(prediction.flatten().tolist(), mask.flatten().tolist(), strict=True):
            if m == 255:
                continue
            truth = m == label
            totals[label][0] += p and truth
            totals[label][1] += p or truth
            fb[1][0] += p and truth
            fb[1][1] += p or truth
            fb[0][0] += (not p) and not truth
            fb[0][1] += (not p) or not truth
    iou = {c: 100 * i / u for c, (i, u) in totals.items() if u}
    return iou, 100 * (fb[0][0] / fb[0][1] + fb[1][0] / fb[1][1]) / 2


def test_metrics_match_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    classes = [3, 5, 8]
    labels = [3, 5, 3, 8, 5, 3]
    masks = [torch.randint(0, 10, (6, 7), generator=generator) for _ in labels]
    for mask in masks:
        mask[0, :3] = 255
    predictions = [torch.rand(6, 7, generator=generator) > 0.5 for _ in labels]
    counts = torch.zeros(3, 4, dtype=torch.int64)
    for label, prediction, mask in zip(labels, predictions, masks, strict=True):
        counts[classes.index(label)] += episode_counts(prediction, mask, label, 255)
    result = episode_metrics(counts, ["a", "b", "c"])
    iou, fb_iou = _direct(labels, predictions, masks, classes)
    assert result["IoU"] == pytest.approx({"a": iou[3], "b": iou[5], "c": iou[8]})
    assert result["mIoU"] == pytest.approx(np.mean(list(iou.values())))
    assert result["FB-IoU"] == pytest.approx(fb_iou)


def test_fold_mean_averages_folds():
    folds = [{"IoU": {"a": 10.0}, "mIoU": 10.0, "FB-IoU": 50.0, "num_episodes": 3,
              "protocol": "f0"},
             {"IoU": {"b": 30.0}, "mIoU": 30.0, "FB-IoU": 70.0, "num_episodes": 3,
              "protocol": "f1"}]
    combined = fold_mean(folds)
    assert combined["mIoU"] == 20.0 and combined["FB-IoU"] == 60.0
    assert combined["IoU"] == {"a": 10.0, "b": 30.0} and combined["num_episodes"] == 6


def test_an_oracle_scores_100_and_an_empty_answer_0(scenes):
    protocol = get_protocol("synthetic-4x5-fold1")
    vocabularies = []

    def oracle(image, name, vocabulary):
        vocabularies.append(vocabulary)
        index = scenes.names.index(name)
        label = scenes.class_names.index(vocabulary[1])
        return (scenes[index][1] == label).long()

    result = evaluate_episodes(oracle, scenes, protocol, progress=False)
    assert result["mIoU"] == 100 and result["FB-IoU"] == 100 and result["num_episodes"] == 1000
    assert {v[0] for v in vocabularies} == {"background"}
    assert {v[1] for v in vocabularies} <= set(protocol.unseen)
    empty = evaluate_episodes(lambda image, name, vocabulary: torch.zeros_like(image[0]),
                              scenes, protocol, progress=False)
    assert empty["mIoU"] == 0 and 0 < empty["FB-IoU"] < 50


def test_zegkit_eval_runs_a_fold_protocol(scenes, tiny_clip_dir, tmp_path):
    from zegkit.cli import main

    output = tmp_path / "naive.json"
    assert main(["eval", "--dataset", "synthetic", "--data-root", str(scenes.root), "--method",
                 "naive", "--model", str(tiny_clip_dir), "--protocol", "synthetic-4x5-fold0",
                 "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["num_episodes"] == 1000 and result["protocol"] == "synthetic-4x5-fold0"
    assert set(result["IoU"]) <= set(get_protocol("synthetic-4x5-fold0").unseen)
    assert result["settings"]["protocol"] == "synthetic-4x5-fold0"
    with pytest.raises(ValueError, match="{fold}"):
        run_episode_eval("synthetic", scenes.root, "synthetic-4x5", method="clsclip",
                         model=str(tiny_clip_dir), checkpoint=tmp_path / "one.safetensors")
    with pytest.raises(ValueError, match="dense evaluation"):
        run_eval("synthetic", scenes.root, protocol="synthetic-4x5-fold0", limit=3)


def test_episodes_with_zoom_in_only_add_foreground(scenes, tiny_clip_dir):
    from dataclasses import replace

    from zegkit.evaluate.episodes import segmenter_predict
    from zegkit.segmenter import load_segmenter

    protocol = replace(get_protocol("synthetic-4x5-fold2"), episodes=20)
    plain = load_segmenter("naive", str(tiny_clip_dir), protocol=protocol)
    zoomed = load_segmenter("naive", str(tiny_clip_dir), protocol=protocol, proposals="self")
    masks = {}

    def recorder(segmenter, key):
        predict = segmenter_predict(segmenter)

        def record(image, name, vocabulary):
            masks.setdefault(key, []).append(predict(image, name, vocabulary))
            return masks[key][-1]

        return record

    evaluate_episodes(recorder(plain, "plain"), scenes, protocol, progress=False)
    evaluate_episodes(recorder(zoomed, "zoomed"), scenes, protocol, progress=False)
    for before, after in zip(masks["plain"], masks["zoomed"], strict=True):
        assert ((before == 1) <= (after == 1)).all()  # the union never removes foreground


def test_a_fold_set_loads_each_folds_checkpoint_and_averages(scenes, tiny_clip_dir, tmp_path):
    from zegkit.backbone import load_clip
    from zegkit.methods import create_method
    from zegkit.methods.checkpoint import save_method

    backbone = load_clip(str(tiny_clip_dir))
    for fold in range(4):
        torch.manual_seed(fold)
        method = create_method("clsclip", decoder_dim=16, layers=(1,))
        method.build(backbone)
        save_method(method, tmp_path / f"fold{fold}" / "last.safetensors", backbone)
    pattern = str(tmp_path / "fold{fold}" / "last.safetensors")
    with pytest.raises(FileNotFoundError, match=r"x0/last"):  # {fold} -> 0, no such file
        run_episode_eval("synthetic", scenes.root, "synthetic-4x5", method="clsclip",
                         model=str(tiny_clip_dir), checkpoint=pattern.replace("fold{", "x{"),
                         progress=False)
    result = run_episode_eval("synthetic", scenes.root, "synthetic-4x5", method="clsclip",
                              model=str(tiny_clip_dir), checkpoint=pattern, progress=False)
    assert [fold["protocol"] for fold in result["folds"]] == [
        f"synthetic-4x5-fold{k}" for k in range(4)]
    assert result["mIoU"] == pytest.approx(np.mean([f["mIoU"] for f in result["folds"]]))
    assert result["num_episodes"] == 4000 and set(result["IoU"]) == set(CLASSES)
    assert result["settings"]["checkpoint"] == pattern
