"""The Generate tab's input image (image-to-image; painting over it marks what to repaint: inpainting), its strength
slider, and the ``init_image, mask, strength`` API parameters.

``init_image`` is the editor's value (``background`` = the image, its brush ``layers`` = the mask: any painted
pixel is repainted) or a plain uploaded image; ``mask`` (API only: a black/white image, white = repaint, any size)
replaces the painted mask when given. The output takes the input's aspect ratio (the bucket nearest to it at the
chosen base resolution). Handlers run with ``preprocess=False``; only files in gradio's upload folder are read
(``inputs.upload_path``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from pixsigma.buckets import nearest_bucket
from pixsigma.edit import IMG2IMG_STRENGTH, check_strength
from pixsigma.pipeline import GenerationRequest
from pixsigma_ui.inputs import as_float, open_upload, upload_path

STRENGTH_STEP = 0.05


def _image(value: Any, name: str, mode: str = "RGB") -> Image.Image | None:
    if isinstance(value, Image.Image):
        return value.convert(mode)
    return open_upload(upload_path(value, name), name, mode)


def painted_mask(layers: list | None) -> Image.Image | None:
    """The editor's brush layers as one "L" mask (white where anything was painted); None when nothing was."""
    union = None
    for layer in layers or []:
        alpha = np.asarray(_image(layer, "init_image layer", "RGBA"))[..., 3] > 0  # (H, W)
        if union is not None and alpha.shape != union.shape:
            alpha = np.asarray(Image.fromarray(alpha).resize(union.shape[::-1])) > 0
        union = alpha if union is None else union | alpha
    if union is None or not union.any():
        return None
    return Image.fromarray(union.astype(np.uint8) * 255)


def read_edit_inputs(init_image: Any, mask: Any) -> tuple[Image.Image | None, Image.Image | None]:
    """(the input image, the mask) of a handler's raw inputs; (None, None): text-to-image."""
    painted = None
    if isinstance(init_image, dict) and ("background" in init_image or "layers" in init_image):
        painted = painted_mask(init_image.get("layers"))
        init_image = init_image.get("background")
    image = _image(init_image, "init_image")
    explicit = _image(mask, "mask", "L")
    if image is None:
        if explicit is not None:
            raise ValueError("mask needs an init_image: the image whose white-masked part is repainted")
        return None, None
    return image, explicit if explicit is not None else painted


def with_edit(request: GenerationRequest, init_image: Any, mask: Any, strength: Any,
              resolution: int) -> GenerationRequest:
    """``request`` with the edit fields (unchanged without an input image), sized to the input's aspect ratio."""
    strength = check_strength(as_float(strength, "strength"))
    image, mask_image = read_edit_inputs(init_image, mask)
    if image is None:
        return request
    height, width = nearest_bucket(image.height, image.width, resolution)
    return replace(request, init_image=image, mask=mask_image, strength=strength, width=width, height=height)


def output_size_note(init_image: Any, resolution: Any) -> str:
    """What the editor shows under an uploaded image: the output size it gives at ``resolution``."""
    try:
        image, _ = read_edit_inputs(init_image, None)
        base = int(resolution)
    except (TypeError, ValueError):
        return ""
    if image is None:
        return ""
    height, width = nearest_bucket(image.height, image.width, base)
    return f"Output {width}×{height} px: the input's aspect ratio at the {base} px base resolution."


def build_edit_inputs(resolution: gr.components.Component) -> list[gr.components.Component]:
    """The "Input image" accordion of the Generate tab (inside its left column): [image, mask (hidden, API only),
    strength]; ``resolution`` is the tab's base-resolution dropdown (the output-size note reads it)."""
    with gr.Accordion("Input image (image-to-image, inpainting)", open=False, elem_id="edit"):
        gr.Markdown("Upload an image to redraw it from the prompt; paint over a part to repaint only that part "
                    "(pixels more than 8 px from the paint stay exactly as they are). The output takes the "
                    "image's aspect ratio.")
        image = gr.ImageEditor(label="Input image (paint = repaint)", type="pil", sources=["upload", "clipboard"],
                               brush=gr.Brush(colors=["#ff00ff"], default_size=24), layers=False,
                               format="png", elem_id="init-image")  # png: the input's pixels arrive exactly
        mask = gr.Image(label="Mask (white = repaint)", type="pil", visible=False, elem_id="edit-mask")
        strength = gr.Slider(STRENGTH_STEP, 1.0, value=IMG2IMG_STRENGTH, step=STRENGTH_STEP, label="Strength",
                             info="how far the input is noised: small keeps it nearly as it is, 1 redraws it "
                                  "from almost pure noise (to repaint a painted part freely, as the CLI does "
                                  "with a mask, set 1)", elem_id="strength")
        note = gr.Markdown(elem_id="edit-size")
    # the editor only sends an upload to the server when a listener asks for it: without one the image is dropped
    gr.on([image.upload, resolution.change], output_size_note, [image, resolution], note, queue=False,
          api_visibility="private", preprocess=False)
    return [image, mask, strength]
