"""PixSigmaPipeline as a drop-in for diffusers' PixArtSigmaPipeline: the same call, argument by argument, gives
diffusers' own output on the tiny pipeline (images ≥ 40 dB, latents to 1e-3), and the README's diffusers script
runs with only its import changed."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, PixArtSigmaPipeline

from pixsigma.pipeline import GenerationRequest, PixSigmaPipeline
from pixsigma.sampling import PIXART_BETAS
from pixsigma.text import CLEANING_MODULES

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red star above a blue ring"


def psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = np.mean((a - b) ** 2)
    peak = 255.0 if a.max() > 1.5 else 1.0
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def same_image(a, b) -> bool:
    return a.images[0].tobytes() == b.images[0].tobytes()


@pytest.fixture(scope="module")
def ref(tiny_pipeline):
    return PixArtSigmaPipeline.from_pretrained(tiny_pipeline)


@pytest.fixture(scope="module")
def ours(tiny_pipeline):
    return PixSigmaPipeline.from_pretrained(str(tiny_pipeline), torch_dtype=torch.float32).to("cpu")


SCHEDULERS = {"euler": lambda: EulerDiscreteScheduler(**PIXART_BETAS),
              "ddim": lambda: DDIMScheduler(**PIXART_BETAS, clip_sample=False)}


def both(ref, ours, sampler=None, seeds=(11,), **kw):
    """(diffusers' output, ours) for the same arguments; generators made afresh for each."""
    own = ref.scheduler
    if sampler is not None:
        ref.scheduler = SCHEDULERS[sampler]()
    try:
        def gens():
            g = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            return g[0] if len(g) == 1 else g

        want = ref(**kw, generator=gens())
        got = ours(**kw, generator=gens(), **({"sampler": sampler} if sampler else {}))
    finally:
        ref.scheduler = own
    return want, got


def assert_same(want, got, output_type="pil"):
    if output_type == "latent":
        assert got.images.shape == want.images.shape
        assert (got.images - want.images).abs().max() < 1e-3
        return
    assert len(got.images) == len(want.images)
    for w, g in zip(want.images, got.images):
        if output_type == "pil":
            assert g.size == w.size and np.asarray(g).std() > 1
        else:
            assert type(g) is type(w) and g.shape == w.shape and g.dtype == w.dtype
        assert psnr(np.asarray(w), np.asarray(g)) >= 40


def test_defaults_are_diffusers(ref, ours):
    # no steps, guidance, size, negative prompt or caption setting: diffusers' defaults (20 steps, 4.5, 256 px)
    want, got = both(ref, ours, prompt=PROMPT)
    assert_same(want, got)
    want, got = both(ref, ours, prompt=PROMPT, output_type="latent")
    assert_same(want, got, "latent")


@pytest.mark.parametrize("kw", [
    {"negative_prompt": "a green square", "num_inference_steps": 5},
    {"guidance_scale": 1.0, "num_inference_steps": 4},
    {"guidance_scale": 2.0, "num_inference_steps": 4, "height": 320, "width": 200},
    {"num_inference_steps": 4, "height": 128, "width": 256, "use_resolution_binning": False},
    {"prompt": ["a red star", "a blue ring"], "negative_prompt": ["a ring", "a star"], "num_images_per_prompt": 2,
     "num_inference_steps": 3},
    {"num_inference_steps": 4, "max_sequence_length": 4},
    {"num_inference_steps": 4, "clean_caption": False},
    {"num_inference_steps": 4, "timesteps": [999, 700, 400, 100]},
    {"sampler": "euler", "sigmas": [14.0, 6.0, 2.0, 0.5]},
    {"sampler": "ddim", "num_inference_steps": 5, "eta": 0.7},
    {"sampler": "euler", "num_inference_steps": 4, "num_images_per_prompt": 2, "seeds": (3, 4)},
])
def test_each_argument_means_what_it_means_in_diffusers(ref, ours, kw):
    kw = {"prompt": PROMPT, **kw}
    want, got = both(ref, ours, **kw)
    assert_same(want, got)


@pytest.mark.parametrize("output_type", ["np", "pt", "latent"])
def test_output_types_and_return_dict(ref, ours, output_type):
    want, got = both(ref, ours, prompt=PROMPT, num_inference_steps=3, output_type=output_type)
    assert_same(want, got, output_type)
    (images,) = ours(PROMPT, num_inference_steps=3, output_type=output_type, return_dict=False,
                     generator=torch.Generator().manual_seed(11))
    assert torch.equal(torch.as_tensor(np.asarray(images)), torch.as_tensor(np.asarray(got.images)))


def test_given_latents_and_text_features(ref, ours):
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    want, got = both(ref, ours, prompt=PROMPT, num_inference_steps=3, latents=latents)
    assert_same(want, got)
    emb, mask, neg, neg_mask = ref.encode_prompt(PROMPT, negative_prompt="a green square", clean_caption=False)
    for kw in ({"prompt_embeds": emb, "prompt_attention_mask": mask, "negative_prompt": "a green square"},
               {"prompt_embeds": emb, "prompt_attention_mask": mask, "negative_prompt_embeds": neg,
                "negative_prompt_attention_mask": neg_mask, "negative_prompt": None}):
        want, got = both(ref, ours, num_inference_steps=3, num_images_per_prompt=2, **kw)
        assert_same(want, got)
    with pytest.raises(ValueError, match="give prompt or prompt_embeds, not both"):
        ours(PROMPT, prompt_embeds=emb, prompt_attention_mask=mask)
    with pytest.raises(ValueError, match="latents have shape"):
        ours(PROMPT, num_inference_steps=1, latents=torch.zeros(1, 4, 8, 8))


def test_callbacks(ref, ours):
    seen = {"ref": [], "ours": []}
    for name, p in (("ref", ref), ("ours", ours)):
        p(PROMPT, num_inference_steps=5, callback_steps=2, generator=torch.Generator().manual_seed(1),
          callback=lambda i, t, lat, name=name: seen[name].append((i, int(t), lat.clone())))
    assert [(i, t) for i, t, _ in seen["ours"]] == [(i, t) for i, t, _ in seen["ref"]] and len(seen["ref"]) == 3
    assert all((a[2] - b[2]).abs().max() < 1e-3 for a, b in zip(seen["ref"], seen["ours"]))
    steps = []

    def zero_last(pipe, i, t, kw):  # diffusers' callback_on_step_end: what it returns replaces the latents
        steps.append((pipe, i, int(t), sorted(kw)))
        return {"latents": kw["latents"] * 0} if i == 2 else {}

    out = ours(PROMPT, num_inference_steps=3, output_type="latent", callback_on_step_end=zero_last,
               callback_on_step_end_tensor_inputs=["latents"])
    assert [(p is ours, i) for p, i, _, _ in steps] == [(True, 0), (True, 1), (True, 2)]
    assert steps[0][3] == ["latents"] and torch.equal(out.images, torch.zeros_like(out.images))
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs .'prompt_embeds'. are not offered"):
        ours(PROMPT, callback_on_step_end=zero_last, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_clean_caption_without_its_modules_warns_as_diffusers_does(ours):
    if all(importlib.util.find_spec(m) for m in CLEANING_MODULES):
        pytest.skip("bs4 and ftfy are installed: captions are cleaned")
    cleaned = ours.generate(GenerationRequest(PROMPT, steps=1, seed=1, clean_caption=True))
    assert cleaned.warnings == ["clean_caption needs bs4 and ftfy (pip install beautifulsoup4 ftfy): prompts were "
                                "only lower-cased and stripped, as diffusers does without them"]
    assert same_image(cleaned, ours.generate(GenerationRequest(PROMPT, steps=1, seed=1)))


def test_the_readme_snippet_is_diffusers_with_only_the_import_changed(tiny_pipeline, tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ours_import = "from pixsigma import PixSigmaPipeline as PixArtSigmaPipeline"
    assert ours_import in code
    diffusers_code = code.replace(ours_import, "from diffusers import PixArtSigmaPipeline")
    assert [line for line in code.splitlines() if "import" not in line] == \
           [line for line in diffusers_code.splitlines() if "import" not in line]
    monkeypatch.chdir(tmp_path)
    images = {}
    for name, src in (("ours", code), ("diffusers", diffusers_code)):
        # a GPU and the hub are not here: the tiny pipeline on the CPU in fp32 stands in
        src = (src.replace('"PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"', repr(str(tiny_pipeline)))
               .replace('"cuda"', '"cpu"').replace("torch.float16", "torch.float32"))
        scope = {}
        exec(compile(src, f"README-{name}", "exec"), scope)
        images[name] = scope["image"]
    assert psnr(images["ours"], images["diffusers"]) >= 40
