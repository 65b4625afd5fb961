"""Sharded evaluation equals single-process evaluation; a killed run resumes to the same matrix.

Both tests run real processes, forked from this one (so they start without re-importing torch):
two ranks joining a gloo process group through the environment variables torchrun sets, and an
evaluation killed with SIGKILL right after its first checkpoint. The same check through
`torchrun --standalone --nproc-per-node 2` works too but costs two interpreter start-ups.
"""

import importlib.util
import json
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from zegkit.data.datasets import load_dataset
from zegkit.evaluate import evaluate, init_distributed

NUM_IMAGES = 24
TIMEOUT_S = 60
SETTINGS = {"method": "nearest-colour"}

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs fork (Linux)"
)


def _load_helpers():
    """NearestColour and write_colour_dataset from test_evaluate.py, whatever the import mode."""
    path = Path(__file__).with_name("test_evaluate.py")
    spec = importlib.util.spec_from_file_location("zegkit_eval_test_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helpers = _load_helpers()


class RecordingColour(helpers.NearestColour):
    """The nearest-colour segmenter, optionally slow, remembering which images it predicted."""

    def __init__(self, delay=0.0):
        super().__init__()
        self.delay, self.means = delay, []

    def predict(self, images):
        time.sleep(self.delay)
        self.means.append(round(float(images.mean()), 6))
        return super().predict(images)


def run(data, checkpoint=None, every=50, delay=0.0, workers=0):
    predictor = RecordingColour(delay)
    result = evaluate(predictor, load_dataset("synthetic", data), progress=False,
                      num_workers=workers, checkpoint=checkpoint, checkpoint_every=every,
                      settings=SETTINGS)
    return result, predictor


@pytest.fixture
def data(tmp_path):
    return helpers.write_colour_dataset(tmp_path / "data", num=NUM_IMAGES, size=(10, 14))


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank, world, port, data, checkpoint, out):
    """One rank, set up as torchrun would: evaluate, then evaluate again (resuming)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    runs = []
    for _ in range(2):
        result, predictor = run(data, checkpoint, every=5, workers=1)
        runs.append({key: result[key] for key in
                     ("confusion", "num_images", "resumed_images", "world_size")})
        runs[-1]["means"] = predictor.means
    (out / f"rank{context.rank}.json").write_text(json.dumps(runs))
    dist.destroy_process_group()


def _fork():
    return multiprocessing.get_context("fork")


def test_two_gloo_processes_give_the_single_process_matrix(data, tmp_path):
    reference, predictor = run(data)
    checkpoint, port = tmp_path / "ckpt" / "sharded.pt", _free_port()
    ranks = [_fork().Process(target=_rank_main, args=(rank, 2, port, data, checkpoint, tmp_path))
             for rank in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(TIMEOUT_S)
    assert [process.exitcode for process in ranks] == [0, 0]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for first, second in results:
        assert first["confusion"] == reference["confusion"]  # all-reduced: identical on ranks
        assert first["world_size"] == 2 and first["num_images"] == NUM_IMAGES
        assert first["resumed_images"] == 0
        assert second["confusion"] == reference["confusion"]  # resumed from the checkpoints
        assert second["resumed_images"] == NUM_IMAGES and second["means"] == []
    # rank r saw images r, r + 2, ...: together every image exactly once
    shard0, shard1 = results[0][0]["means"], results[1][0]["means"]
    assert shard0 == predictor.means[0::2] and shard1 == predictor.means[1::2]
    assert sorted(path.name for path in checkpoint.parent.iterdir()) == [
        "sharded.rank0-of-2.pt", "sharded.rank1-of-2.pt"]


def _slow_run(data, checkpoint):
    torch.set_num_threads(1)
    run(data, checkpoint, every=3, delay=0.05)


def test_killed_run_resumes_to_the_uninterrupted_matrix(data, tmp_path):
    reference, _ = run(data)
    checkpoint = tmp_path / "killed.pt"
    process = _fork().Process(target=_slow_run, args=(data, checkpoint))
    process.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not checkpoint.exists() and process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.join(TIMEOUT_S)
    assert process.exitcode == -signal.SIGKILL, "the run ended before it could be killed"
    state = torch.load(checkpoint, weights_only=True)
    assert 0 < len(state["done"]) < NUM_IMAGES  # really interrupted midway

    resumed, predictor = run(data, checkpoint, every=3)
    assert resumed["resumed_images"] == len(state["done"])
    assert len(predictor.means) == NUM_IMAGES - len(state["done"])
    assert resumed["confusion"] == reference["confusion"]
    assert resumed["mIoU"] == reference["mIoU"] and resumed["num_images"] == NUM_IMAGES
