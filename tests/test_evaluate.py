"""Metrics against hand-computed numbers; the evaluation loop with a real colour predictor."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from zegkit.data.datasets import load_dataset
from zegkit.evaluate import (
    confusion_matrix,
    evaluate,
    evaluate_method,
    format_comparison,
    format_table,
    format_throughput,
    harmonic_mean,
    metrics,
    run_eval,
    run_eval_all,
    save_results,
)

# Class k of the fixture is painted in COLOURS[k]; the predictor labels each pixel with the class
# of the nearest colour, so pixel noise makes it wrong in a known, content-determined way.
COLOURS = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])
CLASSES = ["red", "green", "blue", "yellow"]
BLOCK = 4  # side of the one-class squares the fixture images are made of


class NearestColour:
    """A real (if simple) segmenter: each pixel gets the class of the nearest class colour."""

    def __init__(self, colours=COLOURS):
        self.colours = colours.float() / 255  # (K, 3)
        self.vocabulary = None

    def set_vocabulary(self, classes):
        self.vocabulary = list(classes)

    def predict(self, images):  # (B, 3, H, W) in [0, 1] -> (B, H, W)
        distances = (images[:, None] - self.colours[None, :, :, None, None]).square().sum(2)
        return distances.argmin(1)


def write_colour_dataset(root, num=6, size=(12, 10), seed=0, noise=90):
    """A synthetic-layout dataset: random class blocks in their colours, noisy, some ignore."""
    rng = np.random.default_rng(seed)
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(num):
        blocks = rng.integers(0, len(CLASSES), (-(-size[0] // BLOCK), -(-size[1] // BLOCK)))
        mask = np.kron(blocks, np.ones((BLOCK, BLOCK), dtype=np.int64))[: size[0], : size[1]]
        image = np.clip(COLOURS.numpy()[mask] + rng.integers(-noise, noise + 1, (*size, 3)), 0, 255)
        mask[rng.random(size) < 0.05] = 255
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"{i:06d}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{i:06d}.png")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "split.json").write_text(json.dumps({"seen": ["red", "green"],
                                                 "unseen": ["blue", "yellow"]}))
    return root


@pytest.fixture
def colour_dataset(tmp_path):
    return load_dataset("synthetic", write_colour_dataset(tmp_path / "colours"))


def reference_matrix(dataset, predictor):
    """The confusion matrix by a plain loop over every pixel (no bincount)."""
    conf = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64)
    for image, mask, _ in (dataset[i] for i in range(len(dataset))):
        labels = predictor.predict(image[None].float() / 255)[0]
        for t, p in zip(mask.flatten().tolist(), labels.flatten().tolist(), strict=True):
            if t != 255:
                conf[t, p] += 1
    return conf


# ---- confusion matrix and metrics, by hand ----------------------------------------------------
def test_confusion_matrix_by_hand():
    target = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1], [255, 255, 1, 0]])
    prediction = torch.tensor([[0, 0, 0, 1], [1, 1, 2, 2], [3, 3, 0, 2]])
    # pairs (truth, prediction): row 0 (0,0)x3 (0,1); row 1 (1,1)x2 (1,2)x2; row 2 two ignored,
    # (1,0), (0,2)
    expected = torch.tensor([[3, 1, 1, 0],
                             [1, 2, 2, 0],
                             [0, 0, 0, 0],
                             [0, 0, 0, 0]])
    conf = confusion_matrix(prediction, target, 4)
    assert conf.dtype == torch.int64 and torch.equal(conf, expected)


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="outside the 2 classes"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 2)
    # a wild prediction on an ignored pixel is not an error
    assert confusion_matrix(torch.tensor([9, 1]), torch.tensor([255, 1]), 2).sum() == 1


CONF = torch.tensor([[3, 1, 0, 0],
                     [0, 2, 2, 0],
                     [0, 0, 0, 0],
                     [0, 0, 0, 0]])


def test_metrics_by_hand():
    # TP = (3, 2, 0, 0), GT = (4, 4, 0, 0), predicted = (3, 3, 2, 0)
    # IoU: 3/4, 2/5, 0/2 (predicted but absent: counts as 0), class 3 undefined (left out)
    result = metrics(CONF, ["a", "b; bee", "c", "d"])
    assert result["IoU"] == {"a": 75.0, "b": 40.0, "c": 0.0, "d": None}
    assert result["Acc"] == {"a": 75.0, "b": 50.0, "c": None, "d": None}
    assert result["mIoU"] == pytest.approx(115 / 3)
    assert result["mAcc"] == pytest.approx(62.5)
    assert result["aAcc"] == pytest.approx(62.5)  # 5 of 8 labelled pixels
    assert result["num_pixels"] == 8 and "hIoU" not in result


def test_seen_unseen_and_harmonic_by_hand():
    result = metrics(CONF, ["a", "b", "c", "d"], seen=[0, 2], unseen=[1])
    assert result["mIoU(S)"] == pytest.approx(37.5)  # (75 + 0) / 2
    assert result["mIoU(U)"] == pytest.approx(40.0)
    assert result["hIoU"] == pytest.approx(2 * 37.5 * 40 / 77.5)
    default_seen = metrics(CONF, ["a", "b", "c", "d"], unseen=[2, 3])
    assert default_seen["seen"] == [0, 1] and default_seen["mIoU(S)"] == pytest.approx(57.5)
    assert default_seen["mIoU(U)"] == 0.0 and default_seen["hIoU"] == 0.0
    assert harmonic_mean(None, 50.0) is None
    with pytest.raises(ValueError, match="both seen and unseen"):
        metrics(CONF, ["a", "b", "c", "d"], seen=[0, 1], unseen=[1])


def test_tables_show_classes_and_summary():
    result = metrics(CONF, ["a", "b", "c", "d"], unseen=[2, 3])
    table = format_table(result)
    assert "mIoU(U)" in table and "75.00" in table and "unseen" in table
    assert table.splitlines()[2].startswith("a ")
    other = metrics(torch.eye(4, dtype=torch.int64), ["a", "b", "c", "d"])
    combined = format_comparison({"m1": result, "m2": other, "m3": {"error": "no weights"}})
    assert "m1" in combined and "100.00" in combined and "m3: no weights" in combined


def test_importing_evaluate_does_not_import_transformers():
    code = "import sys, zegkit.evaluate; print('transformers' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.strip()
    assert imported == "False"  # the metrics are usable without the backbone's import cost


# ---- the evaluation loop ------------------------------------------------------------------------
def test_evaluate_matches_a_pixel_loop(colour_dataset):
    predictor = NearestColour()
    result = evaluate(predictor, colour_dataset, progress=False, num_workers=0)
    expected = reference_matrix(colour_dataset, predictor)
    assert torch.equal(torch.tensor(result["confusion"]), expected)
    assert 0 < expected.trace() < expected.sum()  # the noise makes it imperfect, not useless
    assert result["num_images"] == len(colour_dataset) and result["world_size"] == 1
    assert result["unseen"] == [2, 3] and "hIoU" in result
    assert predictor.vocabulary == colour_dataset.class_names
    assert result == {**result, **metrics(expected, CLASSES, [0, 1], [2, 3])}


def test_worker_processes_give_the_same_matrix(colour_dataset):
    serial = evaluate(NearestColour(), colour_dataset, progress=False, num_workers=0)
    workers = evaluate(NearestColour(), colour_dataset, progress=False, num_workers=2)
    assert workers["confusion"] == serial["confusion"]


class ThreadCountingDataset(torch.utils.data.Dataset):
    """`dataset`'s items, refused (as a reading error) when decoded on more than one thread in
    a loader worker."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getattr__(self, name):  # has_masks, class_names, ...: the wrapped dataset's
        if name == "dataset":  # not set yet (unpickling in a spawned worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if torch.utils.data.get_worker_info() is not None and torch.get_num_threads() != 1:
            raise ValueError(f"worker decoded on {torch.get_num_threads()} threads")
        return self.dataset[index]


