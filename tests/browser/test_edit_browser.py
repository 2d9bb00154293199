"""The Input image in a real browser (Debian's Chromium, headless): upload an image, paint over part of it, generate;
the PNG is an inpainting of the input's size and keeps the input far from the paint. ``python app.py`` runs as a
subprocess on a tiny random pipeline; screenshots go to ``test-artifacts/``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from fixtures import free_port

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture(scope="module")
def served(tiny_pipeline, tmp_path_factory):
    from PIL import Image, ImageDraw

    tmp = tmp_path_factory.mktemp("browser_edit")
    photo = Image.new("RGB", (256, 256), (230, 230, 230))
    ImageDraw.Draw(photo).ellipse((40, 40, 210, 210), fill=(40, 60, 220))
    photo.save(tmp / "photo.png")
    port = free_port()
    cmd = [sys.executable, "app.py", "--model", str(tiny_pipeline), "--alpha-model", "none", "--device", "cpu",
           "--port", str(port), "--outputs", str(tmp / "outputs")]
    log = open(tmp / "app.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"app did not start:\n{(tmp / 'app.log').read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield url, tmp
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def test_upload_paint_and_inpaint(served):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from pixsigma.io import read_params

    url, tmp = served
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(url)
        page.wait_for_selector("#generate", timeout=30_000)
        page.get_by_text("Input image (image-to-image, inpainting)").first.click()
        page.locator("#init-image").first.scroll_into_view_if_needed()
        page.wait_for_timeout(500)  # the editor's canvas is set up once it is shown
        page.locator("#init-image input[type=file]").first.set_input_files(str(tmp / "photo.png"))
        canvas = page.locator("#init-image canvas").first
        canvas.wait_for(timeout=30_000)
        page.wait_for_function("document.querySelector('#edit-size').innerText.includes('Output 256×256 px')",
                               timeout=30_000)  # the upload reached the server
        page.locator("#init-image button[aria-label='Brush']").first.click()
        box = canvas.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx - 15, cy)
        page.mouse.down()
        for dx in range(-15, 16, 3):
            page.mouse.move(cx + dx, cy + dx / 3)
        page.mouse.up()
        page.wait_for_timeout(500)
        page.fill("#prompt textarea", "a red square")
        page.fill("input[aria-label='number input for Steps']", "2")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#stats').innerText.includes('peak memory')", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "app-edit.png"), full_page=True)
        browser.close()
    pngs = sorted((tmp / "outputs").glob("*.png"))
    assert pngs and read_params(pngs[-1])["edit"] == {"mode": "inpaint", "strength": 0.8}
    out = np.asarray(Image.open(pngs[-1]).convert("RGB"))
    photo = np.asarray(Image.open(tmp / "photo.png").convert("RGB"))
    assert out.shape == photo.shape and (out == photo).all(axis=-1).mean() > 0.5  # most of it is kept exactly
    assert not np.array_equal(out, photo)  # what was painted was repainted
