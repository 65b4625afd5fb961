"""`zegkit segment` / `zegkit methods` end to end on a tiny random-weight model saved to disk."""

import json

import numpy as np
import pytest
from PIL import Image

from zegkit.cli import main

CLASSES = "person; people, dog, grass, sky"


def _write(path, array, mode=None, **save):
    Image.fromarray(array, mode=mode).save(path, **save)
    return path


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    return _write(tmp_path / "photo.jpg", rng.integers(0, 255, (120, 170, 3), dtype=np.uint8))


def _segment(tiny_clip_dir, out, *inputs, classes=CLASSES, extra=()):
    argv = [
        "segment",
        *map(str, inputs),
        "--classes",
        classes,
        "--model",
        str(tiny_clip_dir),
        "--out",
        str(out),
        "--short-side",
        "224",
        *extra,
    ]
    return main(argv)


def test_segment_writes_three_outputs(tiny_clip_dir, photo, tmp_path):
    out = tmp_path / "out"
    assert _segment(tiny_clip_dir, out, photo, extra=["--precision", "bf16"]) == 0
    labels = np.array(Image.open(out / "photo_labels.png"))
    assert labels.shape == (120, 170) and labels.max() < 4
    overlay = Image.open(out / "photo_overlay.png")
    assert overlay.width > 170  # legend panel beside the image
    summary = json.loads((out / "photo.json").read_text())
    assert summary["classes"] == ["person", "dog", "grass", "sky"]
    assert abs(sum(summary["pixel_fractions"].values()) - 1) < 1e-6
    assert sorted(p.name for p in out.iterdir()) == [
        "photo.json",
        "photo_labels.png",
        "photo_overlay.png",
    ]  # no temp files left


def test_segment_follows_the_load_between_images(tiny_clip_dir, photo, tmp_path,
                                                   monkeypatch):
    from zegkit import hardware

    looks = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware.LoadFollower, "follow", lambda self: looks.append(self))
    second = _write(tmp_path / "second.png", np.zeros((60, 80, 3), dtype=np.uint8))
    assert _segment(tiny_clip_dir, tmp_path / "out", photo, second) == 0
    following = hardware.PROC.joinpath("stat").exists()
    assert len(looks) == (2 if following else 0)  # one look after each image
    assert hardware._load_follower is None  # off once the command is done


def test_compile_flag_reaches_the_segmenter_and_the_record(tiny_clip_dir, photo, tmp_path,
                                                          monkeypatch):
    import zegkit.segmenter

    compiled = []
    monkeypatch.setattr(zegkit.segmenter, "compiled",
                        lambda method: compiled.append(method) or method)  # no real compile
    out = tmp_path / "out"
    assert _segment(tiny_clip_dir, out, photo, extra=["--compile"]) == 0
    assert len(compiled) == 1
    settings = json.loads((out / "photo.json").read_text())["settings"]
    assert settings["inference"]["compile"] is True
    assert settings["inference"]["precision"] == "auto"  # the default, and what it resolved to:
    assert settings["resolved_precision"] in ("fp32", "bf16")


