"""Image-to-image and inpainting (pixsigma.edit), their request fields and CLI options, and the diffusers-shaped
call (pixsigma.diffusers_call): on the shipped demo Σ at 256 px for what the images do, on the tiny random pipeline
for the rest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from pixsigma.edit import FEATHER_PX, feather, paste, schedule
from pixsigma.io import read_params
from pixsigma.pipeline import GenerationRequest, PixSigmaPipeline
from pixsigma.registry import MODEL_ALIASES
from pixsigma.sampling import make_scheduler

ROOT = Path(__file__).resolve().parents[1]
# 5 steps without guidance (quick): strengths 0.2 / 0.5 / 0.9 run 1 / 2 / 4 of them
DEMO = dict(width=256, height=256, steps=5, guidance=1.0, seed=0)


def disc(image_size=(256, 256)) -> Image.Image:
    im = Image.new("RGB", image_size, "white")
    w, h = image_size
    ImageDraw.Draw(im).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(40, 60, 220))
    return im


def mean_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


def within(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels at Euclidean distance <= radius of a True pixel of ``mask`` (a disc dilation, not the module's)."""
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc_kernel = torch.from_numpy((yy**2 + xx**2 <= radius**2).astype(np.float32))[None, None]
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.conv2d(m, disc_kernel, padding=r)[0, 0] > 0).numpy()


@pytest.fixture(scope="module")
def demo():
    if not (MODEL_ALIASES["demo"] / "model_index.json").is_file():
        pytest.skip("the demo model is not built")
    return PixSigmaPipeline.from_pretrained("demo", device="cpu")


# -- what the images do (demo Σ) -----------------------------------------------------------------------------------
def test_img2img_moves_away_from_the_input_as_strength_grows(demo):
    image = disc()
    dist = {}
    for s in (0.2, 0.5, 0.9):
        res = demo.generate(GenerationRequest("a red star", init_image=image, strength=s, **DEMO))
        assert res.params["edit"] == {"mode": "img2img", "strength": s} and res.images[0].size == (256, 256)
        dist[s] = mean_abs(res.images[0], image)
    assert dist[0.2] < dist[0.5] < dist[0.9], dist
    assert dist[0.2] < 15, dist  # a small strength keeps the input nearly as it is (grey levels of 255)


def test_full_strength_img2img_is_almost_but_not_exactly_text_to_image(demo):
    """diffusers noises the input to the first timestep rather than starting from the noise alone, so at
    strength 1 the input still leaks in, by a hair."""
    quick = {**DEMO, "steps": 3}
    plain = demo.generate(GenerationRequest("a red star", **quick)).images[0]
    full = demo.generate(GenerationRequest("a red star", init_image=disc(), strength=1.0, **quick)).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(full))
    assert mean_abs(plain, full) < 1.0


def test_inpainting_keeps_every_pixel_farther_than_8_px_from_the_mask_exactly(demo):
    image = disc()
    mask = Image.new("L", (128, 128), 0)  # another size than the image: resized to it, with a warning
    ImageDraw.Draw(mask).rectangle((50, 50, 79, 79), fill=255)
    res = demo.generate(GenerationRequest("a red star", init_image=image, mask=mask, **DEMO))
    assert "mask 128x128 resized to the init image's 256x256" in res.warnings
    assert res.params["edit"] == {"mode": "inpaint", "strength": 1.0}
    out, inp = np.asarray(res.images[0]), np.asarray(image)
    white = np.asarray(mask.resize((256, 256), Image.Resampling.BILINEAR)) >= 128
    far = ~within(white, FEATHER_PX)
    assert far.sum() > 0.8 * far.size and np.array_equal(out[far], inp[far])  # byte-equal
    assert mean_abs(out[white], inp[white]) > 20  # the inside was repainted


# -- the diffusers-shaped call -------------------------------------------------------------------------------------
def test_call_equals_generate(demo):
    got = demo("a red star", num_inference_steps=4, generator=torch.Generator().manual_seed(0), height=256,
               width=256)
    want = demo.generate(GenerationRequest("a red star", steps=4, seed=0, height=256, width=256))
    assert np.array_equal(np.asarray(got.images[0]), np.asarray(want.images[0]))


