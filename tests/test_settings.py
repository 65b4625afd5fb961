"""Settings precedence: the user's explicit value > the protocol's value for the method > the
method's default; and every result records the effective settings."""

import json

import numpy as np
import pytest
from conftest import make_tiny_clip

from zegkit.backbone import ClipBackbone
from zegkit.data.protocols import Protocol
from zegkit.segmenter import load_segmenter, resolve_settings

PROTOCOL = Protocol(
    name="test-protocol",
    dataset="folder",
    short_side=96,
    crop=64,
    stride=32,
    background_threshold=0.2,
    method_settings={"sclip": {"logit_scale": 65.0}},
)


@pytest.fixture(scope="module")
def backbone(tiny_tokenizer):
    return ClipBackbone(make_tiny_clip(16), tiny_tokenizer, "tiny")


def test_user_beats_protocol_beats_default(backbone):
    default = load_segmenter("sclip", backbone=backbone)
    assert default.method.config.logit_scale == 40.0 and default.config.short_side == 448
    protocol = load_segmenter("sclip", backbone=backbone, protocol=PROTOCOL)
    assert protocol.method.config.logit_scale == 65.0
    assert (protocol.config.short_side, protocol.config.background_threshold) == (96, 0.2)
    user = load_segmenter("sclip", backbone=backbone, protocol=PROTOCOL, logit_scale=30.0,
                          short_side=128, crop=None)
    assert user.method.config.logit_scale == 30.0 and user.config.short_side == 128
    assert user.config.crop == 64  # None means "not set": the protocol's value stays


def test_a_protocol_never_sets_another_methods_temperature(backbone):
    clearclip = load_segmenter("clearclip", backbone=backbone, protocol=PROTOCOL)
    assert clearclip.method.config.logit_scale == 50.0  # ClearCLIP's own default
    assert resolve_settings("naive", PROTOCOL, {})[0] == {}


def test_unknown_setting_lists_the_valid_ones(backbone):
    with pytest.raises(ValueError, match="has no setting"):
        load_segmenter("sclip", backbone=backbone, gaussian_std=3)


def test_segment_json_records_the_effective_settings(backbone, tmp_path):
    segmenter = load_segmenter("sclip", backbone=backbone, protocol=PROTOCOL, logit_scale=30.0)
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    result = segmenter.segment(image, classes=["background", "dog", "grass"])
    paths = result.save(tmp_path, "photo", image)
    settings = json.loads(paths["json"].read_text())["settings"]
    assert settings["method"] == "sclip" and settings["model"] == "tiny"
    assert settings["method_config"]["logit_scale"] == 30.0
    assert settings["inference"]["short_side"] == 96
    assert settings["protocol"] == "test-protocol" and "zegkit_version" in settings


def test_cliper_protocols_hold_cliper_settings_only(backbone):
    from zegkit.data.protocols import PROTOCOLS, get_protocol

    voc = get_protocol("cliper-voc21")
    assert (voc.mode, voc.short_side, voc.background_threshold) == ("whole", 336, 0.6)
    cliper = load_segmenter("cliper", backbone=backbone, protocol=voc, compensation=False)
    config = cliper.method.config
    assert (config.logit_scale, config.propagate_threshold, config.diffusion_threshold) == (
        100.0, 0.1, 0.1
    )
    assert load_segmenter("sclip", backbone=backbone, protocol=voc).method.config.logit_scale == 40
    assert get_protocol("cliper-cityscapes19").short_side == 560
    assert sum(name.startswith("cliper-") for name in PROTOCOLS) == 8
