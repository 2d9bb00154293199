"""The Control input in a real browser (Debian's Chromium, headless): upload a control image, see its map beside
the result, generate with it; the PNG carries the control parameters. ``python app.py --controlnet`` runs as a
subprocess on a tiny random pipeline; screenshots go to ``test-artifacts/``."""

from __future__ import annotations

import pytest
from fixtures import ARTIFACTS, NEEDS_CHROMIUM, served_app

pytestmark = NEEDS_CHROMIUM


@pytest.fixture(scope="module")
def served(tiny_pipeline, tmp_path_factory):
    import torch
    from PIL import Image, ImageDraw

    from pixsigma.controlnet_weights import save_controlnet
    from pixsigma.model.controlnet import ControlNet
    from pixsigma.weights import load_dit

    tmp = tmp_path_factory.mktemp("browser_control")
    net = ControlNet.from_base(load_dit(tiny_pipeline))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02)
    save_controlnet(net, tmp / "controlnet")
    sketch = Image.new("RGB", (200, 120), "white")  # another aspect ratio than the 1:1 bucket: cropped
    ImageDraw.Draw(sketch).rectangle((60, 20, 140, 100), outline="black", width=4)
    sketch.save(tmp / "sketch.png")
    args = ["--model", str(tiny_pipeline), "--alpha-model", "none", "--device", "cpu",
            "--controlnet", str(tmp / "controlnet"), "--outputs", str(tmp / "outputs")]
    with served_app(args, tmp) as url:
        yield url, tmp


def test_control_input_upload_map_and_generate(served, browser):

    from pixsigma.io import read_params

    url, tmp = served
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    page.goto(url)
    page.wait_for_selector("#generate", timeout=30_000)
    page.get_by_text("Control (ControlNet)").first.click()
    page.locator("#control-image").first.scroll_into_view_if_needed()
    page.wait_for_timeout(500)  # the opened accordion's inputs are live once shown
    page.locator("#control-image input[type=file]").first.set_input_files(str(tmp / "sketch.png"))
    page.wait_for_selector("#control-map img", timeout=90_000)  # the preprocessed map (slow on a loaded CPU)
    page.fill("#prompt textarea", "a red square")
    page.fill("input[aria-label='number input for Steps']", "2")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#stats').innerText.includes('peak memory')", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "app-control.png"), full_page=True)
    pngs = sorted((tmp / "outputs").glob("*.png"))
    assert pngs and read_params(pngs[-1])["control"] == {"type": "canny", "scale": 1.0}