def test_loader_workers_decode_on_one_thread(colour_dataset):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # what a worker would inherit
    try:
        result = evaluate(NearestColour(), ThreadCountingDataset(colour_dataset), progress=False,
                          num_workers=2)
    finally:
        torch.set_num_threads(threads)
    assert result["num_images"] == len(colour_dataset)
    assert result["throughput"]["num_workers"] == 2


def test_throughput_entry_and_threads_left_as_set(colour_dataset):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the caller's choice: evaluate does not change it
    try:
        throughput = evaluate(NearestColour(), colour_dataset, progress=False,
                              num_workers=0)["throughput"]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert throughput["images"] == len(colour_dataset) and throughput["images_per_second"] > 0
    assert throughput["num_workers"] == 0 and throughput["torch_threads"] == 1
    assert throughput["usable_cores"] >= 1
    fractions = throughput["model_fraction"], throughput["data_wait_fraction"]
    assert all(0 <= fraction <= 1 for fraction in fractions) and sum(fractions) <= 1.001
    line = format_throughput(throughput)
    assert "images/s" in line and "0 loader workers, 1 torch threads" in line


def test_resume_ignores_workers_and_times_only_the_new_images(colour_dataset, tmp_path):
    path = tmp_path / "run.pt"
    first = evaluate(NearestColour(), colour_dataset, progress=False, num_workers=0,
                     checkpoint=path, settings={"method": "nearest-colour"})
    again = evaluate(NearestColour(), colour_dataset, progress=False, num_workers=1,
                     checkpoint=path, settings={"method": "nearest-colour"})
    assert again["confusion"] == first["confusion"]
    assert again["resumed_images"] == len(colour_dataset)
    assert again["throughput"]["images"] == 0 and again["throughput"]["images_per_second"] is None
    assert "all were resumed" in format_throughput(again["throughput"])


