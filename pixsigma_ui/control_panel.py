"""The Control input of the Generate tab (a ControlNet's control image: uploaded, or drawn on a canvas), its
preprocessed map beside the result, the ``control_*`` API parameters, and the Compare panel
"Σ vs Σ + ControlNet" (API ``/compare_control``).

The handlers run with ``preprocess=False``, so an image arrives as gradio's raw payload: an ImageEditor value
(``background``/``layers``/``composite``), a FileData dict, or a path. Only files inside gradio's upload folder
are read (a payload naming any other file on the server is refused).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import gradio as gr
from PIL import Image

from pixsigma.control import (
    CONTROL_TYPES,
    check_control_scale,
    check_control_type,
    control_map,
    default_control_type,
)
from pixsigma.controlnet_weights import load_controlnet
from pixsigma.pipeline import GenerationRequest
from pixsigma_ui.aspects import bucket_size
from pixsigma_ui.engine import MAIN, MAX_SEED, AppEngine, Done
from pixsigma_ui.inputs import (
    RANDOM_SEED,
    as_bool,
    as_float,
    as_int,
    as_text,
    guarded,
    open_upload,
    resolve_seed,
    upload_path,
)

SCALE_RANGE = (0.0, 2.0)  # the slider's; the API accepts what the pipeline does (0-4)
CANVAS = (256, 256)


def has_controlnet(engine: AppEngine) -> bool:
    return getattr(engine.pipes[MAIN], "controlnet", None) is not None


def attach_controlnet(engine: AppEngine, path: str) -> None:
    """Load ``path`` (any ControlNet layout) for the main model of the engine, or of each engine of a pool."""
    for e in getattr(engine, "engines", [engine]):
        pipe = e.pipes[MAIN]
        pipe.controlnet = load_controlnet(path, pipe.transformer)


def read_control_image(value: Any) -> Image.Image | None:
    """The control image in a handler's raw input (None: no control). An ImageEditor value gives its composite
    (the upload with what was drawn on it), else its background."""
    if isinstance(value, dict) and ("composite" in value or "background" in value):
        value = value.get("composite") or value.get("background")
    if isinstance(value, Image.Image):
        image = value.convert("RGB")
    else:
        image = open_upload(upload_path(value, "control_image"), "control_image")
    if image is None or image.getextrema() in (((0, 0),) * 3, ((255, 255),) * 3):
        return None  # no image, or an empty canvas: no control
    return image


def engine_control_type(engine: AppEngine) -> str:
    """The control type the app's ControlNet was trained on (its folder's), else canny: the inputs' default."""
    return default_control_type(getattr(engine.pipes[MAIN], "controlnet", None))


def with_control(engine: AppEngine, request: GenerationRequest, image: Any, control_type: Any,
                 control_scale: Any) -> GenerationRequest:
    """``request`` with the control fields (unchanged when no image is given)."""
    kind = check_control_type(as_text(control_type, "control_type") or engine_control_type(engine))
    scale = check_control_scale(as_float(control_scale, "control_scale"))
    img = read_control_image(image)
    if img is None:
        return request
    if not has_controlnet(engine):
        raise ValueError("this model has no ControlNet: start the app with --controlnet PATH (or use a model folder "
                         "that ships one) to use a control image")
    return replace(request, control_image=img, control_type=kind, control_scale=scale)


def preview_map(image: Any, control_type: Any, aspect_ratio: Any, resolution: Any) -> Image.Image | None:
    """The preprocessed map for the current inputs, at the bucket the request will be generated at."""
    try:
        img = read_control_image(image)
        if img is None:
            return None
        h, w = bucket_size(str(aspect_ratio), int(resolution))
        return control_map(img, check_control_type(str(control_type)), w, h)[0]
    except (ValueError, TypeError):
        return None


def build_control_inputs(engine: AppEngine) -> list[gr.components.Component]:
    """The Control accordion of the Generate tab (inside its left column): [image, type, scale]."""
    ready = has_controlnet(engine)
    with gr.Accordion("Control (ControlNet)", open=False, elem_id="control"):
        gr.Markdown("Upload an image or draw a sketch; the ControlNet follows its map. "
                    + ("" if ready else "**This model has no ControlNet**: start the app with `--controlnet PATH`."))
        image = gr.ImageEditor(label="Control image (upload or draw)", type="pil", canvas_size=CANVAS,
                               brush=gr.Brush(colors=["#000000", "#ffffff"], default_size=3),
                               elem_id="control-image", interactive=ready)
        with gr.Row():
            kind = gr.Radio(list(CONTROL_TYPES), value=engine_control_type(engine), label="Control type",
                            elem_id="control-type",
                            info="canny: edges of the image (canny-thick: 5 px wide, the demo's); regions: flat "
                                 "colour regions; raw: the image is the map")
            scale = gr.Slider(*SCALE_RANGE, value=1.0, step=0.05, label="Control scale", elem_id="control-scale")
    return [image, kind, scale]


