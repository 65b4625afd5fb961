"""`zegkit serve` end to end, in a real headless Chromium driven by Playwright.

Starts the server as `python -m zegkit serve` on a free localhost port with the shipped tiny model,
uploads a shipped example, types classes, segments with two methods side by side, and checks the
overlay, the legend, the hover read-out, a class toggle, a download (a valid palette PNG) and the
error shown for a non-image. Screenshots go to $ZEGKIT_SCREENSHOTS (default: a pytest temp dir).

Needs the web-test extra (`pip install -e ".[web-test]"`: Gradio and Playwright) and Debian's
`chromium` (`apt-get install chromium`); Playwright's own browser download is not used. Without
them the test skips and says which is missing. `.ci/run` installs both.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason='the web extra is not installed: pip install -e ".[web]"')
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason='Playwright is not installed: pip install -e ".[web-test]"'
)
CHROMIUM = os.environ.get("ZEGKIT_CHROMIUM") or shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip(
        "no Chromium: install Debian's package (apt-get install chromium) or set ZEGKIT_CHROMIUM",
        allow_module_level=True,
    )

from PIL import Image  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "zegkit" / "assets" / "examples"
CLASSES = ["sky", "sand", "brick", "star", "disk", "crescent", "arrow"]
SERVER_START_S = 180  # the tiny model loads lazily; this covers Python + Gradio start-up
SEGMENT_TIMEOUT_MS = 300_000  # first request: model load + text embeddings + two methods, on CPU
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-out")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "zegkit",
        "serve",
        "--model",
        "zegkit/tiny-synthetic",
        "--port",
        str(port),
        "--out",
        str(out),
    ]
    log = open(out.parent / "server.log", "w")  # noqa: SIM115 (closed in the teardown)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while True:
        if process.poll() is not None:
            log.close()
            pytest.fail(f"zegkit serve exited: {(out.parent / 'server.log').read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"zegkit serve did not answer within {SERVER_START_S} s")
        time.sleep(0.5)
    yield {"url": url, "out": out}
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("ZEGKIT_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {path}")
    return path


@pytest.fixture()
def page(server):
    with playwright_api.sync_playwright() as driver:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = driver.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        context = browser.new_context(viewport={"width": 1600, "height": 1100})
        tab = context.new_page()
        tab.set_default_timeout(60_000)
        tab.goto(server["url"])
        tab.wait_for_selector("#zk-run")
        yield tab
        context.close()
        browser.close()


def _choose(page, elem_id: str, value: str) -> None:
    """Pick `value` in a Gradio dropdown (its options open in a list outside the component)."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=value, exact=True).click()
    assert page.locator(f"#{elem_id} input").input_value() == value


def _upload(page, path: Path) -> None:
    page.locator("#zk-image input[type=file]").set_input_files(str(path))


def test_segment_compare_hover_toggle_download(server, page, screenshots):
    _upload(page, EXAMPLES / "scene.png")
    page.locator("#zk-classes textarea").fill(", ".join(CLASSES))
    _choose(page, "zk-method-b", "maskclip")
    page.screenshot(path=str(screenshots / "1_ready.png"), full_page=True)

    clicked = time.perf_counter()
    page.locator("#zk-run").click()
    page.wait_for_selector("#zk-result-b img.zk-overlay", timeout=SEGMENT_TIMEOUT_MS)
    print(f"Segment click -> overlays (first request): {time.perf_counter() - clicked:.1f} s")
    page.screenshot(path=str(screenshots / "2_result.png"), full_page=True)

    # The overlay is a PNG of the input's size; the legend lists classes of the vocabulary.
    assert "Done" in page.locator("#zk-status").inner_text()
    overlay = page.locator("#zk-result-a img.zk-overlay")
    size = overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size == [448, 448]
    legend = page.locator("#zk-result-a .zk-legend .zk-name").all_inner_texts()
    assert legend and set(legend) <= set(CLASSES)
    areas = page.locator("#zk-result-a .zk-legend .zk-area").all_inner_texts()
    assert all(re.fullmatch(r"\d+\.\d%|<0\.1%", area) for area in areas)
    assert page.locator("#zk-result-b .zk-result").get_attribute("data-method") == "maskclip"

    # Hover: the class and probability under the pointer.
    overlay.scroll_into_view_if_needed()
    box = overlay.bounding_box()
    for step in range(2):  # the first move starts decoding the hover map; the tip follows
        page.mouse.move(box["x"] + box["width"] * 0.5 + step, box["y"] + box["height"] * 0.8)
    tip = page.locator("#zk-result-a .zk-tip")
    tip.wait_for(state="visible")
    name, probability = re.fullmatch(r"(.+): p = (\d\.\d\d)", tip.inner_text()).groups()
    assert name in CLASSES and 0.0 <= float(probability) <= 1.0
    page.screenshot(path=str(screenshots / "3_hover.png"), full_page=True)

    # Toggle off the largest class: its legend row greys out and the overlay changes.
    before = overlay.get_attribute("src")
    page.locator("#zk-shown").get_by_role("checkbox", name=legend[0], exact=True).click()
    page.wait_for_selector("#zk-result-a .zk-legend-row.zk-hidden")
    assert page.locator("#zk-result-a img.zk-overlay").get_attribute("src") != before
    page.screenshot(path=str(screenshots / "4_toggled.png"), full_page=True)

    # Downloads: the CLI's three files per method; the label PNG is a valid palette PNG.
    links = page.locator("#zk-downloads a[href]")
    links.first.wait_for()
    hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
    names = sorted(href.rsplit("/", 1)[-1] for href in hrefs)
    expected = [
        f"scene_{m}{kind}"
        for m in ("sclip", "maskclip")
        for kind in ("_labels.png", "_overlay.png", ".json")
    ]
    assert names == sorted(expected)
    href = next(h for h in hrefs if h.endswith("scene_sclip_labels.png"))
    response = page.request.get(href)
    assert response.ok
    body = response.body()
    assert body.startswith(PNG_MAGIC)
    labels = Image.open(io.BytesIO(body))
    assert labels.mode == "P" and labels.size == (448, 448)

    # Nothing outside the output folder is served.
    outside = page.request.get(f"{server['url']}/gradio_api/file={Path(__file__).resolve()}")
    assert not outside.ok


def _run_expecting_error(page, classes: str, screenshot) -> str:
    """Enter `classes`, press Segment, wait for the page's error message; returns its text."""
    page.locator("#zk-classes textarea").fill(classes)
    page.locator("#zk-run").click()
    error = page.locator("#zk-status .zk-error")
    error.wait_for(timeout=SEGMENT_TIMEOUT_MS)
    page.screenshot(path=str(screenshot), full_page=True)
    return error.inner_text()


def test_non_image_upload_shows_message(page, screenshots, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image\n")
    _upload(page, fake)
    error = _run_expecting_error(page, "sky, sand", screenshots / "5_not_an_image.png")
    assert "not a readable image" in error
    assert "Traceback" not in page.content()


def test_empty_vocabulary_shows_message(page, screenshots):
    _upload(page, EXAMPLES / "scene2.png")
    error = _run_expecting_error(page, " , ", screenshots / "6_empty_vocabulary.png")
    assert "vocabulary is empty" in error
