"""Scene-bootstrap intervals of mIoU: they contain the point estimate, shrink with more images,
are reproducible, pair two methods' images, and reach a real evaluation result."""

import pytest
import torch

from zegkit.evaluate.bootstrap import ImageStats, bootstrap_difference, bootstrap_intervals


def _stats(num_images, seed=0, quality=0.6):
    """Per-image counts of 4 classes: union 100, intersection ~ quality * 100 with noise."""
    generator = torch.Generator().manual_seed(seed)
    union = torch.full((num_images, 4), 100, dtype=torch.int64)
    noise = torch.randint(-30, 31, (num_images, 4), generator=generator)
    intersection = (quality * 100 + noise).clamp(0, 100).to(torch.int64)
    return ImageStats(intersection, union)


def _point(stats):
    return float((stats.intersection.sum(0) / stats.union.sum(0)).mean() * 100)


def test_interval_contains_the_estimate_and_shrinks_with_more_images():
    small, large = _stats(20), _stats(400)
    low, high = bootstrap_intervals(small, 500)["mIoU_ci95"]
    assert low < _point(small) < high
    wide = high - low
    low, high = bootstrap_intervals(large, 500)["mIoU_ci95"]
    assert low < _point(large) < high and high - low < wide / 2


def test_interval_is_reproducible_with_a_seed():
    stats = _stats(50)
    assert bootstrap_intervals(stats, 200, seed=3) == bootstrap_intervals(stats, 200, seed=3)
    assert bootstrap_intervals(stats, 200, seed=3) != bootstrap_intervals(stats, 200, seed=4)


def test_paired_difference_detects_a_consistent_gain():
    base = _stats(40, seed=1)
    gain = torch.randint(0, 11, base.intersection.shape, generator=torch.Generator().manual_seed(2))
    better = ImageStats((base.intersection + gain).clamp(max=100), base.union)
    result = bootstrap_difference(better, base, 500)["mIoU"]
    assert result["difference"] == pytest.approx(_point(better) - _point(base), abs=1e-4)
    low, high = result["ci95"]
    assert 0 < low <= result["difference"] <= high
    with pytest.raises(ValueError, match="same images and classes"):
        bootstrap_difference(base, _stats(39), 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        bootstrap_intervals(_stats(5), 0)


def test_evaluate_reports_an_interval(tiny_clip_dir, tmp_path):
    from zegkit.data import load_dataset
    from zegkit.data.synthetic import write_dataset
    from zegkit.evaluate import evaluate
    from zegkit.segmenter import load_segmenter

    data = load_dataset("synthetic", write_dataset(tmp_path / "s", 4, seed=7, size=96))
    segmenter = load_segmenter("naive", str(tiny_clip_dir), short_side=96)
    result = evaluate(segmenter, data, progress=False, num_workers=0, bootstrap=50)
    low, high = result["mIoU_ci95"]
    assert low <= result["mIoU"] <= high
    assert ImageStats.from_result(result).intersection.shape == (4, data.num_classes)