def build_control_map(control: list[gr.components.Component], aspect: gr.components.Component,
                      resolution: gr.components.Component) -> gr.Image:
    """The preprocessed map beside the result (inside the result column), kept in step with the inputs."""
    shown = gr.Image(label="Control map (what the ControlNet reads)", format="png", interactive=False,
                     elem_id="control-map", height=256)
    image, kind, _ = control
    gr.on([image.change, image.upload, image.apply, kind.change, aspect.change, resolution.change], preview_map,
          [image, kind, aspect, resolution], shown, queue=False, api_visibility="private", preprocess=False)
    return shown


# -- Compare: Σ vs Σ + ControlNet ------------------------------------------------------------------------------
def make_compare_control_fn(engine: AppEngine) -> Callable[..., Iterator[tuple]]:
    """Handler yielding (Σ, Σ + ControlNet, control map, note) as each run finishes."""
    sigma = engine.info(MAIN)

    def compare_control(prompt: str, control_image: Any = None, control_type: str = "",
                        control_scale: float = 1.0, seed: int = 0, steps: int = sigma.steps,
                        expand_prompt: bool = True) -> Iterator[tuple]:
        prompt, seed, steps = as_text(prompt, "prompt"), resolve_seed(seed), as_int(steps, "steps")
        plain = engine.make_request(prompt, steps=steps, seed=seed, expand_prompt=as_bool(expand_prompt,
                                                                                         "expand_prompt"))
        controlled = with_control(engine, plain, control_image, control_type, control_scale)
        if controlled is plain:
            raise ValueError("control_image: upload or draw a control image to compare with")
        a: Done = engine.run(plain)
        yield a.result.images[0], gr.skip(), gr.skip(), f"Σ {a.result.seconds:.2f} s"
        b: Done = engine.run(controlled)
        note = (f"Σ {a.result.seconds:.2f} s · Σ + ControlNet ({controlled.control_type}, scale "
                f"{controlled.control_scale:g}) {b.result.seconds:.2f} s")
        yield a.result.images[0], b.result.images[0], b.result.control_map, note

    return guarded(compare_control)


def build_compare_control(engine: AppEngine, gpu: Callable = lambda fn: fn) -> None:
    """The Compare panel "Σ vs Σ + ControlNet" (inside the Compare tab)."""
    sigma = engine.info(MAIN)
    gr.Markdown("### PixArt-Σ vs PixArt-Σ + ControlNet")
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", lines=2, scale=3, elem_id="cc-prompt")
        with gr.Column(scale=2):
            image = gr.ImageEditor(label="Control image (upload or draw)", type="pil", canvas_size=CANVAS,
                                   brush=gr.Brush(colors=["#000000", "#ffffff"], default_size=3), elem_id="cc-image",
                                   interactive=has_controlnet(engine))
            with gr.Row():
                kind = gr.Radio(list(CONTROL_TYPES), value=engine_control_type(engine), label="Control type")
                scale = gr.Slider(*SCALE_RANGE, value=1.0, step=0.05, label="Control scale")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, minimum=RANDOM_SEED, maximum=MAX_SEED, label="Seed")
                steps = gr.Slider(1, engine.limits.max_steps, value=min(sigma.steps, engine.limits.max_steps),
                                  step=1, label="Steps")
            expand = gr.Checkbox(value=True, label="Expand the prompt", visible=sigma.prompt_expander is not None)
    button = gr.Button("Compare with ControlNet", elem_id="cc-run", interactive=has_controlnet(engine))
    with gr.Row():
        plain = gr.Image(label="Sigma", format="png", elem_id="cc-plain")
        controlled = gr.Image(label="Sigma + ControlNet", format="png", elem_id="cc-controlled")
        shown = gr.Image(label="Control map", format="png", elem_id="cc-map")
    note = gr.Markdown()
    button.click(gpu(make_compare_control_fn(engine)), [prompt, image, kind, scale, seed, steps, expand],
                 [plain, controlled, shown, note], api_name="compare_control", concurrency_id=engine.device_key,
                 concurrency_limit=engine.concurrency, preprocess=False)
