"""The app's input image (image-to-image and inpainting) through gradio_client: the ``init_image, mask, strength``
API parameters (their place and defaults), a painted mask, and refusals; on the tiny real pipeline."""

from __future__ import annotations

import inspect
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures import app_client
from PIL import Image, ImageDraw

from pixsigma.edit import FEATHER_PX
from pixsigma.io import read_params
from pixsigma_ui.edit_panel import painted_mask, read_edit_inputs
from pixsigma_ui.engine import MAIN, AppEngine
from pixsigma_ui.generate_tab import make_generate_fn

ARGS = dict(prompt="a red circle", resolution=256, steps=3, seed=3, randomize_seed=False, expand_prompt=False)


def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    ImageDraw.Draw(im).ellipse((60, 60, 190, 190), fill=(40, 60, 220))
    return im


def editor(path, layers=()) -> dict:
    """The ImageEditor value the API takes for ``init_image``."""
    from gradio_client import handle_file

    return {"background": handle_file(str(path)), "layers": [handle_file(str(p)) for p in layers], "composite": None}


def paint() -> Image.Image:
    """A brush layer: transparent, with a painted square."""
    layer = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((96, 96, 150, 150), fill=(255, 0, 255, 255))
    return layer


@pytest.fixture(scope="module")
def engine(pipe):
    return AppEngine({MAIN: pipe}, {MAIN: "tiny-sigma"})


@pytest.fixture(scope="module")
def client(engine, tmp_path_factory):
    with app_client(engine, tmp_path_factory.mktemp("outputs")) as c:
        yield c


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edit_inputs")
    photo().save(folder / "photo.png")
    paint().save(folder / "layer.png")
    mask = Image.new("L", (64, 64), 0)  # another size than the photo: resized to it
    ImageDraw.Draw(mask).rectangle((24, 24, 37, 37), fill=255)
    mask.save(folder / "mask.png")
    return folder


def test_init_image_mask_strength_come_right_before_loras(pipe, tmp_path):
    names = list(inspect.signature(make_generate_fn(AppEngine({MAIN: pipe}), tmp_path)).parameters)
    i = names.index("init_image")
    assert names[i - 1:i + 4] == ["expand_prompt", "init_image", "mask", "strength", "loras"]


def test_api_inpaints_what_was_painted_and_keeps_the_rest_exactly(client, files):
    _, _, out, _ = client.predict(**ARGS, init_image=editor(files / "photo.png", [files / "layer.png"]), strength=0.9,
                                  api_name="/generate")
    assert read_params(out[0])["edit"] == {"mode": "inpaint", "strength": 0.9}
    got, want = np.asarray(Image.open(out[0]).convert("RGB")), np.asarray(photo())
    painted = np.asarray(paint())[..., 3] > 0
    r = FEATHER_PX
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = torch.from_numpy((yy**2 + xx**2 <= r * r).astype(np.float32))[None, None]
    near = F.conv2d(torch.from_numpy(painted.astype(np.float32))[None, None], disc, padding=r)[0, 0] > 0
    far = ~near.numpy()  # farther than 8 px from the paint
    assert got.shape == want.shape and np.array_equal(got[far], want[far])
    assert not np.array_equal(got[painted], want[painted])


def test_api_img2img_and_an_explicit_mask_equal_the_engine(client, engine, files):
    from gradio_client import handle_file

    request = engine.make_request("a red circle", resolution=256, steps=3, seed=3, expand_prompt=False)
    _, _, out, _ = client.predict(**ARGS, init_image=editor(files / "photo.png"), strength=0.5,
                                  api_name="/generate")
    want = engine.run(replace(request, init_image=photo(), strength=0.5)).result.images[0]
    assert np.array_equal(np.asarray(Image.open(out[0]).convert("RGB")), np.asarray(want))
    _, _, out, _ = client.predict(**ARGS, init_image=editor(files / "photo.png"),
                                  mask=handle_file(str(files / "mask.png")), api_name="/generate")
    mask = Image.open(files / "mask.png")
    want = engine.run(replace(request, init_image=photo(), mask=mask, strength=0.8)).result
    assert "mask 64x64 resized to the init image's 256x256" in want.warnings
    assert np.array_equal(np.asarray(Image.open(out[0]).convert("RGB")), np.asarray(want.images[0]))
    _, _, out, _ = client.predict(**ARGS, api_name="/generate")  # the edit parameters are optional
    assert "edit" not in read_params(out[0])


def test_api_refusals(client, files):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"strength must be a number in \(0, 1\]"):
        client.predict(**ARGS, init_image=editor(files / "photo.png"), strength=0, api_name="/generate")
    with pytest.raises(AppError, match="mask needs an init_image"):
        client.predict(**ARGS, mask=handle_file(str(files / "mask.png")), api_name="/generate")
    with pytest.raises(ValueError, match="init_image must be an image uploaded to this app"):
        read_edit_inputs({"path": "/etc/hostname"}, None)


def test_the_editor_value_gives_image_and_painted_mask():
    assert painted_mask([Image.new("RGBA", (8, 8), (255, 0, 255, 0))]) is None  # nothing painted: img2img
    image, mask = read_edit_inputs({"background": photo(), "layers": [paint()], "composite": None}, None)
    assert image.size == (256, 256) and np.array_equal(np.asarray(mask) > 0, np.asarray(paint())[..., 3] > 0)
    assert read_edit_inputs({"background": None, "layers": [], "composite": None}, None) == (None, None)
