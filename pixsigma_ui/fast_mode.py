"""Few-step generation in the app (docs/fewstep.md): the Generate tab's "Fast (4 steps)" choice and the Compare
panel "Σ vs Σ fast", wherever the loaded model has a consistency adapter.

A consistency adapter is an offered LoRA (``lora_panel.available_loras``) whose ``sampling.json`` names the
``lcm`` sampler and whose weights fit the model (the shipped ``demo-lcm`` on the demo Σ). Fast mode applies it
with the sampler, steps and guidance it carries; the controls show them, and any of them can still be changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gradio as gr

from pixsigma.folder_settings import SamplingDefaults, adapter_sampling
from pixsigma.lora import LoraSpec, parse_loras
from pixsigma_ui.engine import MAIN, MAX_SEED, AppEngine
from pixsigma_ui.inputs import RANDOM_SEED, as_bool, as_text, guarded, resolve_seed
from pixsigma_ui.lora_panel import available_loras

FEW_STEP_SAMPLER = "lcm"


@dataclass(frozen=True)
class FastAdapter:
    """The consistency adapter of a model: its name in the LoRA picker and what it samples with."""

    name: str
    path: str
    sampler: str
    steps: int
    guidance: float

    @property
    def label(self) -> str:
        return f"Fast ({self.steps} steps)"


def fast_adapter(engine: AppEngine, model: str = MAIN, offered: dict[str, str] | None = None) -> FastAdapter | None:
    """The first offered LoRA with a few-step ``sampling.json`` that loads on ``model``; None where there is none."""
    offered = available_loras() if offered is None else offered
    stack = getattr(getattr(engine, "pipes", {}).get(model), "loras", None)
    if stack is None:  # a stand-in pipeline without LoRA support
        return None
    for name, path in offered.items():
        try:
            s: SamplingDefaults = adapter_sampling(path)
        except (OSError, ValueError):
            continue
        if s.sampler != FEW_STEP_SAMPLER or not s.steps:
            continue
        try:
            stack.load(LoraSpec(path))  # read and checked against the model once (cached)
        except (OSError, ValueError, KeyError, RuntimeError):
            continue  # another model's adapter
        return FastAdapter(name, path, s.sampler, s.steps, 1.0 if s.guidance is None else float(s.guidance))
    return None


def toggle_loras(text: str, name: str, on: bool) -> str:
    """The ``loras`` text with the adapter ``name`` added (at scale 1) or removed, other entries kept."""
    try:
        specs = [s for s in parse_loras(text or None) if s.path != name]
    except ValueError:
        specs = []
    if on:
        specs.append(LoraSpec(name, 1.0))
    return ", ".join(f"{s.path}:{s.scale:g}" for s in specs)


def build_fast_toggle(engine: AppEngine) -> tuple[gr.Checkbox, FastAdapter] | None:
    """The Generate tab's "Fast" checkbox, shown only where the model has a consistency adapter (None elsewhere);
    ``link_fast_toggle`` wires it once the controls it sets exist."""
    fast = fast_adapter(engine)
    if fast is None:
        return None
    box = gr.Checkbox(value=False, label=f"{fast.label}: the consistency adapter {fast.name}, sampler "
                      f"{fast.sampler}, {fast.steps} steps, guidance {fast.guidance:g} (no CFG batch)",
                      elem_id="fast-mode")
    return box, fast


def link_fast_toggle(engine: AppEngine, toggle: tuple[gr.Checkbox, FastAdapter] | None, steps: gr.Slider,
                     guidance: gr.Slider, sampler: gr.Dropdown, loras: gr.Textbox) -> None:
    """On, the checkbox sets the sampler, steps and guidance the adapter carries and adds it to the LoRAs; off,
    the model's own again and the adapter removed."""
    if toggle is None:
        return
    box, fast = toggle
    box.change(fast_switch(engine, fast), [box, loras], [steps, guidance, sampler, loras], queue=False,
               api_visibility="private")