def test_segment_a_folder_with_every_image_kind(tiny_clip_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    _write(folder / "gray.png", rgb[..., 0])
    _write(folder / "rgba.png", np.dstack([rgb, np.full((60, 90), 128, np.uint8)]))
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    _write(folder / "deep.png", rgb[..., 0].astype(np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    out = tmp_path / "out"
    assert _segment(tiny_clip_dir, out, folder) == 0
    for stem in ("gray", "rgba", "palette", "deep"):
        assert np.array(Image.open(out / f"{stem}_labels.png")).shape == (60, 90)
    assert np.array(Image.open(out / "rotated_labels.png")).shape == (90, 60)  # upright


def test_methods_lists_every_method(capsys):
    from zegkit.methods import METHODS

    assert main(["methods"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in METHODS) and "pamr" in printed


@pytest.mark.parametrize(
    "classes, fragment",
    [("dog,,sky", "empty name"), ("dog, Dog", "appears in class 0"), (" , ", "empty name")],
)
def test_bad_classes_write_nothing(tiny_clip_dir, photo, tmp_path, capsys, classes, fragment):
    out = tmp_path / "out"
    assert _segment(tiny_clip_dir, out, photo, classes=classes) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()


def test_bad_files_write_nothing(tiny_clip_dir, photo, tmp_path, capsys):
    out = tmp_path / "out"
    assert _segment(tiny_clip_dir, out, photo, tmp_path / "missing.png") == 2
    assert "does not exist" in capsys.readouterr().err
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert _segment(tiny_clip_dir, out, photo, text) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert not out.exists()


def test_bad_model_and_method(photo, tmp_path, capsys):
    out = tmp_path / "out"
    assert _segment(tmp_path / "no-such-model", out, photo) == 2
    assert "no-such-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["segment", str(photo), "--classes", "a,b", "--out", str(out), "--method", "nope"])
    assert not out.exists()


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from zegkit.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synthetic"), 3, seed=7, size=96)


def _eval(model_dir, root, output, method, *extra):
    return main(
        [
            "eval",
            "--dataset",
            "synthetic",
            "--data-root",
            str(root),
            "--method",
            method,
            "--model",
            str(model_dir),
            "--output",
            str(output),
            "--num-workers",
            "0",
            *extra,
        ]
    )


def test_eval_one_method_writes_a_table_and_json(tiny_clip_dir, synthetic_root, tmp_path, capsys):
    output = tmp_path / "result.json"
    assert _eval(tiny_clip_dir, synthetic_root, output, "sclip") == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "hIoU" in printed
    result = json.loads(output.read_text())
    assert result["settings"]["method"] == "sclip"
    assert 0 <= result["mIoU"] <= 100 and result["num_images"] == 3


def test_eval_reports_throughput_with_the_threads_given(tiny_clip_dir, synthetic_root, tmp_path,
                                                        capsys):
    import torch

    threads = torch.get_num_threads()
    output = tmp_path / "result.json"
    assert _eval(tiny_clip_dir, synthetic_root, output, "naive", "--threads", "1") == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "threads from threads argument" in printed
    assert torch.get_num_threads() == threads  # restored: main() leaves the process as it was
    throughput = json.loads(output.read_text())["throughput"]
    assert throughput["images"] == 3 and throughput["torch_threads"] == 1
    assert throughput["num_workers"] == 0 and 0 <= throughput["model_fraction"] <= 1


def test_eval_all_methods_in_one_table(tiny_clip_dir, synthetic_root, tmp_path, capsys):
    output = tmp_path / "all.json"
    assert _eval(tiny_clip_dir, synthetic_root, output, "all", "--limit", "1") == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert all(name in header for name in ("naive", "maskclip", "sclip", "clearclip", "naclip"))
    assert set(json.loads(output.read_text())["results"]) >= {"naive", "sclip", "naclip"}


def test_method_settings_from_the_command_line(tiny_clip_dir, photo, tmp_path, capsys):
    from zegkit.cli import parse_settings

    assert parse_settings(["gaussian_std=3", "compensation=False", "model=a/b"]) == {
        "gaussian_std": 3,
        "compensation": False,
        "model": "a/b",
    }
    out = tmp_path / "out"
    extra = ["--method", "cliper", "--set", "compensation=False"]
    assert _segment(tiny_clip_dir, out, photo, extra=extra) == 0  # no Stable Diffusion needed
    assert (out / "photo.json").exists()
    bad = tmp_path / "bad"
    assert _segment(tiny_clip_dir, bad, photo, extra=["--method", "naclip", "--set", "std=3"]) == 2
    assert "its settings are" in capsys.readouterr().err
    assert _segment(tiny_clip_dir, bad, photo, extra=["--set", "gaussian_std"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert not bad.exists()


def test_eval_passes_device_and_tokenizer_to_the_model(synthetic_root, tmp_path, monkeypatch,
                                                       capsys):
    import zegkit.segmenter

    seen = {}

    def fake_load_clip(source, *, device, tokenizer_source):
        seen.update(source=source, device=device, tokenizer=tokenizer_source)
        raise RuntimeError("stopped after recording the arguments")

    monkeypatch.setattr(zegkit.segmenter, "load_clip", fake_load_clip)
    status = _eval("some/model", synthetic_root, tmp_path / "r.json", "sclip",
                   "--device", "cpu:0", "--tokenizer", "tok/dir")
    assert status == 2 and "stopped after recording" in capsys.readouterr().err
    assert seen == {"source": "some/model", "device": "cpu:0", "tokenizer": "tok/dir"}
