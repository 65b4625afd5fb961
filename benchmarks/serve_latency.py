"""Time from clicking "Segment" in `zegkit serve` to the overlay on the page, in headless Chromium.

Two models: the shipped tiny CLIP and a random-weight ViT-B/16 saved in Hugging Face's format (speed
does not depend on the weights). The image is the shipped example scene resized to 597 x 448 (the
default protocol: short side 448, 15 crops of 224). Per model: the first request (model load,
text embeddings, image) and the median of later requests with the same classes (image only).

    python benchmarks/serve_latency.py [--repeats 3] [--json out.json]

Needs the web-test extra and Debian's chromium, as tests/test_serve_e2e.py does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from common import VIT_SHAPES, random_backbone
from PIL import Image
from playwright.sync_api import sync_playwright

from zegkit.hardware import native_bf16
from zegkit.io import atomic_write

EXAMPLE = Path(__file__).resolve().parents[1] / "src" / "zegkit" / "assets" / "examples"
IMAGE_SIZE = (597, 448)  # (width, height)
CLASSES = "sky, sand, brick, star, disk, crescent, arrow"
METHOD = "sclip"
START_TIMEOUT_S = 180
REQUEST_TIMEOUT_MS = 600_000


@contextlib.contextmanager
def running_server(model: str, out: Path) -> Iterator[str]:
    """`zegkit serve --model MODEL` on a free localhost port; yields its URL once it answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "zegkit", "serve", "--model", model,
               "--port", str(port), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`{' '.join(command)}` did not start")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def click_to_overlay(url: str, image: Path, repeats: int) -> list[float]:
    """Seconds from each click on Segment to a new overlay image (same image and classes)."""
    chromium = os.environ.get("ZEGKIT_CHROMIUM") or shutil.which("chromium")
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, headless=True,
                                         args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1100})
        page.goto(url)
        page.wait_for_selector("#zk-run")
        page.locator("#zk-image input[type=file]").set_input_files(str(image))
        page.locator("#zk-classes textarea").fill(CLASSES)
        times = []
        for _ in range(repeats):
            # Mark the current overlay; the next one is the first overlay without the mark.
            page.evaluate("document.querySelectorAll('img.zk-overlay')"
                          ".forEach(img => img.dataset.stale = '1')")
            clicked = time.perf_counter()
            page.locator("#zk-run").click()
            page.wait_for_selector("#zk-result-a img.zk-overlay:not([data-stale])",
                                   timeout=REQUEST_TIMEOUT_MS)
            times.append(time.perf_counter() - clicked)
            page.wait_for_timeout(500)
        browser.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="requests per model (first + n-1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = tmp / "scene_597x448.png"
        Image.open(EXAMPLE / "scene.png").convert("RGB").resize(IMAGE_SIZE).save(image)
        vit_b = tmp / "random-vit-b-16"
        backbone = random_backbone(*VIT_SHAPES["ViT-B/16"])
        backbone.model.save_pretrained(vit_b)
        backbone.tokenizer.save_pretrained(vit_b)
        rows = {}
        for name, model in (("zegkit/tiny-synthetic", "zegkit/tiny-synthetic"),
                            ("random ViT-B/16", str(vit_b))):
            with running_server(model, tmp / "out") as url:
                times = click_to_overlay(url, image, args.repeats)
            rows[name] = {"first_s": round(times[0], 2),
                          "later_median_s": round(statistics.median(times[1:]), 2)
                          if len(times) > 1 else None}
            print(f"{name:24s} first {times[0]:6.2f} s   later {rows[name]['later_median_s']} s")
    record = {"image": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}", "method": METHOD,
              "classes": CLASSES, "precision": "fp32 (serve default)",
              "native_bf16": native_bf16("cpu"), "cpu_count": os.cpu_count(), "results": rows}
    if args.json:
        with atomic_write(args.json, "w") as handle:
            handle.write(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
