"""Every bad input to `zegkit segment` / `zegkit eval` refused clearly and before any model loads;
nothing lost or half-written on Ctrl-C; resumable, error-tolerant folder runs (issue 16).

Where a check must happen before the model loads, the test passes a model path that does not
exist: a check that ran after loading would report the missing model instead.
"""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import CLASSES, _eval, _segment, synthetic_root  # noqa: F401 (fixture)

from zegkit.cli import EXIT_INTERRUPTED, EXIT_SKIPPED, EXIT_USAGE, main


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _image(path: Path, seed: int = 0, size=(48, 64)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    """A folder with two images, a.png and b.png."""
    path = tmp_path / "in"
    path.mkdir()
    _image(path / "a.png", 0)
    _image(path / "b.png", 1)
    return path


# ---- outputs never replace inputs ------------------------------------------------------------
def test_an_output_that_would_replace_another_input_is_refused(tiny_clip_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    _image(folder / "x.png", 0)
    _image(folder / "x_labels.png", 1)  # the user's own file, not an earlier output
    before = _digests(folder)
    assert _segment(tiny_clip_dir, folder, folder) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "would be written over the input" in err and "x_labels.png" in err
    assert _digests(folder) == before


def test_outputs_of_an_earlier_run_beside_the_images_are_not_overwritten(tiny_clip_dir, folder,
                                                                          capsys):
    assert _segment(tiny_clip_dir, folder, folder / "a.png") == 0  # a_labels.png etc. beside a
    before = _digests(folder)
    assert _segment(tiny_clip_dir, folder, folder) == EXIT_USAGE  # the folder now holds them
    assert "would be written over the input" in capsys.readouterr().err
    assert _digests(folder) == before


# ---- numeric options -------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-100", "nan", "inf", "-inf"])
def test_logit_scale_that_is_not_positive_and_finite_is_refused(tmp_path, capsys, value):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["segment", "x.png", "--classes", "a,b", "--out", str(out), f"--logit-scale={value}"])
    assert exit_.value.code == EXIT_USAGE
    assert "--logit-scale: must be a positive finite number" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-1.5", "1e999", "'big'"])
def test_logit_scale_through_set_is_checked_before_the_model_loads(tmp_path, capsys, value):
    from test_cli import _write

    photo = _write(tmp_path / "p.png", np.zeros((8, 8, 3), np.uint8))
    status = _segment(tmp_path / "no-such-model", tmp_path / "out", photo,
                      extra=["--set", f"logit_scale={value}"])
    assert status == EXIT_USAGE
    err = capsys.readouterr().err
    assert "logit_scale" in err and "no-such-model" not in err


def test_api_refuses_logit_scale_zero_nan_and_inf():
    from zegkit.methods import create_method

    for value in (0, 0.0, -3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="logit_scale must be a positive finite number"):
            create_method("sclip", logit_scale=value)
    assert create_method("sclip", logit_scale=1e-3).config.logit_scale == 1e-3  # 0 < s: kept


@pytest.mark.parametrize(
    "setting, fragment",
    [("gaussian_std=abc", "gaussian_std must be a number"),
     ("reduced=3", "reduced must be True or False"),
     ("crop=2.5", "crop must be an integer"),
     ("crop=0", "crop must be a positive integer"),
     ("background_threshold=nan", "background_threshold must be a number or None"),
     ("background_threshold=1e999", "background_threshold is a probability")],
)
def test_set_with_a_wrong_value_is_refused_before_the_model_loads(tmp_path, capsys, setting,
                                                                  fragment):
    photo = _image(tmp_path / "p.png")
    status = _segment(tmp_path / "no-such-model", tmp_path / "out", photo,
                      extra=["--method", "naclip", "--set", setting])
    assert status == EXIT_USAGE
    err = capsys.readouterr().err
    assert fragment in err and "no-such-model" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "setting, fragment",
    [("seen_penalty=abc", "seen_penalty must be a number"),
     ("self_training=3", "self_training must be True or False"),
     ("no_such_setting=1", "has no setting(s) ['no_such_setting']")],
)
def test_set_with_a_checkpoint_is_checked_before_the_model_loads(tiny_clip_dir, tmp_path, capsys,
                                                                 setting, fragment):
    from zegkit.backbone import load_clip
    from zegkit.methods import create_method
    from zegkit.methods.checkpoint import save_method

    backbone = load_clip(tiny_clip_dir)
    method = create_method("zegclip", prompt_tokens=2, decoder_layers=1, decoder_heads=2)
    method.build(backbone)
    checkpoint = save_method(method, tmp_path / "zegclip.safetensors", backbone)
    photo = _image(tmp_path / "p.png")
    status = _segment(tmp_path / "no-such-model", tmp_path / "out", photo,
                      extra=["--method", "zegclip", "--checkpoint", str(checkpoint),
                             "--set", setting])
    assert status == EXIT_USAGE
    err = capsys.readouterr().err
    assert fragment in err and "no-such-model" not in err


