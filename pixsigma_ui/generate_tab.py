"""The Generate tab: prompt and settings in, a live preview while denoising, PNGs with their parameters out.

:func:`make_generate_fn` is the handler (also the ``/generate`` API endpoint); it turns UI
values into an engine request, streams previews, and saves each image with
``pixsigma.io.save_png``. Bad input becomes ``gr.Error`` (what is accepted), prompt
problems ``gr.Warning`` (tokens dropped, unknown words).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from pixsigma.config import KV_OPERATORS, parse_layers
from pixsigma.edit import IMG2IMG_STRENGTH
from pixsigma.io import save_png
from pixsigma.pipeline import SAMPLERS
from pixsigma_ui.aspects import aspect_choices, parse_aspect
from pixsigma_ui.control_panel import build_control_inputs, build_control_map, with_control
from pixsigma_ui.edit_panel import build_edit_inputs, with_edit
from pixsigma_ui.engine import GUIDANCE_RANGE, KV_RATIOS, MAIN, MAX_SEED, AppEngine, Done, Step, layers_spec
from pixsigma_ui.fast_mode import build_fast_toggle, link_fast_toggle
from pixsigma_ui.inputs import RANDOM_SEED, as_bool, as_float, as_int, as_text, cap, guarded, resolve_seed
from pixsigma_ui.lora_panel import build_lora_picker, resolve_loras
from pixsigma_ui.model_picker import build_model_picker, check_model, link_resolution, resolution_for
from pixsigma_ui.retention import Retention, prune
from pixsigma_ui.styles import NO_STYLE, examples_for, style_by_name, styles_for

KV_MODES = (("the model's own", "model"), ("off (full attention)", "off"), ("on", "on"))
PREVIEWS_PER_RUN = 5  # previews cost a gallery update each; a handful shows the image forming


def format_bytes(n: int | None) -> str:
    if not n:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def summary(done: Done) -> str:
    """The line under the result: size, seed, steps, time and peak memory."""
    r, p = done.result, done.result.params
    kind = f" ({done.memory_kind})" if done.memory_kind else ""
    line = (f"{r.width}×{r.height} px · seed {r.seed} · {p.get('steps')} steps · {p.get('sampler')} · "
            f"**{r.seconds:.2f} s** · peak memory {format_bytes(done.peak_memory_bytes)}{kind}")
    return line + expansion_note(p)


def expansion_note(params: dict[str, Any]) -> str:
    """What the model read when its prompt expander rewrote the prompt (one line per distinct rewrite)."""
    read = list(dict.fromkeys(params.get("expanded_prompts", [])))
    return "".join(f"\n\nthe model read (prompt expanded): *{t}*" for t in read)


def save_images(done: Done, folder: Path, extra: dict[str, Any]) -> list[str]:
    """Each image as a PNG carrying its parameters; names unique across concurrent users."""
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    paths = []
    for i, image in enumerate(done.result.images):
        params = {**done.result.params, **extra, "image_index": i}
        paths.append(str(save_png(image, folder / f"{stamp}-{done.result.seed}-{i}.png", params)))
    return paths


def make_generate_fn(engine: AppEngine, outputs: Path, keep: Retention | None = None) -> Callable[..., Iterator[tuple]]:
    """The handler; its parameter names are the API's (``gradio_client`` ``predict(prompt=..., ...)``).
    ``keep``: the outputs folder is pruned to it after each save."""
    info = engine.info(MAIN)

    def generate(prompt: str, negative_prompt: str = "", style: str = NO_STYLE, aspect_ratio: str = "1:1",
                 resolution: int = info.resolution, steps: int = info.steps, guidance: float = info.guidance,
                 sampler: str = "default", seed: int = 0, randomize_seed: bool = True, num_images: int = 1,
                 kv_mode: str = "model", kv_ratio: int = 2, kv_layers: str = "", kv_operator: str = "conv",
                 expand_prompt: bool = True,
                 init_image: Any = None, mask: Any = None, strength: float = IMG2IMG_STRENGTH,  # edit_panel
                 loras: str = "",
                 control_image: Any = None, control_type: str = "", control_scale: float = 1.0,  # control_panel
                 model: str = MAIN,  # last (HELPERS.md order): main, alpha or run:NAME (model_picker.py)
                 progress: gr.Progress = gr.Progress()) -> Iterator[tuple]:  # noqa: B008 - gradio's injection idiom
        model = check_model(engine, model)
        prompt, negative_prompt = as_text(prompt, "prompt"), as_text(negative_prompt, "negative_prompt")
        styled, negative = style_by_name(as_text(style, "style"), info.is_xl).apply(prompt, negative_prompt)
        seed = resolve_seed(seed, randomize_seed)
        if kv_mode == "on":
            kv = engine.kv_setting(kv_mode, as_int(kv_ratio, "kv_ratio"),
                                   parse_layers(as_text(kv_layers, "kv_layers"), info.depth), kv_operator)
        else:
            kv = engine.kv_setting(kv_mode)
        request = engine.make_request(
            styled if prompt.strip() else "", negative_prompt=negative,
            aspect_ratio=parse_aspect(aspect_ratio),
            resolution=resolution_for(engine, model, as_int(resolution, "resolution"), info.resolution), model=model,
            steps=as_int(steps, "steps"), guidance=as_float(guidance, "guidance"), sampler=sampler, seed=seed,
            num_images=as_int(num_images, "num_images"), kv=kv, expand_prompt=as_bool(expand_prompt, "expand_prompt"),
            loras=resolve_loras(loras))
        request = with_edit(request, init_image, mask, strength, as_int(resolution, "resolution"))
        request = with_control(engine, request, control_image, control_type, control_scale)
        unknown = engine.unknown_words(styled, model)
        if unknown:
            words = ", ".join(unknown)
            gr.Warning(cap(f"{len(unknown)} word(s) unknown to {info.name}, which it cannot draw: {words}"))
        every = max(1, request.steps // PREVIEWS_PER_RUN)
        done = None
        for event in engine.stream(request, model, preview_every=every):
            if isinstance(event, Step):
                progress((event.step, event.total), desc="denoising")
                if event.previews:
                    shown = [(p.resize((request.width, request.height), Image.BILINEAR),
                              f"step {event.step}/{event.total}") for p in event.previews]
                    yield shown, f"denoising… step {event.step}/{event.total}", gr.skip(), gr.skip()
            elif isinstance(event, Done):
                done = event
        for warning in done.result.warnings:
            gr.Warning(cap(warning))
        paths = save_images(done, outputs, {"style": style or NO_STYLE, "user_prompt": prompt,
                                            **({"model": model} if model != MAIN else {})})
        if keep is not None:
            prune(outputs, keep)
        yield paths, summary(done), paths, done.result.seed

    return guarded(generate)


def build_generate_tab(engine: AppEngine, outputs: Path, gpu: Callable = lambda fn: fn,
                       keep: Retention | None = None) -> None:
    """The tab's components and events (call inside ``gr.Blocks``/``gr.Tab``)."""
    info, lim = engine.info(MAIN), engine.limits
    kv = info.suggested_kv
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Describe the image…", elem_id="prompt")
            negative = gr.Textbox(value="", label="Negative prompt", lines=1)
            style = gr.Dropdown([s.name for s in styles_for(info.is_xl)], value=NO_STYLE, label="Style")
            with gr.Row():
                resolution = gr.Dropdown(list(info.resolutions), value=info.resolution, label="Base resolution")
                aspect = gr.Dropdown(aspect_choices(info.resolution), value="1:1", label="Aspect ratio (w:h)")
            with gr.Row():
                steps = gr.Slider(1, lim.max_steps, value=min(info.steps, lim.max_steps), step=1, label="Steps")
                guidance = gr.Slider(*GUIDANCE_RANGE, value=info.guidance, step=0.5, label="Guidance")
            with gr.Row():
                sampler = gr.Dropdown(list(SAMPLERS), value="default", label="Sampler")
                num_images = gr.Slider(1, lim.max_images, value=1, step=1, label="Images")
            fast = build_fast_toggle(engine)  # "Fast (4 steps)" where the model has a consistency adapter
            with gr.Row():
                seed = gr.Number(value=0, precision=0, minimum=RANDOM_SEED, maximum=MAX_SEED, label="Seed",
                                 info="-1: a random seed")
                randomize = gr.Checkbox(value=True, label="Randomize seed")
            expand = gr.Checkbox(value=True, label="Expand prompt: write a short prompt as the dense caption "
                                 "this model was trained on (what it read is shown with the result)",
                                 visible=info.prompt_expander is not None, elem_id="expand")
            edit = build_edit_inputs(resolution)
            loras = build_lora_picker()
            link_fast_toggle(engine, fast, steps, guidance, sampler, loras)
            with gr.Accordion("KV token compression", open=False):
                gr.Markdown(f"{info.name}: layers 0–{info.depth - 1}; own setting: "
                            + (f"R={info.kv.ratio} on {layers_spec(info.kv.layers)}" if info.kv.active else "off"))
                kv_mode = gr.Radio(list(KV_MODES), value="model", label="KV compression")
                with gr.Row():
                    kv_ratio = gr.Slider(*KV_RATIOS, value=kv.ratio, step=1, label="R (KV ratio)")
                    kv_layers = gr.Textbox(value=layers_spec(kv.layers), label="Layers")
                    kv_operator = gr.Dropdown(list(KV_OPERATORS), value=kv.operator, label="Operator")
            control = build_control_inputs(engine)
            model = build_model_picker(engine, "generate-model")
            link_resolution(engine, model, resolution)  # model_picker.py
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images", format="png", columns=2, height=520, elem_id="gallery",
                                 buttons=["download", "fullscreen"])
            stats = gr.Markdown(label="info", elem_id="stats")
            files = gr.File(label="Download PNG (parameters embedded)", file_count="multiple", elem_id="files")
            build_control_map(control, aspect, resolution)
    gr.Examples([[p] for p in examples_for(info.is_xl)], inputs=[prompt], label="Example prompts")

    resolution.change(lambda r: gr.Dropdown(choices=aspect_choices(int(r))), resolution, aspect,
                      queue=False, api_visibility="private")
    inputs = [prompt, negative, style, aspect, resolution, steps, guidance, sampler, seed, randomize, num_images,
              kv_mode, kv_ratio, kv_layers, kv_operator, expand,
              *edit, loras, *control, model]  # the API order: edit, loras, control, model last
    outputs_ = [gallery, stats, files, seed]
    gr.on([button.click, prompt.submit], gpu(make_generate_fn(engine, outputs, keep)), inputs, outputs_,
          api_name="generate", concurrency_id=engine.device_key, concurrency_limit=engine.concurrency,
          show_progress_on=[gallery], preprocess=False)  # inputs checked by name in the handler (inputs.py)