def test_call_with_an_image_and_its_outputs(pipe):
    seen = []
    image = disc((64, 64))
    out = pipe("a red circle", num_inference_steps=4, image=image, strength=0.5, output_type="np",
               generator=[torch.Generator().manual_seed(3)],
               callback_on_step_end=lambda p, i, t, kw: seen.append((i, float(t), kw["latents"].shape)))
    assert out.images.shape == (1, 64, 64, 3) and out.images.dtype == np.float32  # the image's own size
    want = pipe.generate(GenerationRequest("a red circle", steps=4, seed=3, init_image=image, strength=0.5))
    assert np.array_equal((out.images[0] * 255).round().astype(np.uint8), np.asarray(want.images[0]))
    sched = make_scheduler(None, pipe.scheduler_config, pipe.transformer.config.prediction_type)
    sched.set_timesteps(4)
    assert [(i, t) for i, t, _ in seen] == [(0, float(sched.timesteps[2])), (1, float(sched.timesteps[3]))]
    (images,) = pipe("a red circle", num_inference_steps=1, output_type="pt", return_dict=False, guidance_scale=1)
    assert images.shape == (1, 3, 256, 256) and 0 <= images.min() <= images.max() <= 1
    with pytest.raises(ValueError, match="output_type must be one of pil, np, pt, latent, got 'pillow'"):
        pipe("a red circle", output_type="pillow")
    with pytest.raises(ValueError, match="generator: pass one torch.Generator"):
        pipe("a red circle", generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="image must be a PIL image"):
        pipe("a red circle", image=np.zeros((8, 8, 3)))


def test_from_pretrained_takes_torch_dtype_and_to_moves_the_pipeline(tiny_pipeline):
    pipe = PixSigmaPipeline.from_pretrained(str(tiny_pipeline), device="cpu", torch_dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and next(pipe.transformer.parameters()).dtype == torch.bfloat16
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu")
    with pytest.raises(ValueError, match="runs in torch.bfloat16; load it again with"):
        pipe.to(torch.float32)
    with pytest.raises(ValueError, match="dtype 'fp32' and torch_dtype torch.float16 disagree"):
        PixSigmaPipeline.from_pretrained(str(tiny_pipeline), device="cpu", dtype="fp32", torch_dtype=torch.float16)


def test_importing_pixsigma_is_light_and_exports_the_pipeline():
    code = ("import sys, pixsigma\nlight = 'torch' not in sys.modules\nfrom pixsigma import PixSigmaPipeline, "
            "GenerationRequest\nprint(light, PixSigmaPipeline.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    assert out.split() == ["True", "pixsigma.pipeline"]


# -- requests, schedule, paste -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    (dict(mask=Image.new("L", (8, 8))), "mask needs an init_image"),
    (dict(strength=0.5), "strength needs an init_image"),
    (dict(init_image=Image.new("RGB", (8, 8)), strength=0), r"strength must be a number in \(0, 1\]"),
    (dict(init_image=Image.new("RGB", (8, 8)), strength=1.5), r"\(0, 1\] .*got 1.5"),
    (dict(init_image=Image.new("RGB", (8, 8)), strength=True), "got True"),
    (dict(init_image=Image.new("RGB", (8, 8)), strength=float("nan")), "got nan"),
    (dict(init_image="in.png"), "init_image must be a PIL image or None, got str"),
])
def test_request_refuses_bad_edit_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        GenerationRequest("a red circle", **fields)