def test_an_image_too_large_for_the_memory_is_refused_before_the_model_loads(tmp_path, capsys,
                                                                           monkeypatch):
    from zegkit import memory

    photo = _image(tmp_path / "p.png", size=(600, 800))
    _segment(tmp_path / "no-such-model", tmp_path / "out", photo)
    assert "no-such-model" in capsys.readouterr().err  # it fits this machine: no refusal
    monkeypatch.setattr(memory, "available_memory", lambda: (4 * 2**20, "a test's figure"))
    status = _segment(tmp_path / "no-such-model", tmp_path / "out", photo)
    assert status == EXIT_USAGE
    err = capsys.readouterr().err
    assert "p.png" in err and "800 x 600 image" in err and "needs at least" in err
    assert "4 MiB is available (a test's figure)" in err and "shrink the image" in err
    assert "no-such-model" not in err and not (tmp_path / "out").exists()
    _segment(tmp_path / "no-such-model", tmp_path / "out", photo, extra=["--refine", "pamr"])
    assert "--refine pamr" in capsys.readouterr().err


def test_too_many_classes_are_refused_before_the_model_loads(tmp_path, capsys):
    photo = _image(tmp_path / "p.png")
    classes = ",".join(f"c{i}" for i in range(65536))
    assert _segment(tmp_path / "no-such-model", tmp_path / "out", photo,
                    classes=classes) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "65536 classes" in err and "at most 65535" in err and "no-such-model" not in err


@pytest.mark.parametrize("option", ["--limit=0", "--num-workers=-1", "--progress-every=0",
                                    "--bootstrap=-5", "--limit=two"])
def test_eval_counts_are_refused_while_parsing(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--dataset", "synthetic", "--data-root", str(tmp_path), "--model", "none",
              option])
    assert exit_.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"argument {option.split('=')[0]}: must be" in err


