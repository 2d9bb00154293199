"""The Compare tab: one prompt and seed through PixArt-α and PixArt-Σ, and through Σ with and without KV
compression, each panel labelled with its latency, with a slider and a difference view.

Runs that are the same request (Σ's own setting is "off", or equals the KV setting asked)
are made once and shown twice, so the latencies on screen are never of a cached image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import gradio as gr
import numpy as np
from PIL import Image

from pixsigma.config import KVCompress, parse_layers
from pixsigma_ui.aspects import ASPECTS, parse_aspect
from pixsigma_ui.control_panel import build_compare_control
from pixsigma_ui.engine import ALPHA, KV_RATIOS, MAIN, MAX_SEED, AppEngine, Done, layers_spec
from pixsigma_ui.fast_mode import build_compare_fast
from pixsigma_ui.generate_tab import expansion_note
from pixsigma_ui.inputs import RANDOM_SEED, as_bool, as_int, as_text, guarded, resolve_seed
from pixsigma_ui.model_picker import build_model_picker, check_run, run_panel
from pixsigma_ui.styles import examples_for

DIFF_GAIN = 4  # |Σ − Σ_kv| is small; ×4 makes it visible


def difference(a: Image.Image, b: Image.Image) -> Image.Image:
    """|a − b| × DIFF_GAIN per channel (b resized to a's size if they differ)."""
    if a.size != b.size:
        b = b.resize(a.size, Image.BILINEAR)
    d = np.abs(np.asarray(a.convert("RGB"), dtype=np.int16) - np.asarray(b.convert("RGB"), dtype=np.int16))
    return Image.fromarray(np.clip(d * DIFF_GAIN, 0, 255).astype(np.uint8))


def panel_label(title: str, done: Done) -> str:
    r = done.result
    return f"{title} · {r.width}×{r.height} · {r.seconds:.2f} s"


def make_compare_fn(engine: AppEngine) -> Callable[..., Iterator[tuple]]:
    """Handler yielding the nine outputs as each run finishes (α, Σ, α|Σ slider, note, Σ full, Σ KV, diff, note,
    your run: ``model``, a finished run through the same prompt and seed; none when empty)."""
    sigma = engine.info(MAIN)
    alpha = engine.info(ALPHA) if engine.has(ALPHA) else None

    def compare(prompt: str, seed: int = 0, steps: int = sigma.steps, aspect_ratio: str = "1:1",
                kv_ratio: int = 2, kv_layers: str = "", expand_prompt: bool = True,
                model: str = "",  # last: a finished run (run:NAME, model_picker.py) beside α and Σ
                progress: gr.Progress = gr.Progress(),  # noqa: B008
                ) -> Iterator[tuple]:
        prompt, seed, steps = as_text(prompt, "prompt"), resolve_seed(seed), as_int(steps, "steps")
        kv = engine.kv_setting("on", as_int(kv_ratio, "kv_ratio"),
                               parse_layers(as_text(kv_layers, "kv_layers"), sigma.depth), sigma.suggested_kv.operator)
        common = dict(aspect_ratio=parse_aspect(aspect_ratio), steps=steps, seed=seed,
                      expand_prompt=as_bool(expand_prompt, "expand_prompt"))  # each model's own expander: Σ's
        runs = {"sigma": (MAIN, engine.make_request(prompt, kv=None, **common)),
                "full": (MAIN, engine.make_request(prompt, kv=KVCompress(), **common)),
                "kv": (MAIN, engine.make_request(prompt, kv=kv, **common))}
        if alpha is not None:
            runs["alpha"] = (ALPHA, engine.make_request(prompt, model=ALPHA, **common))
        run = check_run(engine, model)
        if run:
            runs["run"] = (run, engine.make_request(prompt, model=run, **common))
        own = sigma.kv if sigma.kv.active else KVCompress()
        same_as = {"sigma": "full" if not own.active else ("kv" if own == kv else None)}
        order = [k for k in ("alpha", "full", "kv", "sigma", "run") if k in runs and not same_as.get(k)]
        done: dict[str, Done] = {}
        out = [gr.skip()] * 9
        for i, key in enumerate(order):
            progress((i, len(order)), desc=f"run {i + 1}/{len(order)}")
            model, request = runs[key]
            done[key] = engine.run(request, model)
            if key == "sigma" or same_as.get("sigma") == key:
                done["sigma"] = done[key]
            out = _panels(done, alpha.name if alpha else None, sigma.name, kv) + [run_panel(engine, run, done)]
            yield tuple(out)

    return guarded(compare)


def _panels(done: dict[str, Done], alpha_name: str | None, sigma_name: str, kv: KVCompress) -> list:
    out: list = [gr.skip()] * 8
    a, s, f, k = (done.get(x) for x in ("alpha", "sigma", "full", "kv"))
    if a:
        out[0] = gr.Image(a.result.images[0], label=panel_label(f"PixArt-α ({alpha_name})", a))
    if s:
        out[1] = gr.Image(s.result.images[0], label=panel_label(f"PixArt-Σ ({sigma_name})", s))
    if a and s:
        sa, ss = a.result.images[0], s.result.images[0]
        out[2] = (sa.resize(ss.size, Image.BILINEAR) if sa.size != ss.size else sa, ss)
        out[3] = (f"α {a.result.seconds:.2f} s · Σ {s.result.seconds:.2f} s "
                  f"(α drawn at {sa.width}×{sa.height}, its own base resolution)") + expansion_note(s.result.params)
    elif s and alpha_name is None:
        out[3] = "No PixArt-α model loaded: start the app with `--alpha-model` to compare."
    if f:
        out[4] = gr.Image(f.result.images[0], label=panel_label("Σ full attention", f))
    if k:
        out[5] = gr.Image(k.result.images[0], label=panel_label(f"Σ KV R={kv.ratio} ({kv.operator})", k))
    if f and k:
        out[6] = difference(f.result.images[0], k.result.images[0])
        speed = f.result.seconds / max(k.result.seconds, 1e-9)
        out[7] = (f"full attention {f.result.seconds:.2f} s · KV compression {k.result.seconds:.2f} s "
                  f"(×{speed:.2f}); difference shown ×{DIFF_GAIN}")
    return out


def build_compare_tab(engine: AppEngine, gpu: Callable = lambda fn: fn) -> None:
    sigma = engine.info(MAIN)
    kv = sigma.suggested_kv
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", lines=2, scale=3, elem_id="compare-prompt")
        with gr.Column(scale=2):
            with gr.Row():
                seed = gr.Number(value=0, precision=0, minimum=RANDOM_SEED, maximum=MAX_SEED, label="Seed",
                                 info="-1: a random seed")
                steps = gr.Slider(1, engine.limits.max_steps, value=min(sigma.steps, engine.limits.max_steps),
                                  step=1, label="Steps")
                aspect = gr.Dropdown(list(ASPECTS), value="1:1", label="Aspect ratio (w:h)")
            with gr.Row():
                kv_ratio = gr.Slider(*KV_RATIOS, value=kv.ratio, step=1, label="KV ratio R")
                kv_layers = gr.Textbox(value=layers_spec(kv.layers), label=f"KV layers (0–{sigma.depth - 1})")
            expand = gr.Checkbox(value=True, label="Expand Σ's prompt (into the dense caption it was trained on)",
                                 visible=sigma.prompt_expander is not None, elem_id="compare-expand")
            model = build_model_picker(engine, "compare-model", "Your run (beside α and Σ)", runs_only=True)
    button = gr.Button("Compare", variant="primary", elem_id="compare")
    gr.Markdown("### PixArt-α vs PixArt-Σ (and your run)")
    with gr.Row():
        alpha_img = gr.Image(label="PixArt-alpha", format="png", elem_id="alpha-image", visible=engine.has(ALPHA))
        sigma_img = gr.Image(label="PixArt-Sigma", format="png", elem_id="sigma-image")
        run_img = gr.Image(label="your run (pick one above)", format="png", elem_id="run-image")  # model_picker.py
        slider = gr.ImageSlider(label="alpha vs sigma", format="png", visible=engine.has(ALPHA))
    ab_note = gr.Markdown(label="alpha vs sigma latency")
    gr.Markdown("### PixArt-Σ: full attention vs KV token compression")
    with gr.Row():
        full_img = gr.Image(label="Sigma full attention", format="png", elem_id="full-image")
        kv_img = gr.Image(label="Sigma KV compression", format="png", elem_id="kv-image")
        diff_img = gr.Image(label=f"difference x{DIFF_GAIN}", format="png", elem_id="diff-image")
    kv_note = gr.Markdown(label="KV latency")
    gr.Examples([[p] for p in examples_for(sigma.is_xl)], inputs=[prompt], label="Example prompts")
    gr.on([button.click, prompt.submit], gpu(make_compare_fn(engine)),
          [prompt, seed, steps, aspect, kv_ratio, kv_layers, expand, model],
          [alpha_img, sigma_img, slider, ab_note, full_img, kv_img, diff_img, kv_note, run_img],
          api_name="compare", concurrency_id=engine.device_key, concurrency_limit=engine.concurrency,
          preprocess=False)  # inputs checked by name in the handler (inputs.py)
    build_compare_control(engine, gpu)  # Σ vs Σ + ControlNet (control_panel.py)
    build_compare_fast(engine, gpu)  # Σ vs Σ fast, with the model's consistency adapter (fast_mode.py)
