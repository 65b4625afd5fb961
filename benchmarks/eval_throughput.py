"""Evaluation images/s over loader workers x torch threads, and where the time goes (in the model,
waiting for data): `zegkit eval` of the shipped tiny CLIP on synthetic 224-px scenes (one crop
each), each setting in a fresh process (threads are per process), the settings interleaved round
by round so a neighbour's load spreads over all of them. A "default" row runs with neither
flag: the thread and worker policy of `zegkit.hardware.eval_thread_plan`.

    python benchmarks/eval_throughput.py [--scenes 100] [--workers 0 1 2] [--threads 1 2]
        [--repeats 3] [--precision fp32] [--busy] [--json out.json]

--busy starts one neighbour for the measurement, a single-threaded loop of 1024 x 1024 matmuls
(a busy process such as a training run on one core), and stops it after. Each row records the
1-minute load average before its runs: it shows other processes' load too.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from zegkit.bench import machine
from zegkit.data.synthetic import write_dataset
from zegkit.io import save_json_atomic

MODEL = "zegkit/tiny-synthetic"
SCENE_SIZE = 224  # one 224 crop per scene under the synthetic protocol
NEIGHBOUR = ("import torch; torch.set_num_threads(1); x = torch.randn(1024, 1024)\n"
             "while True: x @ x")


@contextlib.contextmanager
def busy_neighbour(busy: bool) -> Iterator[None]:
    """A single-threaded matmul loop in another process while inside, if `busy`."""
    if not busy:
        yield
        return
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR])
    try:
        yield
    finally:
        neighbour.terminate()
        neighbour.wait()


def run_eval(root: Path, out: Path, method: str, precision: str, workers: int | None,
             threads: int | None) -> dict:
    """One `zegkit eval` in a fresh process; its result's "throughput" entry."""
    flags = [] if workers is None else ["--num-workers", str(workers)]
    flags += [] if threads is None else ["--threads", str(threads)]
    command = [sys.executable, "-m", "zegkit", "eval", "--dataset", "synthetic",
               "--data-root", str(root), "--model", MODEL, "--method", method,
               "--precision", precision, "--output", str(out), *flags]
    done = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed (exit status {done.returncode}; "
                         f"negative: killed by that signal):\n{done.stderr[-2000:]}")
    return json.loads(out.read_text())["throughput"]


def measure(root: Path, method: str, precision: str,
            settings: list[tuple[int | None, int | None]], repeats: int,
            scratch: Path) -> list[dict]:
    """Per setting: median images/s over `repeats` rounds, its range, and the fractions."""
    runs: dict[tuple, list[dict]] = {setting: [] for setting in settings}
    loads: dict[tuple, list[float]] = {setting: [] for setting in settings}
    for _ in range(repeats):
        for setting in settings:
            loads[setting].append(os.getloadavg()[0])
            runs[setting].append(run_eval(root, scratch / "result.json", method, precision,
                                          *setting))
    rows = []
    for (workers, threads), measured in runs.items():
        rates = [run["images_per_second"] for run in measured]
        rows.append({
            "setting": "default" if workers is None and threads is None else "given",
            "num_workers": measured[0]["num_workers"],
            "torch_threads": measured[0]["torch_threads"],
            "images_per_second": statistics.median(rates),
            "images_per_second_range": [min(rates), max(rates)],
            "model_fraction": statistics.median(run["model_fraction"] for run in measured),
            "data_wait_fraction": statistics.median(run["data_wait_fraction"]
                                                    for run in measured),
            "load_average_1min": loads[(workers, threads)],
            "runs": measured,
        })
    return rows


HEADER = (f"{'setting':<9}{'workers':>8}{'threads':>8}{'images/s':>10}{'range':>14}"
          f"{'model':>7}{'data':>6}{'load':>6}")


def format_row(row: dict) -> str:
    low, high = row["images_per_second_range"]
    return (f"{row['setting']:<9}{row['num_workers']:>8}{row['torch_threads']:>8}"
            f"{row['images_per_second']:>10.1f}{f'{low:.1f}-{high:.1f}':>14}"
            f"{row['model_fraction']:>7.0%}{row['data_wait_fraction']:>6.0%}"
            f"{statistics.mean(row['load_average_1min']):>6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=100, help="scenes (default: 100)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="synthetic scenes to read (default: --scenes written to a temp dir)")
    parser.add_argument("--method", default="sclip", help="method (default: sclip)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="compute precision, the same on every machine (default: fp32)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="loader workers to try (default: 0 1 2)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch threads to try (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default: 3)")
    parser.add_argument("--busy", action="store_true",
                        help="run beside a single-threaded busy neighbour (default: off)")
    parser.add_argument("--json", type=Path, default=None, help="also save the table here")
    args = parser.parse_args()
    settings = [(None, None), *itertools.product(args.workers, args.threads)]
    with tempfile.TemporaryDirectory() as scratch:
        root = args.data_root or write_dataset(Path(scratch) / "scenes", args.scenes,
                                               size=SCENE_SIZE)
        with busy_neighbour(args.busy):
            rows = measure(root, args.method, args.precision, settings, args.repeats,
                           Path(scratch))
    record = {"machine": machine(), "model": MODEL, "method": args.method,
              "precision": args.precision,
              "scenes": args.scenes if args.data_root is None else str(args.data_root),
              "busy_neighbour": args.busy, "repeats": args.repeats, "rows": rows}
    print(f"{record['machine']['cpu']}, {record['machine']['usable_cores']} usable cores; "
          f"{'beside a busy neighbour' if args.busy else 'no neighbour started'}")
    print(HEADER)
    print("\n".join(format_row(row) for row in rows))
    if args.json is not None:
        save_json_atomic(record, args.json)
        print(f"Saved {args.json}")


if __name__ == "__main__":
    main()
