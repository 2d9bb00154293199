"""The Input image in a real browser (Debian's Chromium, headless): upload an image, paint over part of it, generate;
the PNG is an inpainting of the input's size and keeps the input far from the paint. ``python app.py`` runs as a
subprocess on a tiny random pipeline; screenshots go to ``test-artifacts/``."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures import ARTIFACTS, NEEDS_CHROMIUM, served_app

pytestmark = NEEDS_CHROMIUM


@pytest.fixture(scope="module")
def served(tiny_pipeline, tmp_path_factory):
    from PIL import Image, ImageDraw

    tmp = tmp_path_factory.mktemp("browser_edit")
    photo = Image.new("RGB", (256, 256), (230, 230, 230))
    ImageDraw.Draw(photo).ellipse((40, 40, 210, 210), fill=(40, 60, 220))
    photo.save(tmp / "photo.png")
    args = ["--model", str(tiny_pipeline), "--alpha-model", "none", "--device", "cpu",
            "--outputs", str(tmp / "outputs")]
    with served_app(args, tmp) as url:
        yield url, tmp


def test_upload_paint_and_inpaint(served, browser):
    from PIL import Image

    from pixsigma.io import read_params

    url, tmp = served
    ARTIFACTS.mkdir(exist_ok=True)
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
                           timeout=60_000)  # the upload reached the server (slow on a loaded machine)
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
    pngs = sorted((tmp / "outputs").glob("*.png"))
    assert pngs and read_params(pngs[-1])["edit"] == {"mode": "inpaint", "strength": 0.8}
    out = np.asarray(Image.open(pngs[-1]).convert("RGB"))
    photo = np.asarray(Image.open(tmp / "photo.png").convert("RGB"))
    assert out.shape == photo.shape and (out == photo).all(axis=-1).mean() > 0.5  # most of it is kept exactly
    assert not np.array_equal(out, photo)  # what was painted was repainted