def test_resume_from_checkpoint_and_refuse_other_settings(colour_dataset, tmp_path):
    path = tmp_path / "run.pt"
    settings = {"method": "nearest-colour"}
    first = evaluate(NearestColour(), colour_dataset, progress=False, num_workers=0,
                     checkpoint=path, checkpoint_every=2, settings=settings)
    again = evaluate(NearestColour(), colour_dataset, progress=False, num_workers=0,
                     checkpoint=path, settings=settings)
    assert again["resumed_images"] == len(colour_dataset) and first["resumed_images"] == 0
    assert again["confusion"] == first["confusion"]
    with pytest.raises(RuntimeError, match="different settings") as error:
        evaluate(NearestColour(), colour_dataset, progress=False, num_workers=0,
                 checkpoint=path, settings={"method": "other"})
    assert "nearest-colour -> other" in str(error.value)


def test_resume_compares_the_precision_computed_not_its_name(colour_dataset, tmp_path):
    """"auto" resumes a checkpoint of the dtype it resolves to, also one written before "auto"
    and `compile` existed; `compile` may change between the runs (records keep both)."""
    path = tmp_path / "run.pt"

    def run(inference, resolved=None):
        settings = {"method": "m", "inference": inference}
        settings.update({"resolved_precision": resolved} if resolved else {})
        return evaluate(NearestColour(), colour_dataset, progress=False, num_workers=0,
                        checkpoint=path, settings=settings)

    run({"precision": "fp32"})  # settings as recorded before "auto" and compile
    again = run({"precision": "auto", "compile": True}, resolved="fp32")
    assert again["resumed_images"] == len(colour_dataset)
    assert again["settings"]["inference"] == {"precision": "auto", "compile": True}
    assert again["settings"]["resolved_precision"] == "fp32"
    with pytest.raises(RuntimeError, match="different settings") as error:
        run({"precision": "auto", "compile": False}, resolved="bf16")
    assert "inference.precision: fp32 -> bf16" in str(error.value)


