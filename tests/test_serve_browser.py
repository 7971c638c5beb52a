"""The page at ``/`` in a real headless Chromium: ``omniseg serve`` runs as a subprocess on a
free loopback port, the page segments an uploaded CamVid frame, and its legend, hover,
toggle, download and error display are checked against the HTTP API's own answers.

Needs Debian's ``chromium`` (``apt-get install chromium``; another binary can be named with
``OMNISEG_CHROMIUM``) and Playwright for Python (its own browser download is not used).
``OMNISEG_SCREENSHOT_DIR`` keeps the screenshots there, to be looked at.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed: pip install playwright")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("OMNISEG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"no Chromium at {CHROMIUM}: apt-get install chromium (or set OMNISEG_CHROMIUM)"),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _serving(models: list[str], log: Path):
    """``omniseg serve`` with ``models`` (none: the bundled default model) on a free loopback
    port, as a subprocess; yields its base URL once ``/healthz`` answers."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "omniseg", "serve", "--host", "127.0.0.1", "--port", str(port)]
    for model in models:
        command += ["--model", model]
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"omniseg serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as answer:
                    if json.load(answer)["status"] == "ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"omniseg serve did not answer within 120 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``omniseg serve`` with the bundled default model; yields its base URL."""
    with _serving([], tmp_path_factory.mktemp("serve") / "server.log") as url:
        yield url


@pytest.fixture
def page(tmp_path):
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh user-data dir
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            accept_downloads=True,
            viewport={"width": 1500, "height": 720},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("OMNISEG_SCREENSHOT_DIR", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def _overlay_pixels(page) -> str:
    return page.eval_on_selector("#overlay", "canvas => canvas.toDataURL('image/png')")


def _legend_rows(page) -> list[dict]:
    """The legend as the page shows it; areas are counted from the page's own decoding of the
    RLE masks."""
    return page.eval_on_selector_all("#legend tbody tr", """rows => rows.map(r => ({
        id: Number(r.dataset.segmentId), area: Number(r.dataset.area),
        label: r.querySelector('.label').textContent, score: r.querySelector('.score').textContent}))""")


def _expected_rows(answer: dict) -> list[dict]:
    """The legend rows an API answer should give."""
    return [
        {"id": s["id"], "area": s["area"], "label": s["label"], "score": f"{s['score']:.2f}"}
        for s in answer["segments"]
    ]


def test_page_segments_an_uploaded_street_photo(server, page, street_photo_path, tmp_path):
    page.goto(server + "/")
    page.wait_for_selector("#model option", state="attached")
    assert page.input_value("#model") == "default"
    page.set_input_files("#file", str(street_photo_path))
    page.wait_for_selector("#legend tbody tr[data-segment-id]", timeout=120_000)
    page.wait_for_selector("#status", state="hidden")
    assert page.is_hidden("#error")

    # The API's answer for the same image and settings, asked by the browser's own client.
    params = {"task": page.input_value("#task"), "threshold": page.input_value("#threshold")}
    assert params == {"task": "auto", "threshold": "0.9"}
    reply = page.request.post(server + "/v1/segment", multipart={
        "image": {"name": street_photo_path.name, "mimeType": "image/png", "buffer": street_photo_path.read_bytes()},
        **params,
    })
    assert reply.ok
    expected = reply.json()
    assert len(expected["segments"]) >= 3 and expected["task"] == "panoptic"

    assert _legend_rows(page) == _expected_rows(expected)
    assert page.eval_on_selector("#original", "img => img.naturalWidth") == 480
    assert page.eval_on_selector("#overlay", "c => [c.width, c.height]") == [480, 360]
    _screenshot(page, tmp_path, "page-segmented.png")

    # Hover: the row is marked and the picture highlights its segment; leaving restores it.
    plain = _overlay_pixels(page)
    row = page.locator("#legend tbody tr").nth(0)
    row.hover()
    assert "active" in row.get_attribute("class")
    highlighted = _overlay_pixels(page)
    assert highlighted != plain
    _screenshot(page, tmp_path, "page-hover.png")
    page.mouse.move(5, 5)
    assert _overlay_pixels(page) == plain

    # Click: the segment is hidden at once, and shown again by a second click.
    row.click()
    assert "off" in row.get_attribute("class")
    assert _overlay_pixels(page) != highlighted
    page.mouse.move(5, 5)
    assert _overlay_pixels(page) != plain
    row.click()
    assert "off" not in row.get_attribute("class")
    assert _overlay_pixels(page) == highlighted
    page.mouse.move(5, 5)
    assert _overlay_pixels(page) == plain

    # Downloads: the JSON held by the page, and the label map from the server.
    with page.expect_download() as download:
        page.click("#download-json")
    saved = tmp_path / "download.json"
    download.value.save_as(saved)
    assert download.value.suggested_filename == street_photo_path.stem + ".json"
    assert json.loads(saved.read_text())["segments"] == expected["segments"]
    with page.expect_download() as download:
        page.click("#download-labels")
    assert download.value.suggested_filename == street_photo_path.stem + "_labels.png"
    labels = tmp_path / "labels.png"
    download.value.save_as(labels)
    from PIL import Image

    assert Image.open(labels).size == (480, 360)


def test_page_shows_the_servers_error_message(server, page, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("this is not a PNG\n")
    page.goto(server + "/")
    page.wait_for_selector("#model option", state="attached")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error", state="visible", timeout=60_000)
    message = page.text_content("#error")
    assert message.startswith("400: broken.png: not an image")
    _screenshot(page, tmp_path, "page-error.png")


def test_page_shows_a_segment_anything_models_masks(page, street_photo_path, tmp_path):
    """With a Segment Anything model picked, the page asks POST /v1/mask-generation (the
    other route refuses such models) and shows its masks, threshold named as the minimum
    predicted IoU; the overlay download comes from the same route."""
    from reference_sam import TINY_SAM_CONFIGS, build_reference_sam

    sam_dir = build_reference_sam(tmp_path / "sam", perturb=0.3, **TINY_SAM_CONFIGS["deep"])
    default_model = str(REPO / "omniseg" / "assets" / "default_model")
    with _serving([default_model, str(sam_dir)], tmp_path / "server.log") as server:
        page.goto(server + "/")
        page.wait_for_selector("#model option", state="attached")
        assert page.text_content("#threshold-name") == "Threshold"
        page.select_option("#model", str(sam_dir))
        assert page.text_content("#threshold-name") == "Min. IoU"
        assert page.eval_on_selector_all("#task option", "options => options.map(o => o.value)") == ["auto", "everything"]
        page.eval_on_selector("#threshold", "e => { e.value = '0.5'; e.dispatchEvent(new Event('input')); }")
        page.set_input_files("#file", str(street_photo_path))
        page.wait_for_selector("#legend tbody tr[data-segment-id]", timeout=120_000)
        page.wait_for_selector("#status", state="hidden")
        assert page.is_hidden("#error")

        reply = page.request.post(server + "/v1/mask-generation", multipart={
            "image": {"name": street_photo_path.name, "mimeType": "image/png", "buffer": street_photo_path.read_bytes()},
            "model": str(sam_dir), "task": "auto", "threshold": "0.5",
        })
        assert reply.ok
        expected = reply.json()
        assert len(expected["segments"]) >= 1 and expected["task"] == "everything"
        assert _legend_rows(page) == _expected_rows(expected)
        assert page.text_content("#summary").startswith(f"{len(expected['segments'])} everything segment")
        _screenshot(page, tmp_path, "page-mask-generation.png")

        with page.expect_download() as download:
            page.click("#download-overlay")
        assert download.value.suggested_filename == street_photo_path.stem + "_overlay.png"
        saved = tmp_path / "overlay.png"
        download.value.save_as(saved)
        overlay = page.request.post(server + "/v1/mask-generation", multipart={
            "image": {"name": street_photo_path.name, "mimeType": "image/png", "buffer": street_photo_path.read_bytes()},
            "model": str(sam_dir), "task": "auto", "threshold": "0.5", "format": "overlay",
        })
        assert saved.read_bytes() == overlay.body()
