"""`zegkit serve` without a browser: upload checks, the segmenter pool, rendering, messages."""

from __future__ import annotations

import base64
import io
import sys

import numpy as np
import pytest
from PIL import Image

from zegkit import cli
from zegkit.serve import INSTALL_HINT, is_loopback
from zegkit.serve.engine import (
    Result,
    SegmenterPool,
    UploadLimits,
    check_upload,
    check_vocabulary,
    render_result,
    run_segmentation,
    safe_stem,
    user_message,
)

TINY = "zegkit/tiny-synthetic"
CLASSES = ["sky", "sand; beach", "brick", "star"]


@pytest.fixture(scope="module")
def pool() -> SegmenterPool:
    return SegmenterPool(capacity=2)


@pytest.fixture()
def picture(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def test_check_upload_accepts_an_image(picture):
    image = check_upload(picture, UploadLimits())
    assert image.mode == "RGB" and image.size == (56, 40)


def test_check_upload_caps_bytes_and_pixels(picture):
    with pytest.raises(ValueError, match="--max-upload-mb"):
        check_upload(picture, UploadLimits(max_bytes=10))
    with pytest.raises(ValueError, match="--max-pixels"):
        check_upload(picture, UploadLimits(max_pixels=56 * 40 - 1))


def test_check_upload_refuses_a_non_image(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        check_upload(fake, UploadLimits())


def test_safe_stem_keeps_names_inside_the_folder():
    assert safe_stem("../../etc/passwd.png") == "passwd"
    assert safe_stem("my photo (1).JPG") == "my_photo_1"
    assert safe_stem("....png") == "image"


def test_check_vocabulary():
    with pytest.raises(ValueError, match="empty"):
        check_vocabulary([])
    with pytest.raises(ValueError, match="at most 255"):
        check_vocabulary([f"class {i}" for i in range(256)])


def test_run_segmentation_matches_segment(pool, picture):
    segmenter = pool.get("sclip", TINY)
    segmenter.set_vocabulary(CLASSES)
    image = check_upload(picture, UploadLimits())
    segmentation, confidence = run_segmentation(segmenter, image)
    reference = segmenter.segment(image)
    np.testing.assert_array_equal(segmentation.labels, reference.labels)
    np.testing.assert_allclose(segmentation.scores, reference.scores, rtol=1e-5, atol=1e-6)
    assert segmentation.settings == reference.settings
    assert confidence.shape == (40, 56) and confidence.dtype == np.float32
    assert ((confidence > 0) & (confidence <= 1)).all()


def test_pool_reuses_segmenters_and_shares_the_backbone(pool):
    first = pool.get("sclip", TINY)
    assert pool.get("sclip", TINY) is first
    other = pool.get("maskclip", TINY)
    assert other is not first and other.backbone is first.backbone
    assert pool.get("sclip", TINY, refine="pamr").config.refine == "pamr"
    assert len(pool._segmenters) == 2  # capacity 2: the oldest went


def test_render_result_legend_toggle_and_hover_map(pool, picture, tmp_path):
    segmenter = pool.get("sclip", TINY)
    segmenter.set_vocabulary(CLASSES)
    image = check_upload(picture, UploadLimits())
    segmentation, confidence = run_segmentation(segmenter, image)
    files = segmentation.save(tmp_path, "photo", image)
    assert sorted(p.name for p in files.values()) == [
        "photo.json",
        "photo_labels.png",
        "photo_overlay.png",
    ]
    result = Result("sclip", segmentation, confidence, files, 0.1)
    present = [segmentation.class_names[i] for i in np.unique(segmentation.labels)]
    page = render_result(result, image, 0.5, shown=present[1:])
    for name in present:
        assert f'<td class="zk-name">{name}</td>' in page
    assert page.count("zk-hidden") == 1  # the one class toggled off
    hover = page.split('data-hover="data:image/png;base64,')[1].split('"')[0]
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(hover))))
    np.testing.assert_array_equal(pixels[..., 0], segmentation.labels)
    np.testing.assert_allclose(pixels[..., 1] / 255, confidence, atol=1 / 255)


def test_user_message():
    assert "Out of memory" in user_message(MemoryError())
    assert user_message(ValueError("The vocabulary is empty")) == "The vocabulary is empty"
    message = user_message(KeyError("x"))
    assert "Unexpected error (KeyError)" in message and "Traceback" not in message


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_serve_without_the_web_extra_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now fails
    monkeypatch.delitem(sys.modules, "zegkit.serve.app", raising=False)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # restored afterwards
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    assert cli.main(["serve", "--out", str(tmp_path / "out")]) == 2
    assert INSTALL_HINT in capsys.readouterr().err


def test_page_helpers(tmp_path):
    pytest.importorskip("gradio", reason='the web extra is not installed: pip install ".[web]"')
    from zegkit.serve.app import ServeConfig, _uploaded_path, load_class_list, parse_vocabulary

    assert parse_vocabulary("sky, sand; beach\nbrick") == ["sky", "sand; beach", "brick"]
    with pytest.raises(ValueError, match="vocabulary is empty"):
        parse_vocabulary(" , \n")
    assert load_class_list("voc21").startswith("background")
    config = ServeConfig(out_dir=tmp_path, pool=SegmenterPool())
    inside = config.upload_dir / "abc" / "photo.png"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"x")
    assert _uploaded_path({"path": str(inside)}, config) == inside.resolve()
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    for path in (outside, config.upload_dir / ".." / "secret.png"):
        with pytest.raises(ValueError, match="did not arrive"):
            _uploaded_path({"path": str(path)}, config)
    with pytest.raises(ValueError, match="No image"):
        _uploaded_path(None, config)


def test_missing_weights_give_a_readable_message(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(Exception) as caught:
        SegmenterPool().get("sclip", str(missing))
    message = user_message(caught.value)
    assert "no-such-model" in message and not message.startswith("Unexpected error")
