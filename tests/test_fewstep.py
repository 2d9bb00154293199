"""Few-step sampling (docs/fewstep.md): the ``lcm`` sampler, guidance 1 as one DiT call per step, an adapter's own
``sampling.json``, its composition with KV compression, ControlNet, img2img and other LoRAs; and the app's fast mode
(pixsigma_ui/fast_mode.py): found where a consistency adapter fits the model, it sets the adapter's sampling, and
the Compare panel "Σ vs Σ fast" labels each image with its latency."""

from __future__ import annotations

import json

import gradio as gr
import pytest
import torch
from PIL import Image

from pixsigma.cli import main as cli
from pixsigma.config import KVCompress
from pixsigma.constants import FEW_STEP_SAMPLING
from pixsigma.folder_settings import SamplingDefaults
from pixsigma.io import read_params
from pixsigma.lora import save_lora, to_diffusers_lora
from pixsigma.model.controlnet import ControlNet
from pixsigma.pipeline import GenerationRequest
from pixsigma.sampling import make_scheduler
from pixsigma_ui.engine import MAIN, AppEngine
from pixsigma_ui.fast_mode import fast_adapter, fast_switch, make_compare_fast_fn, toggle_loras
from pixsigma_ui.generate_tab import build_generate_tab


def _lora(pipe, folder, seed: int, sampling: dict | None):
    """A random rank-2 LoRA on two Linears of every block, with ``sampling`` as its ``sampling.json``."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, mod in pipe.transformer.named_modules():
        if name.endswith(("attn.proj", "mlp.fc2")) and name.startswith("blocks."):
            pairs[name] = (torch.randn(2, mod.in_features, generator=g) * 0.1,
                           torch.randn(mod.out_features, 2, generator=g) * 0.1)
    tensors = to_diffusers_lora(pairs, pipe.transformer)
    targets = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in tensors})
    save_lora(tensors, folder, 2, 2.0, targets)
    if sampling is not None:
        SamplingDefaults(**sampling).write(folder)
    return folder


@pytest.fixture(scope="module")
def fast(pipe, tmp_path_factory):
    return _lora(pipe, tmp_path_factory.mktemp("lcm"), 0, FEW_STEP_SAMPLING)


class Calls:
    """Counts the DiT's forward calls and their batch sizes."""

    def __init__(self, module):
        self.batches: list[int] = []
        self.handle = module.register_forward_hook(lambda m, args, out: self.batches.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_lcm_scheduler_steps():
    s = make_scheduler("lcm", prediction_type="v_prediction")
    for steps, want in ((1, [999]), (2, [999, 499]), (4, [999, 759, 499, 259])):
        s.set_timesteps(steps)
        assert s.timesteps.tolist() == want
    s.set_timesteps(8)
    assert len(s.timesteps) == 8 and s.timesteps[0] == 999 and s.config.prediction_type == "v_prediction"


def test_the_adapter_brings_its_sampling_and_guidance_1_is_one_call_per_step(pipe, fast):
    with Calls(pipe.transformer) as calls:
        res = pipe.generate(GenerationRequest("a red star", seed=1, width=64, height=64, loras=str(fast)))
    assert (res.params["sampler"], res.params["steps"], res.params["guidance"]) == ("lcm", 4, 1.0)
    assert calls.batches == [1, 1, 1, 1]  # no CFG batch
    res = pipe.generate(GenerationRequest("a red star", seed=1, width=64, height=64))
    assert res.params["sampler"] == "default" and "loras" not in res.params  # a request's adapter ended with it
    pipe.set_loras(str(fast))  # the pipeline's own set: every request without loras of its own samples with it
    with Calls(pipe.transformer) as calls:
        res = pipe.generate(GenerationRequest("a red star", seed=1, width=64, height=64, guidance=2.0, steps=2))
    assert (res.params["sampler"], res.params["steps"], res.params["guidance"]) == ("lcm", 2, 2.0)  # still applied
    assert calls.batches == [2, 2]  # the user's guidance > 1: the CFG batch again
    res = pipe.generate(GenerationRequest("a red star", seed=1, width=64, height=64, sampler="euler", loras=""))
    assert (res.params["sampler"], res.params["steps"]) == ("euler", 30)  # adapter removed: the model's own
    res = pipe.generate(GenerationRequest("a red star", seed=1, width=64, height=64, sampler="ddim",
                                          loras=f"{fast}:1.0"))
    assert (res.params["sampler"], res.params["steps"], res.params["guidance"]) == ("ddim", 50, 1.0)
    pipe.set_loras(None)
    assert pipe.resolve_sampling(GenerationRequest("x")) == (4.5, 20)  # the tiny folder's defaults again


def test_it_composes_with_another_lora_kv_controlnet_and_img2img(pipe, fast, tmp_path):
    other = _lora(pipe, tmp_path / "style", 1, None)  # no sampling.json: the fast adapter's settings stand
    base = dict(seed=3, width=64, height=64, loras=f"{fast}, {other}:0.5")
    ref = pipe.generate(GenerationRequest("a red star", **base))
    assert (ref.params["sampler"], ref.params["steps"], ref.params["guidance"]) == ("lcm", 4, 1.0)
    assert [x["path"] for x in ref.params["loras"]] == [str(fast), str(other)]
    kv = KVCompress(2, (1,))
    seen = []  # the final latents of each request (the tiny random VAE hides small changes)
    last = lambda i, n, lat: seen.append(lat) if i == n else None  # noqa: E731
    pipe.generate(GenerationRequest("a red star", **base), callback=last)
    with Calls(pipe.transformer) as calls:
        squeezed = pipe.generate(GenerationRequest("a red star", kv=kv, **base), callback=last)
    assert calls.batches == [1] * 4 and squeezed.params["kv_compress"]["layers"] == [1]
    assert not torch.equal(seen[0], seen[1])
    assert pipe.transformer.config.kv_compress == KVCompress()  # restored after the request

    sketch = Image.new("RGB", (64, 64), "black")
    sketch.paste((255, 255, 255), (16, 16, 48, 48))
    pipe.controlnet = ControlNet.from_base(pipe.transformer)
    try:
        with torch.no_grad():
            for p in pipe.controlnet.parameters():
                p.add_(0.05)
        with Calls(pipe.transformer.blocks[0]) as calls:  # the ControlNet path runs the blocks itself
            ctl = pipe.generate(GenerationRequest("a red star", control_image=sketch, control_type="raw", kv=kv,
                                                  **base), callback=last)
        assert len(calls.batches) == 4 and set(calls.batches) == {1}
        assert ctl.params["control"] == {"type": "raw", "scale": 1.0} and ctl.params["steps"] == 4
        assert not torch.equal(seen[1], seen[2])  # the ControlNet steered the 4 steps
    finally:
        pipe.controlnet = None

    with Calls(pipe.transformer) as calls:
        edit = pipe.generate(GenerationRequest("a red star", init_image=ref.images[0], strength=0.5, **base))
    assert calls.batches == [1, 1] and edit.params["edit"]["strength"] == 0.5  # half of the 4 steps
    pipe.set_loras(None)


def test_cli_records_what_ran(tiny_pipeline, fast, tmp_path):
    out = tmp_path / "x.png"
    assert cli(["generate", "a red star", "--model", str(tiny_pipeline), "--out", str(out), "--lora", str(fast),
                "--width", "64", "--height", "64"]) == 0
    p = read_params(out)
    assert (p["sampler"], p["steps"], p["guidance"]) == ("lcm", 4, 1.0)
    assert cli(["generate", "a red star", "--model", str(tiny_pipeline), "--out", str(out), "--lora", str(fast),
                "--width", "64", "--height", "64", "--steps", "2", "--sampler", "lcm"]) == 0
    assert (read_params(out)["steps"], read_params(out)["sampler"]) == (2, "lcm")


def test_bad_adapter_settings_are_named(pipe, tmp_path):
    folder = _lora(pipe, tmp_path / "bad", 2, None)
    (folder / "sampling.json").write_text(json.dumps({"sampler": "turbo", "steps": 4}))
    with pytest.raises(ValueError, match="sampler must be one of .*lcm.* got 'turbo'"):
        pipe.generate(GenerationRequest("x", loras=str(folder), width=64, height=64))
    pipe.set_loras(None)


@pytest.fixture(scope="module")
def offered(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {"style": str(_lora(pipe, root / "style", 1, None)), "fast": str(_lora(pipe, root / "fast", 0,
                                                                                  FEW_STEP_SAMPLING))}


def test_the_adapter_is_found_only_where_it_fits(pipe, offered, tmp_path):
    engine = AppEngine({MAIN: pipe})
    fast = fast_adapter(engine, offered=offered)
    assert (fast.name, fast.sampler, fast.steps, fast.guidance, fast.label) == ("fast", "lcm", 4, 1.0,
                                                                                "Fast (4 steps)")
    assert fast_adapter(engine, offered={"style": offered["style"]}) is None  # no few-step sampling.json
    assert fast_adapter(engine, offered={"demo-lcm": "demo-lcm"}) is None  # the demo Σ's: not this model's


def test_toggle_loras_keeps_the_others():
    assert toggle_loras("style:0.5", "fast", True) == "style:0.5, fast:1"
    assert toggle_loras("style:0.5, fast:1", "fast", False) == "style:0.5"
    assert toggle_loras("", "fast", True) == "fast:1"


def test_generate_tab_shows_the_choice_and_it_sets_the_controls(pipe, offered, tmp_path, monkeypatch):
    monkeypatch.setattr("pixsigma_ui.fast_mode.available_loras", lambda: offered)
    engine = AppEngine({MAIN: pipe})
    with gr.Blocks() as demo:
        build_generate_tab(engine, tmp_path)
    boxes = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "fast-mode"]
    assert len(boxes) == 1 and "Fast (4 steps)" in boxes[0].label
    switch = fast_switch(engine, fast_adapter(engine, offered=offered))
    assert switch(True, "style:0.5") == (4, 1.0, "lcm", "style:0.5, fast:1")
    assert switch(False, "style:0.5, fast:1") == (20, 4.5, "default", "style:0.5")  # the model's own again
    monkeypatch.setattr("pixsigma_ui.fast_mode.available_loras", lambda: {})
    with gr.Blocks() as plain:
        build_generate_tab(engine, tmp_path)
    assert not [b for b in plain.blocks.values() if getattr(b, "elem_id", None) == "fast-mode"]


def test_compare_fast_labels_each_panel_with_its_latency(pipe, offered):
    engine = AppEngine({MAIN: pipe})
    fast = fast_adapter(engine, offered=offered)
    out = list(make_compare_fast_fn(engine, fast)("a red star", seed=3))
    assert len(out) == 2
    slow_img, fast_img, note = out[0][0], out[1][1], out[1][2]
    assert slow_img.label.startswith("Σ (20 steps) · ") and slow_img.label.endswith(" s")
    assert fast_img.label.startswith("Σ fast (4 steps, fast) · ")
    assert "4 lcm steps at guidance 1" in note and "(×" in note