# ---- devices ---------------------------------------------------------------------------------
@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as one without CUDA (it may have a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_segment_on_cuda_without_cuda_is_refused(tiny_clip_dir, tmp_path, capsys, no_cuda):
    photo = _image(tmp_path / "p.png")
    out = tmp_path / "out"
    assert _segment(tiny_clip_dir, out, photo, extra=["--device", "cuda"]) == EXIT_USAGE
    assert "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()


def test_eval_on_cuda_without_cuda_is_refused(tiny_clip_dir, synthetic_root, tmp_path,  # noqa: F811
                                              capsys, no_cuda):
    output = tmp_path / "r.json"
    assert _eval(tiny_clip_dir, synthetic_root, output, "sclip", "--device", "cuda") == EXIT_USAGE
    assert "CUDA is not available" in capsys.readouterr().err
    assert not output.exists()


def test_train_on_cuda_without_cuda_is_refused_before_anything_runs(tmp_path, capsys, no_cuda):
    from zegkit.train.recipes import RECIPES

    out = tmp_path / "run"
    status = main(["train", "--recipe", sorted(RECIPES)[0], "--out", str(out), "--device", "cuda"])
    assert status == EXIT_USAGE and "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_device_is_refused(tmp_path, capsys):
    photo = _image(tmp_path / "p.png")
    assert _segment(tmp_path / "no-such-model", tmp_path / "o", photo,
                    extra=["--device", "gpu0"]) == EXIT_USAGE
    assert "Unknown device 'gpu0'" in capsys.readouterr().err


# ---- output paths ----------------------------------------------------------------------------
def test_out_that_is_a_file_or_under_a_file_is_refused(tmp_path, capsys):
    photo = _image(tmp_path / "p.png")
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    assert _segment(tmp_path / "no-such-model", afile, photo) == EXIT_USAGE
    assert "is a file, not a folder" in capsys.readouterr().err
    assert _segment(tmp_path / "no-such-model", afile / "out", photo) == EXIT_USAGE
    assert "lies under" in capsys.readouterr().err
    assert afile.read_text() == "keep me"


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write: chmod 555, or (as root, whom chmod does not stop) a
    read-only file system where there is one."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return folder
    if not os.access("/proc/sys", os.W_OK):
        return Path("/proc/sys")
    pytest.skip("no folder this process cannot write")


def test_read_only_out_is_refused_before_the_model_loads(tmp_path, capsys):
    photo = _image(tmp_path / "p.png")
    locked = _read_only_folder(tmp_path)
    assert _segment(tmp_path / "no-such-model", locked / "out", photo) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "cannot be written" in err and "no-such-model" not in err


def test_eval_output_that_is_a_folder_is_refused_before_any_work(synthetic_root, tmp_path,  # noqa: F811
                                                                 capsys):
    status = _eval(tmp_path / "no-such-model", synthetic_root, tmp_path, "sclip")
    assert status == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--output" in err and "is a folder" in err and "no-such-model" not in err


# ---- Ctrl-C, resuming, skipping ----------------------------------------------------------------
def _interrupt_writing_of_image(number: int, monkeypatch) -> None:
    """Ctrl-C while image `number` (1-based) stages its first output file."""
    import zegkit.io as zio

    real, calls = zio._write_synced, []

    def interrupted(path, data):
        calls.append(path)
        if len(calls) == 3 * (number - 1) + 1:
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(zio, "_write_synced", interrupted)


def test_ctrl_c_leaves_complete_outputs_and_exit_130_then_resume(tiny_clip_dir, folder, tmp_path,
                                                                 capsys, monkeypatch):
    out = tmp_path / "out"
    _interrupt_writing_of_image(2, monkeypatch)
    assert _segment(tiny_clip_dir, out, folder) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "Interrupted after 1 of 2 image(s)" in err and "interrupted (Ctrl-C)" in err
    assert sorted(os.listdir(out)) == ["a.json", "a_labels.png", "a_overlay.png"]  # no b, no temp
    first = _digests(out)
    monkeypatch.undo()
    assert _segment(tiny_clip_dir, out, folder, extra=["--skip-existing"]) == 0
    assert "Skipping 1 image(s) whose outputs exist" in capsys.readouterr().out
    assert {k: v for k, v in _digests(out).items() if k.startswith("a")} == first
    assert (out / "b_labels.png").is_file() and (out / "b.json").is_file()


def _truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header reads but whose pixels stop half way (decoding fails)."""
    _image(path, 5, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_skip_errors_skips_unreadable_images_and_reports_them(tiny_clip_dir, folder, tmp_path,
                                                              capsys):
    Image.open(folder / "a.png").save(folder / "c.jpg")
    _truncated_jpeg(folder / "c.jpg")  # passes the header check, fails while decoding
    (folder / "d.png").write_text("not an image")  # fails the header check
    out = tmp_path / "out"
    assert _segment(tiny_clip_dir, out, folder) == EXIT_USAGE  # without the flag: refused
    err = capsys.readouterr().err
    assert "d.png" in err and "--skip-errors" in err and not out.exists()
    (folder / "d.png").unlink()  # now only c.jpg, whose damage shows while decoding
    assert _segment(tiny_clip_dir, out, folder) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "c.jpg" in err and "The 2 image(s) before it were saved" in err
    (folder / "d.png").write_text("not an image")
    assert _segment(tiny_clip_dir, out, folder, extra=["--skip-errors"]) == EXIT_SKIPPED
    captured = capsys.readouterr()
    assert "Skipped 2 image(s)" in captured.err
    assert "c.jpg" in captured.err and "d.png" in captured.err
    assert "Segmented 2 image(s)" in captured.out
    assert sorted(p.name for p in out.iterdir()) == [
        "a.json", "a_labels.png", "a_overlay.png", "b.json", "b_labels.png", "b_overlay.png"]


# ---- class files and folders -------------------------------------------------------------------
def test_class_file_messages(tmp_path, capsys):
    photo = _image(tmp_path / "p.png")
    latin1 = tmp_path / "classes.txt"
    latin1.write_bytes("caf\xe9\nchien\n".encode("latin-1"))
    argv = ["segment", str(photo), "--out", str(tmp_path / "out"), "--model", "none"]
    assert main([*argv, "--classes-file", str(latin1)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert str(latin1) in err and "UTF-8" in err
    assert main([*argv, "--classes-file", str(tmp_path)]) == EXIT_USAGE
    assert "is a folder" in capsys.readouterr().err


def test_empty_folder_hint_names_no_missing_flag(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    _image(empty / "sub" / "x.png")
    assert _segment(tmp_path / "no-such-model", tmp_path / "out", empty) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "holds no images" in err and "sub-folders are not searched" in err
    assert "recursive" not in err


# ---- evaluation data errors ------------------------------------------------------------------
def test_a_bad_mask_in_a_loader_worker_is_reported_plainly(tiny_clip_dir, tmp_path, capsys):
    from zegkit.data.synthetic import write_dataset

    root = write_dataset(tmp_path / "synthetic", 2, seed=3, size=64)
    mask = root / "masks" / "000001.png"
    Image.open(mask).resize((32, 32)).save(mask)
    status = _eval(tiny_clip_dir, root, tmp_path / "r.json", "naive", "--num-workers", "1")
    assert status == EXIT_USAGE
    err = capsys.readouterr().err
    assert "000001.png" in err and "DataLoader worker" not in err and "Traceback" not in err


# ---- fast help and argument errors -------------------------------------------------------------
def _modules_after(argv: list[str]) -> set[str]:
    """The heavy modules a fresh interpreter has imported after `zegkit <argv>` exits."""
    import subprocess
    import sys

    code = ("import sys\nfrom zegkit.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\n"
            "print('IMPORTED', *(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          check=True, timeout=120)
    last = done.stdout.splitlines()[-1].split()  # after the help text, if any
    assert last[0] == "IMPORTED"
    return set(last[1:])


def test_help_imports_neither_torch_nor_transformers():
    assert _modules_after(["--help"]) == set()


def test_argument_errors_do_not_import_transformers():
    assert "transformers" not in _modules_after(["segment", "x.png"])  # --classes, --out missing
