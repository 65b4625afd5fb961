"""Precision "auto" (bf16 where the hardware runs it natively), bf16 against fp32 on the shipped
model, and `compile` (torch.compile of the method's forward) against eager."""

from pathlib import Path

import pytest
import torch

import zegkit
import zegkit.hardware
from zegkit.backbone import load_clip
from zegkit.hardware import PRECISION_DTYPES, PRECISIONS, autocast_dtype, resolve_precision
from zegkit.inference import InferenceConfig
from zegkit.io import load_image, to_tensor
from zegkit.segmenter import load_segmenter

EXAMPLES = Path(zegkit.__file__).parent / "assets" / "examples"
# The last-block methods, whose scores are cosines (`zegkit.methods.base.cosine_logits`).
AGREEMENT_METHODS = ("naive", "maskclip", "sclip", "clearclip", "naclip")
# Least fraction of pixels whose bf16 label is the fp32 one, per image. Measured on the two
# shipped examples at the default protocol (448 px, 9 crops): 99.69-99.99% (README, Precision).
AGREEMENT_FLOOR = 0.98


@pytest.mark.parametrize(("flags", "expected"), [([], "fp32"), (["amx_bf16"], "bf16"),
                                                 (["avx512_bf16"], "bf16")])
def test_auto_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, flags, expected):
    monkeypatch.setattr(zegkit.hardware, "cpu_bf16_flags", lambda: flags)
    assert resolve_precision("auto", "cpu") == expected
    assert autocast_dtype("auto", "cpu") == PRECISION_DTYPES[expected]
    assert [resolve_precision(name, "cpu") for name in ("fp32", "bf16")] == ["fp32", "bf16"]
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")


@pytest.fixture(scope="module")
def shipped():
    """The shipped tiny CLIP and the shipped example images with their 20 class names."""
    images = [to_tensor(load_image(EXAMPLES / name))[None] for name in ("scene.png", "scene2.png")]
    classes = (EXAMPLES / "classes.txt").read_text().split()
    return load_clip("zegkit/tiny-synthetic"), images, classes


def test_auto_is_the_default_and_results_record_what_it_resolved_to(shipped, monkeypatch):
    backbone = shipped[0]
    assert InferenceConfig().precision == "auto" and "auto" in PRECISIONS
    for flags, resolved in (([], "fp32"), (["amx_bf16"], "bf16")):
        monkeypatch.setattr(zegkit.hardware, "cpu_bf16_flags", lambda flags=flags: flags)
        settings = load_segmenter("naive", backbone=backbone).settings()
        assert settings["inference"]["precision"] == "auto"
        assert settings["resolved_precision"] == resolved
    explicit = load_segmenter("naive", backbone=backbone, precision="fp32").settings()
    assert explicit["inference"]["precision"] == explicit["resolved_precision"] == "fp32"


@pytest.mark.parametrize("method", AGREEMENT_METHODS)
def test_bf16_labels_agree_with_fp32_on_the_shipped_model(shipped, method):
    backbone, images, classes = shipped
    labels = {}
    for precision in ("fp32", "bf16"):  # bf16 forced: "auto" is fp32 on AVX2-only CPUs
        segmenter = load_segmenter(method, backbone=backbone, precision=precision)
        segmenter.set_vocabulary(classes)
        labels[precision] = [segmenter.predict(image) for image in images]
    for fp32, bf16 in zip(labels["fp32"], labels["bf16"], strict=True):
        agreement = (fp32 == bf16).double().mean().item()
        assert agreement >= AGREEMENT_FLOOR, f"{method}: {agreement:.2%} of pixels agree"


def test_compiled_labels_equal_eager_labels(shipped):
    backbone, images, classes = shipped
    image = images[0][..., :224, :256]  # 2 crops at short side 224: one small graph
    labels = {}
    for compile in (False, True):
        segmenter = load_segmenter("sclip", backbone=backbone, precision="fp32", compile=compile,
                                   short_side=224)
        segmenter.set_vocabulary(classes)
        labels[compile] = segmenter.predict(image)
    assert torch.equal(labels[True], labels[False])
    assert segmenter.settings()["inference"]["compile"] is True


def test_compile_failures_say_how_to_run_without_it(shipped, monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed

    backbone, images, classes = shipped

    def unsupported(model):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unsupported)
    with pytest.raises(RuntimeError, match="not available") as error:
        load_segmenter("naive", backbone=backbone, compile=True)
    assert "drop --compile" in str(error.value)

    def no_compiler(model):
        def forward(*args):
            raise BackendCompilerFailed(lambda: None, RuntimeError("no C++ compiler found"), None)
        return forward

    monkeypatch.setattr(torch, "compile", no_compiler)
    segmenter = load_segmenter("naive", backbone=backbone, compile=True)
    segmenter.set_vocabulary(classes)
    with pytest.raises(RuntimeError, match="could not compile 'naive'") as error:
        segmenter.predict(images[0])
    assert "C++ compiler" in str(error.value) and "drop --compile" in str(error.value)

