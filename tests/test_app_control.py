"""The app's Control input and "Σ vs Σ + ControlNet" panel, through gradio_client, on a tiny real pipeline with a
ControlNet trained away from zero."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures import app_client
from PIL import Image, ImageDraw

from pixsigma.io import read_params
from pixsigma.model.controlnet import ControlNet
from pixsigma_ui.control_panel import make_compare_control_fn, preview_map, read_control_image
from pixsigma_ui.engine import MAIN, AppEngine
from pixsigma_ui.generate_tab import make_generate_fn


def _sketch() -> Image.Image:
    im = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(im).ellipse((20, 10, 70, 55), outline="black", width=3)
    return im


@pytest.fixture(scope="module")
def engine(pipe):
    net = ControlNet.from_base(pipe.transformer)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pipe.controlnet = net.eval()
    yield AppEngine({MAIN: pipe}, {MAIN: "tiny-sigma"})
    pipe.controlnet = None


@pytest.fixture(scope="module")
def client(engine, tmp_path_factory):
    with app_client(engine, tmp_path_factory.mktemp("outputs")) as c:
        yield c


def _editor_value(path) -> dict:
    from gradio_client import handle_file

    return {"background": handle_file(str(path)), "layers": [], "composite": handle_file(str(path))}


def test_api_generate_with_a_control_image(client, engine, tmp_path):
    sketch = tmp_path / "sketch.png"
    _sketch().save(sketch)
    args = dict(prompt="a red circle", resolution=256, steps=2, seed=3, randomize_seed=False, expand_prompt=False)
    _, _, files, _ = client.predict(**args, control_image=_editor_value(sketch), control_type="canny",
                                    control_scale=1.5, api_name="/generate")
    params = read_params(files[0])
    assert params["control"] == {"type": "canny", "scale": 1.5}
    request = engine.make_request("a red circle", resolution=256, steps=2, seed=3, expand_prompt=False)
    from dataclasses import replace

    want = engine.run(replace(request, control_image=_sketch(), control_type="canny", control_scale=1.5))
    np.testing.assert_array_equal(np.asarray(Image.open(files[0]).convert("RGB")), np.asarray(want.result.images[0]))
    plain = engine.run(request).result.images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(want.result.images[0]))  # the control did something
    _, _, files, _ = client.predict(**args, api_name="/generate")  # the control parameters are optional
    assert "control" not in read_params(files[0])


def test_api_compare_control(client, tmp_path):
    sketch = tmp_path / "sketch.png"
    _sketch().save(sketch)
    plain, controlled, cmap, note = client.predict(prompt="a red circle", control_image=_editor_value(sketch),
                                                   control_type="raw", control_scale=1.0, seed=1, steps=2,
                                                   api_name="/compare_control")
    assert Image.open(plain).size == Image.open(controlled).size
    assert Image.open(cmap).size == (256, 256)  # the bucket the image was generated at
    assert "Σ + ControlNet (raw, scale 1)" in note


def test_api_refusals(client, engine, tmp_path):
    from gradio_client.exceptions import AppError

    sketch = tmp_path / "sketch.png"
    _sketch().save(sketch)
    with pytest.raises(AppError, match="unknown control type 'hed'; accepted: canny, canny-thick, regions, raw"):
        client.predict(prompt="a red circle", steps=1, control_image=_editor_value(sketch), control_type="hed",
                       api_name="/generate")
    with pytest.raises(AppError, match="upload or draw a control image"):
        client.predict(prompt="a red circle", steps=1, api_name="/compare_control")
    with pytest.raises(ValueError, match="must be an image uploaded to this app"):
        read_control_image({"path": "/etc/hostname"})
    net, engine.pipes[MAIN].controlnet = engine.pipes[MAIN].controlnet, None
    try:
        with pytest.raises(Exception, match="this model has no ControlNet"):
            list(make_generate_fn(engine, tmp_path)("a red circle", steps=1, control_image=_sketch()))
        with pytest.raises(Exception, match="this model has no ControlNet"):
            list(make_compare_control_fn(engine)("a red circle", control_image=_sketch()))
    finally:
        engine.pipes[MAIN].controlnet = net


def test_empty_canvas_is_no_control_and_the_map_preview():
    assert read_control_image(None) is None
    assert read_control_image(Image.new("RGB", (64, 64), "white")) is None
    shown = preview_map(_sketch(), "canny", "1:1", 256)
    assert shown.size == (256, 256) and np.asarray(shown).max() == 255
    assert preview_map(None, "canny", "1:1", 256) is None
