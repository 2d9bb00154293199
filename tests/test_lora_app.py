"""LoRAs in the app: the picker's offer, the ``loras`` API parameter (its place and its refusals), per-request
swaps without a reload, and the shipped demo LoRA."""

import inspect

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pixsigma.io import read_params
from pixsigma.lora import LoraSpec
from pixsigma.registry import LORA_ALIASES
from pixsigma_ui.engine import MAIN, AppEngine
from pixsigma_ui.generate_tab import make_generate_fn
from pixsigma_ui.lora_panel import LORA_DIR_ENV, available_loras, resolve_loras, with_names


def tiny_lora(path, seed=0):
    """A random rank-2 LoRA of the tiny pipeline's DiT (hidden 32), diffusers layout."""
    torch.manual_seed(seed)
    sd = {}
    for i in range(2):
        for mod, out in (("attn1.to_q", 32), ("ff.net.2", 32)):
            sd[f"transformer.transformer_blocks.{i}.{mod}.lora_A.weight"] = torch.randn(2, 32 if mod != "ff.net.2"
                                                                                         else 128) * 0.5
            sd[f"transformer.transformer_blocks.{i}.{mod}.lora_B.weight"] = torch.randn(out, 2) * 0.5
    save_file(sd, path)
    return path


@pytest.fixture
def lora_dir(tmp_path, monkeypatch):
    folder = tmp_path / "loras"
    folder.mkdir()
    tiny_lora(folder / "style.safetensors")
    (folder / "peft_one").mkdir()
    tiny_lora(folder / "peft_one" / "adapter_model.safetensors", seed=1)
    monkeypatch.setenv(LORA_DIR_ENV, str(folder))
    return folder


def test_the_picker_offers_shipped_and_found_loras(lora_dir):
    offered = available_loras()
    assert offered["style"] == str(lora_dir / "style.safetensors")
    assert offered["peft_one"] == str(lora_dir / "peft_one")
    shipped = [n for n, p in LORA_ALIASES.items() if p.is_dir()]
    assert list(offered)[:len(shipped)] == shipped
    assert with_names(["style", "peft_one"], "style:0.3") == "style:0.3, peft_one:1"


@pytest.mark.parametrize("value, message", [
    ("nope:1", "loras: unknown LoRA 'nope'; accepted: "),
    ("style:9", "loras: scale of 'style' must be in \\[-4.0, 4.0\\], got 9.0"),
    ("style, style, style, style, style", "at most 4 LoRAs per request, got 5"),
    ("/etc/passwd:1", "unknown LoRA '/etc/passwd'"),
])
def test_api_loras_are_checked_by_name(lora_dir, value, message):
    with pytest.raises(ValueError, match=message):
        resolve_loras(value)


def test_loras_is_the_api_parameter_after_the_edit_inputs(pipe, tmp_path):
    names = list(inspect.signature(make_generate_fn(AppEngine({MAIN: pipe}), tmp_path)).parameters)
    before = names.index("strength") if "strength" in names else names.index("expand_prompt")
    assert names[before + 1] == "loras"


def test_each_request_runs_with_exactly_its_loras_without_reloading(pipe, lora_dir, tmp_path):
    engine = AppEngine({MAIN: pipe})
    params = {k: v for k, v in pipe.transformer.named_parameters()}
    generate = make_generate_fn(engine, tmp_path)

    def image(loras):
        *_, (paths, _, _, _) = list(generate("a red circle", resolution=128, steps=3, seed=2, randomize_seed=False,
                                             loras=loras))
        return np.asarray(Image.open(paths[0]).convert("RGB")), read_params(paths[0])

    base, p0 = image("")
    styled, p1 = image("style:1, peft_one:0.5")
    again, _ = image("")
    assert "loras" not in p0 and [d["scale"] for d in p1["loras"]] == [1.0, 0.5]
    assert not np.array_equal(base, styled) and np.array_equal(base, again)
    assert all(v is params[k] for k, v in pipe.transformer.named_parameters())
    with pytest.raises(gr.Error, match="unknown LoRA 'other'"):
        list(generate("a red circle", resolution=128, steps=1, loras="other:1"))


@pytest.fixture(scope="module")
def demo():
    from pixsigma.pipeline import PixSigmaPipeline

    return PixSigmaPipeline.from_pretrained("demo", device="cpu")


def test_the_shipped_demo_lora_is_offered_loads_and_changes_the_image(demo):
    from pixsigma.pipeline import GenerationRequest
    from pixsigma_ui.lora_panel import available_loras

    assert "demo-tiny-huge" in available_loras()
    assert sum(f.stat().st_size for f in LORA_ALIASES["demo-tiny-huge"].iterdir()) <= 2 * 2**20

    req = GenerationRequest("A tiny red star in the centre.", seed=0, steps=8, expand_prompt=False)
    base = np.asarray(demo.generate(req).images[0])
    demo.set_loras([LoraSpec("demo-tiny-huge", 1.0)])
    assert demo.loras.active == [("demo-tiny-huge", 1.0)]
    changed = np.asarray(demo.generate(req).images[0])
    demo.set_loras([LoraSpec("demo-tiny-huge", 0.0)])
    assert np.array_equal(np.asarray(demo.generate(req).images[0]), base)
    assert np.abs(changed.astype(int) - base).mean() > 1


def test_the_train_tab_starts_a_lora_run():
    from pixsigma_ui.train_tab import lora_overrides

    assert lora_overrides("finetune", 8) == ["lora.rank=8", "optim.ema_decay=null"]
    assert lora_overrides("res_up", 0) == []
    with pytest.raises(ValueError, match="a LoRA adapts loaded weights: pick a stage other than from_scratch"):
        lora_overrides("from_scratch", 4)
    with pytest.raises(ValueError, match="LoRA rank must be an integer from 1 to 256 \\(0: no LoRA\\), got 999"):
        lora_overrides("finetune", 999)