def fast_switch(engine: AppEngine, fast: FastAdapter) -> Callable[[bool, str], tuple]:
    """(on, loras text) -> (steps, guidance, sampler, loras text): the adapter's settings, or the model's own."""
    info = engine.info(MAIN)

    def switch(on: bool, text: str) -> tuple:
        if as_bool(on, "fast"):
            return fast.steps, fast.guidance, fast.sampler, toggle_loras(text, fast.name, True)
        return info.steps, info.guidance, "default", toggle_loras(text, fast.name, False)

    return switch


def make_compare_fast_fn(engine: AppEngine, fast: FastAdapter) -> Callable[..., Iterator[tuple]]:
    """Handler of "Σ vs Σ fast": the same prompt and seed at the model's own sampling and with its consistency
    adapter; yields (Σ image, fast image, note) as each finishes, each labelled with its latency."""
    info = engine.info(MAIN)
    spec = (LoraSpec(fast.path, 1.0),)

    def compare_fast(prompt: str, seed: int = 0, expand_prompt: bool = True) -> Iterator[tuple]:
        prompt, seed = as_text(prompt, "prompt"), resolve_seed(seed)
        common = dict(seed=seed, expand_prompt=as_bool(expand_prompt, "expand_prompt"))
        slow = engine.run(engine.make_request(prompt, loras=(), **common))
        title = f"Σ ({info.steps} steps) · {slow.result.seconds:.2f} s"
        yield gr.Image(slow.result.images[0], label=title), gr.skip(), gr.skip()
        quick = engine.run(engine.make_request(prompt, steps=fast.steps, guidance=fast.guidance, sampler=fast.sampler,
                                               loras=spec, **common))
        fast_title = f"Σ fast ({fast.steps} steps, {fast.name}) · {quick.result.seconds:.2f} s"
        speed = slow.result.seconds / max(quick.result.seconds, 1e-9)
        note = (f"Σ {info.steps} steps at guidance {info.guidance:g}: {slow.result.seconds:.2f} s · Σ fast "
                f"{fast.steps} {fast.sampler} steps at guidance {fast.guidance:g}: {quick.result.seconds:.2f} s "
                f"(×{speed:.1f})")
        yield gr.skip(), gr.Image(quick.result.images[0], label=fast_title), note

    return guarded(compare_fast)


def build_compare_fast(engine: AppEngine, gpu: Callable = lambda fn: fn) -> None:
    """The Compare panel "Σ (N steps) vs Σ fast (4 steps)" (inside the Compare tab; absent without an adapter)."""
    fast = fast_adapter(engine)
    if fast is None:
        return
    info = engine.info(MAIN)
    gr.Markdown(f"### PixArt-Σ ({info.steps} steps) vs Σ fast ({fast.steps} steps)")
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", lines=2, scale=3, elem_id="cf-prompt")
        with gr.Column(scale=2):
            seed = gr.Number(value=0, precision=0, minimum=RANDOM_SEED, maximum=MAX_SEED, label="Seed")
            expand = gr.Checkbox(value=True, label="Expand the prompt", visible=info.prompt_expander is not None)
    button = gr.Button(f"Compare with {fast.label}", elem_id="cf-run")
    with gr.Row():
        slow = gr.Image(label=f"Sigma ({info.steps} steps)", format="png", elem_id="cf-slow")
        quick = gr.Image(label=f"Sigma fast ({fast.steps} steps)", format="png", elem_id="cf-fast")
    note = gr.Markdown(elem_id="cf-note")
    button.click(gpu(make_compare_fast_fn(engine, fast)), [prompt, seed, expand], [slow, quick, note],
                 api_name="compare_fast", concurrency_id=engine.device_key, concurrency_limit=engine.concurrency,
                 preprocess=False)  # inputs checked by name in the handler (inputs.py)