@pytest.mark.parametrize("sampler", ["dpm-solver", "euler-a", "ddim", "sa-solver"])
def test_schedule_equals_diffusers_img2img_get_timesteps(sampler):
    """The timesteps run and the scheduler's begin index, against diffusers' own img2img code."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionImg2ImgPipeline

    for steps, strength in ((10, 0.3), (7, 0.75), (12, 1.0), (5, 0.21)):
        ours, theirs = make_scheduler(sampler), make_scheduler(sampler)
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
        got, _ = schedule(ours, steps, strength)
        want, n = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=theirs), steps, strength,
                                                               "cpu")
        assert torch.equal(got, want) and len(got) == n
        assert getattr(ours, "begin_index", None) == getattr(theirs, "begin_index", None)  # DDIM has none


def test_schedule_is_diffusers_get_timesteps():
    sched = make_scheduler("dpm-solver")
    sched.set_timesteps(10)
    timesteps, begin = schedule(sched, 10, 0.35)  # int(3.5) = 3 steps, from index 7
    assert begin == 7 and sched.begin_index == 7 and torch.equal(timesteps, sched.timesteps[7:])
    with pytest.raises(ValueError, match=r"strength 0.05 with 10 steps runs int\(10 × 0.05\) = 0 steps: use a "
                                         "strength of at least 0.1 or more steps"):
        schedule(sched, 10, 0.05)


def test_paste_keeps_the_input_from_8_px_on_and_feathers_inside_that():
    rng = np.random.default_rng(0)
    gen, orig = (Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(2))
    m = np.zeros((40, 50), bool)
    m[10:15, 20:23] = True
    out = np.asarray(paste(gen, orig, Image.fromarray(m.astype(np.uint8) * 255)))
    far = ~within(m, FEATHER_PX - 1e-6)
    assert np.array_equal(out[far], np.asarray(orig)[far]) and np.array_equal(out[m], np.asarray(gen)[m])
    alpha = feather(m)
    assert alpha[12, 23] == (FEATHER_PX - 1) / FEATHER_PX and alpha[12, 20 - FEATHER_PX] == 0


# -- the command line -----------------------------------------------------------------------------------------------
def test_cli_inpaints_end_to_end(tiny_pipeline, tmp_path, capsys):
    from pixsigma.cli import main

    disc((96, 64)).save(tmp_path / "in.png")
    mask = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(mask).rectangle((40, 20, 60, 40), fill=255)
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle", "--model", str(tiny_pipeline), "--device", "cpu", "--steps", "3",
                 "--seed", "1", "--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--strength", "0.7", "--out", str(out)]) == 0
    params = read_params(out)
    assert params["edit"] == {"mode": "inpaint", "strength": 0.7} and Image.open(out).size == (96, 64)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--init-image", "{tmp}/nope.png"], "--init-image {tmp}/nope.png: no such file; --init-image takes a PNG, "
                                         "JPEG or WebP image"),
    (["--init-image", "{tmp}/notes.txt"], "--init-image {tmp}/notes.txt is not an image PIL can read "
                                          "(UnidentifiedImageError); --init-image takes a PNG, JPEG or WebP image"),
    (["--init-image", "{tmp}/in.png", "--mask", "{tmp}/notes.txt"],
     "--mask {tmp}/notes.txt is not an image PIL can read (UnidentifiedImageError); --mask takes an image whose "
     "white pixels mark what to repaint (any size)"),
    (["--init-image", "{tmp}/in.png", "--strength", "1.5"],
     "--strength must be a number in (0, 1] (how far the input is noised: small keeps it nearly as it is, 1 starts "
     "from almost pure noise), got 1.5"),
    (["--init-image", "{tmp}/in.png", "--strength", "0"], "--strength must be a number in (0, 1]"),
    (["--mask", "{tmp}/in.png"], "--mask {tmp}/in.png needs --init-image IMAGE (the image to repaint)"),
    (["--strength", "0.5"], "--strength 0.5 needs --init-image IMAGE (the image to noise and redraw)"),
])
def test_cli_refuses_bad_edit_input_before_loading_a_model(tmp_path, capsys, args, message):
    from pixsigma.cli import main

    disc((32, 32)).save(tmp_path / "in.png")
    (tmp_path / "notes.txt").write_text("not an image")
    out = tmp_path / "out.png"
    argv = ["generate", "a red circle", "--model", str(tmp_path / "no-such-model"), "--out", str(out)]
    assert main(argv + [a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message.format(tmp=tmp_path)}"), err  # not the missing model: refused first
    assert not out.exists()


def test_help_documents_the_edit_options(capsys):
    from pixsigma.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert all(opt in text for opt in ("--init-image IMAGE", "--strength F", "--mask IMAGE", "docs/edit.md"))
