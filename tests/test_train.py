"""`zegkit train`: the schedule, parameter groups, exact resume after SIGKILL, 2-process gloo
equals one process, and runs that must not start."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from zegkit.methods import create_method
from zegkit.train.loop import learning_rate, parameter_groups, train
from zegkit.train.recipes import RECIPES, get_recipe, with_overrides

# A few-second ZegCLIP run on the generated proving ground: 64 px crops, 2 held-out scenes,
# no dropout (so one process and two draw the same computation).
SMALL = {"iterations": 6, "batch_size": 4, "crop": 64, "warmup_iterations": 2,
         "checkpoint_every": 2, "eval_every": 0, "eval_images": 2, "keep_steps": (3,),
         "prompt_tokens": 2, "decoder_heads": 2, "dropout": 0.0, "prompt_dropout": 0.0,
         "lr": 1e-3}


def _args(model: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"--set={key}={value!r}" if isinstance(value, tuple) else f"--set={key}={value}"
            for key, value in SMALL.items()]
    return ["train", "--recipe", "zegclip-synthetic", "--model", str(model), "--out", str(out),
            "--num-workers", "0", "--log-every", "1", *sets, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "ZEGKIT_CACHE": os.environ.get("ZEGKIT_CACHE", "")}


def _zegkit(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zegkit", *args], env=_env(), check=True,
                          capture_output=True, text=True, timeout=600, **kwargs)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_schedule_is_poly_with_linear_warmup():
    recipe = get_recipe("zegclip-voc-15-5")
    assert learning_rate(0, 2e-4, recipe) == pytest.approx(2e-4 * 1e-6, rel=1e-3)
    assert learning_rate(750, 2e-4, recipe) == pytest.approx(
        ((2e-4 - 1e-6) * (1 - 750 / 20000) ** 0.9 + 1e-6) * (1 - 0.5 * (1 - 1e-6)))
    assert learning_rate(20000, 2e-4, recipe) == pytest.approx(1e-6)
    assert learning_rate(10000, 2e-4, recipe) == pytest.approx((2e-4 - 1e-6) * 0.5 ** 0.9 + 1e-6)


def test_parameter_groups_multiply_lr_and_spare_norms(tiny_tokenizer):
    from conftest import make_tiny_clip

    from zegkit.backbone import ClipBackbone

    backbone = ClipBackbone(make_tiny_clip(16), tiny_tokenizer, "tiny")
    method = create_method("zegclip", prompt_tokens=2, decoder_heads=2)
    method.build(backbone)
    groups = parameter_groups(method, get_recipe("zegclip-voc-15-5"))
    assert {g["base_lr"] for g in groups} == {2e-4}
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(method.prompt_norm.weight) in no_decay and id(method.prompt_norm.bias) in no_decay
    assert id(method.descriptor.proj.weight) not in no_decay
    assert sum(len(g["params"]) for g in groups) == len(method.trainable_parameters())


def test_recipes_resolve_and_overrides_reach_the_method():
    recipe = with_overrides(get_recipe("zegclip-synthetic"), {"iterations": 9,
                                                              "warmup_iterations": 3,
                                                             "prompt_tokens": 3})
    assert recipe.iterations == 9 and recipe.method_settings["prompt_tokens"] == 3
    for name, recipe in RECIPES.items():
        create_method(recipe.method, **recipe.method_settings)  # every recipe's settings exist
        assert recipe.name == name
    st = get_recipe("zegclip-voc-15-5-st")
    assert st.iterations == 10000 and st.method_settings["self_training"]
    assert st.init_from.endswith("step_10000.safetensors")


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_clip_dir, tmp_path):
    straight = tmp_path / "straight"
    _zegkit(*_args(tiny_clip_dir, straight))
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "zegkit", *_args(tiny_clip_dir, killed)],
                               env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not _reached(killed, 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _reached(killed, 2) and not _reached(killed, 6), "the kill did not land mid-run"
    _zegkit(*_args(tiny_clip_dir, killed, "--resume"))
    for name in ("last.safetensors", "step_3.safetensors"):
        a, b = _tensors(straight / name), _tensors(killed / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    steps = [line for line in (killed / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 6  # lines of the killed run past its checkpoint were dropped


def test_a_kill_inside_a_checkpoint_loses_no_kept_file(tiny_clip_dir, tmp_path, monkeypatch):
    import zegkit.train.loop as loop

    recipe = with_overrides(get_recipe("zegclip-synthetic"), {"model": str(tiny_clip_dir), **SMALL})
    save = loop.save_method

    def die_before_the_kept_file(method, path, backbone):  # the process dies mid-checkpoint
        if path.name == "step_3.safetensors":
            raise KeyboardInterrupt
        save(method, path, backbone)

    monkeypatch.setattr(loop, "save_method", die_before_the_kept_file)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, tmp_path / "run", num_workers=0, progress=False)
    monkeypatch.setattr(loop, "save_method", save)
    train(recipe, tmp_path / "run", resume=True, num_workers=0, progress=False)
    assert (tmp_path / "run" / "step_3.safetensors").exists()


def _reached(out: Path, step: int) -> bool:
    """Whether the run in `out` has checkpointed `step` or later."""
    path = out / "state.pt"
    if not path.exists():
        return False
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["step"] >= step
    except (EOFError, RuntimeError):
        return False


def test_two_gloo_processes_equal_one(tiny_clip_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _zegkit(*_args(tiny_clip_dir, one, "--max-steps", "2", "--device", "cpu"))
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(29500 + os.getpid() % 1000), "-m", "zegkit",
         *_args(tiny_clip_dir, two, "--max-steps", "2", "--device", "cpu")],
        env=_env(), check=True, capture_output=True, text=True, timeout=600,
    )
    losses = [[json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()
               if '"loss"' in line] for out in (one, two)]
    # the same losses up to the order of float sums: step 1 checks the all-reduced normalisation
    # (each rank's half over the global count of masks), step 2 the averaged gradients
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    a, b = _tensors(one / "last.safetensors"), _tensors(two / "last.safetensors")
    differences = torch.cat([(a[key] - b[key]).abs().flatten() for key in a])
    print("largest parameter difference after 2 steps:", differences.max().item())
    # Adam's normalisation turns float-order differences of near-zero gradients into up to a
    # full step (lr 1e-3 x the recipe's multiplier 10) for elements whose gradient is near
    # Adam's eps (measured: 3.7% of elements beyond 1e-5, the largest 9e-4)
    assert differences.max() <= 2 * 1e-2
    assert (differences <= 1e-5).float().mean() >= 0.95  # measured: 0.963


def test_an_existing_run_needs_resume_and_the_same_recipe(tiny_clip_dir, tmp_path):
    out = tmp_path / "run"
    _zegkit(*_args(tiny_clip_dir, out, "--max-steps", "2"))
    again = subprocess.run([sys.executable, "-m", "zegkit", *_args(tiny_clip_dir, out)],
                           env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--resume" in again.stderr
    other = subprocess.run(
        [sys.executable, "-m", "zegkit", *_args(tiny_clip_dir, out, "--resume", "--set=lr=0.1")],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "['lr']" in other.stderr


def _voc(root: Path, bad_mask: bool) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    names = ["a", "b"]
    for name in names:
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
        mask = np.ones((32, 32), np.uint8)
        if bad_mask and name == "b":
            mask[0, 0] = 77
        Image.fromarray(mask, mode="L").save(voc / "SegmentationClassAug" / f"{name}.png")
    (voc / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(names) + "\n")
    return voc


def test_bad_training_data_fails_before_training_naming_the_file(tiny_clip_dir, tmp_path):
    voc = _voc(tmp_path, bad_mask=True)
    recipe = with_overrides(get_recipe("zegclip-voc-15-5"),
                            {"model": str(tiny_clip_dir), **SMALL, "crop": 32})
    with pytest.raises(ValueError, match=r"b\.png"):
        train(recipe, tmp_path / "run", data_root=voc, num_workers=0, progress=False)
    assert not (tmp_path / "run" / "state.pt").exists()


def test_bad_data_in_a_loader_worker_is_reported_as_raised(tiny_clip_dir, tmp_path,
                                                           monkeypatch):
    import zegkit.train.loop as loop

    voc = _voc(tmp_path, bad_mask=False)
    (voc / "SegmentationClass").mkdir()  # a val split for the held-out evaluation
    shutil.copy(voc / "SegmentationClassAug" / "a.png", voc / "SegmentationClass" / "a.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("a\n")
    mask = voc / "SegmentationClassAug" / "b.png"
    check = loop.check_training_set

    def check_then_damage(dataset):  # damage the check cannot see (after it, or past its sample)
        check(dataset)
        Image.open(mask).resize((16, 16)).save(mask)

    monkeypatch.setattr(loop, "check_training_set", check_then_damage)
    recipe = with_overrides(get_recipe("zegclip-voc-15-5"),
                            {"model": str(tiny_clip_dir), **SMALL, "crop": 32})
    with pytest.raises(ValueError, match=r"b\.png") as error:
        train(recipe, tmp_path / "run", data_root=voc, num_workers=1, progress=False)
    assert "DataLoader worker" not in str(error.value)
    assert "Traceback" not in str(error.value)
