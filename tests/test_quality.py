"""End-to-end regression guard: the shipped tiny CLIP segments held-out synthetic scenes.

Floors are set from a measurement (SCLIP on these 12 scenes: mIoU 17.7, pixel accuracy 51.3;
chance with 20 classes is about 5% pixel accuracy), with margin for numerical drift across
machines. A drop below them means a real regression in the backbone, methods, inference, text
or the shipped weights.
"""

import pytest

from zegkit.backbone import load_clip
from zegkit.data import get_protocol, load_dataset
from zegkit.data.synthetic import write_dataset
from zegkit.evaluate import evaluate
from zegkit.inference import InferenceConfig
from zegkit.methods import create_method
from zegkit.segmenter import Segmenter

HELDOUT_SEED = 314
MIOU_FLOOR = 12.0
PIXEL_ACCURACY_FLOOR = 40.0


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    return load_dataset(
        "synthetic", write_dataset(tmp_path_factory.mktemp("heldout"), 12, seed=HELDOUT_SEED)
    )


def test_shipped_model_segments_well_above_chance(heldout):
    protocol = get_protocol("zegkit-synthetic").inference_overrides()
    segmenter = Segmenter(
        load_clip("zegkit/tiny-synthetic"), create_method("sclip"), InferenceConfig(**protocol)
    )
    result = evaluate(segmenter, heldout, progress=False, num_workers=0)
    assert result["mIoU"] >= MIOU_FLOOR
    assert result["aAcc"] >= PIXEL_ACCURACY_FLOOR
    assert result["hIoU"] is not None  # both seen and unseen classes occur in these scenes
