"""The app's fast mode (pixsigma_ui/fast_mode.py): found where a consistency adapter fits the model, sets the
adapter's sampling, and the Compare panel "Σ vs Σ fast" labels each image with its latency."""

from __future__ import annotations

import gradio as gr
import pytest
from test_fewstep import _lora

from pixsigma.constants import FEW_STEP_SAMPLING
from pixsigma_ui.engine import MAIN, AppEngine
from pixsigma_ui.fast_mode import fast_adapter, fast_switch, make_compare_fast_fn, toggle_loras
from pixsigma_ui.generate_tab import build_generate_tab


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