def test_limit_and_argument_checks(colour_dataset):
    result = evaluate(NearestColour(), colour_dataset, progress=False, num_workers=0, limit=2)
    assert result["num_images"] == 2
    with pytest.raises(ValueError, match="checkpoint_every"):
        evaluate(NearestColour(), colour_dataset, checkpoint_every=0)


class WrongShape:
    def predict(self, images):
        return torch.zeros(images.shape[-2:], dtype=torch.long)


def test_bad_predictor_and_unlabelled_dataset(colour_dataset, tmp_path):
    with pytest.raises(RuntimeError, match=r"shape \(1, H, W\)"):
        evaluate(WrongShape(), colour_dataset, progress=False, num_workers=0)
    (tmp_path / "plain").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "plain" / "x.png")
    (tmp_path / "plain" / "classes.txt").write_text("red\n")
    with pytest.raises(ValueError, match="no ground-truth masks"):
        evaluate(NearestColour(), load_dataset("folder", tmp_path / "plain"))


def test_save_results_writes_json_with_settings(colour_dataset, tmp_path):
    result = evaluate(NearestColour(), colour_dataset, progress=False, num_workers=0,
                      settings={"method": "nearest-colour", "model": None, "protocol": None})
    path = save_results(tmp_path / "out" / "result.json", result)
    saved = json.loads(path.read_text())
    assert saved["mIoU"] == pytest.approx(result["mIoU"])
    settings = saved["settings"]
    assert settings["method"] == "nearest-colour" and settings["dataset"] == "synthetic"
    assert settings["timestamp"] and settings["zegkit_version"]
    assert "dataset=synthetic" in format_table(saved)


# ---- with zegkit's own segmenter on a tiny random CLIP ------------------------------------
def test_tiny_clip_segmenter_end_to_end(tmp_path, tiny_clip_dir):
    dataset = load_dataset("synthetic", write_colour_dataset(tmp_path / "c", num=4, size=(20, 24)))
    result = evaluate_method(dataset, "sclip", tiny_clip_dir, progress=False, num_workers=0,
                             crop=32, stride=16)
    assert result["num_images"] == 4 and 0.0 <= result["mIoU"] <= 100.0
    assert sum(map(sum, result["confusion"])) == result["num_pixels"] > 0
    settings = result["settings"]
    assert settings["method"] == "sclip" and settings["protocol"] == "zegkit-synthetic"
    assert settings["inference"]["crop"] == 32 and settings["inference"]["short_side"] is None


def test_every_method_in_one_table(tmp_path, tiny_clip_dir):
    root = write_colour_dataset(tmp_path / "c", num=2, size=(16, 16))
    results = run_eval_all("synthetic", root, methods=["naive", "sclip"], model=tiny_clip_dir,
                           progress=False, num_workers=0, crop=32, stride=32,
                           output=tmp_path / "all.json")
    assert list(results) == ["naive", "sclip"]
    table = format_comparison(results)
    assert "naive" in table and "sclip" in table and "hIoU" in table
    saved = json.loads((tmp_path / "all.json").read_text())
    assert set(saved["results"]) == {"naive", "sclip"}
    assert saved["settings"]["dataset"] == "synthetic"


def test_run_eval_saves_json_and_checks_the_protocol(tmp_path, tiny_clip_dir):
    root = write_colour_dataset(tmp_path / "c", num=2, size=(16, 16))
    result = run_eval("synthetic", root, method="naive", model=tiny_clip_dir, progress=False,
                      num_workers=0, crop=32, stride=32, output=tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["confusion"] == result["confusion"] and saved["settings"]["method"] == "naive"
    assert saved["settings"]["split"] == "val"
    with pytest.raises(ValueError, match="is for dataset 'voc21'"):
        run_eval("synthetic", root, method="naive", model=tiny_clip_dir, protocol="sclip-voc21")
    with pytest.raises(ValueError, match="Unknown methods"):
        run_eval_all("synthetic", root, methods=["nope"])
