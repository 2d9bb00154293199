"""diffusers' face of :class:`pixsigma.pipeline.PixSigmaPipeline`: ``pipe(...)`` takes
``PixArtSigmaPipeline.__call__``'s arguments with their meaning and gives its outputs, ``pipe.to(device)``, and
``from_pretrained(…, torch_dtype=…)``'s name for the dtype.

Every call becomes one :class:`pixsigma.request.GenerationRequest` (the one validated form) run by ``generate``
through the same stack: diffusers' tensors (``latents``, ``prompt_embeds`` …) and generators are request fields.
Where diffusers' defaults are written as None here they mean diffusers' value for a diffusers folder:
``num_inference_steps`` 20 and ``guidance_scale`` 4.5 (a pixsigma folder's ``sampling.json`` may set its own),
``max_sequence_length`` 300 (the model's own token length: 120 for a PixArt-α folder). pixsigma's extras (image,
mask, strength, control, loras, kv, sampler, guidance interval, prompt expansion) are keyword arguments beside them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from pixsigma.config import KVCompress
from pixsigma.device import resolve_device
from pixsigma.lora import LoraSpec
from pixsigma.request import SEED_RANGE, GenerationRequest, GenerationResult, generators

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
TENSOR_INPUTS = ("latents",)  # what a step-end callback can read (and replace)


@dataclass
class PipelineOutput:
    """diffusers' ``ImagePipelineOutput``: ``images`` (PIL images, a (B, H, W, 3) float array in [0, 1] for
    ``output_type="np"``, a (B, 3, H, W) tensor in [0, 1] for ``"pt"``, the (B, C, h, w) latents for ``"latent"``)."""

    images: Any


def one_image(value: Any, name: str) -> Image.Image | None:
    """A PIL image (or a list holding one) as the request's image; anything else is refused naming ``name``."""
    if isinstance(value, list | tuple) and len(value) == 1:
        value = value[0]
    if value is None or isinstance(value, Image.Image):
        return value
    raise ValueError(f"{name} must be a PIL image (or a list of one), got {type(value).__name__}")


def convert_output(result: GenerationResult, output_type: str) -> Any:
    """A result as diffusers' ``image_processor.postprocess`` gives ``output_type``."""
    if output_type == "latent":
        return result.latents
    if output_type == "pil":
        return result.images
    if result.pixels is not None:  # the decoded images themselves, not their 8-bit rounding
        pt = (result.pixels.float() / 2 + 0.5).clamp(0, 1).cpu()
    else:  # pasted onto the input (inpainting): the output is the PIL image
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in result.images])
        pt = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return pt if output_type == "pt" else pt.permute(0, 2, 3, 1).numpy()


def step_callbacks(pipe: Any, callback: Callable | None, callback_steps: int, on_step_end: Callable | None,
                   tensor_inputs: list[str] | None) -> Callable[[int, torch.Tensor, torch.Tensor], Any] | None:
    """The stack's step hook calling diffusers' ``callback_on_step_end(pipe, i, t, {"latents": …})`` (latents it
    returns replace the loop's) and then the old ``callback(i, t, latents)`` every ``callback_steps`` steps (the
    samplers here are first order: a step is a step)."""
    if callback is None and on_step_end is None:
        return None
    inputs = list(tensor_inputs or TENSOR_INPUTS)

    def on_step(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        if on_step_end is not None:
            out = on_step_end(pipe, i, t, {k: latents for k in inputs})
            if isinstance(out, dict) and out.get("latents") is not None:
                latents = out["latents"]
        if callback is not None and i % callback_steps == 0:
            callback(i, t, latents)
        return latents

    return on_step


class DiffusersCall:
    """Mixed into ``PixSigmaPipeline``: diffusers' call and ``to``."""

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = "",
                 num_inference_steps: int | None = None, timesteps: list[int] | None = None,
                 sigmas: list[float] | None = None, guidance_scale: float | None = None,
                 num_images_per_prompt: int | None = 1, height: int | None = None, width: int | None = None,
                 eta: float = 0.0, generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 prompt_attention_mask: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_attention_mask: torch.Tensor | None = None, output_type: str | None = "pil",
                 return_dict: bool = True, callback: Callable[[int, int, torch.Tensor], None] | None = None,
                 callback_steps: int = 1, clean_caption: bool = True, use_resolution_binning: bool = True,
                 max_sequence_length: int | None = None, *,
                 callback_on_step_end: Callable[..., Any] | None = None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None,
                 image: Image.Image | None = None, mask_image: Image.Image | None = None,
                 strength: float | None = None, control_image: Image.Image | None = None,
                 control_type: str | None = None, control_scale: float = 1.0, loras: str | list | None = None,
                 kv: KVCompress | None = None, sampler: str | None = None,
                 guidance_interval: tuple[float, float] | None = None,
                 expand_prompt: bool = True) -> PipelineOutput | tuple:
        """diffusers' ``PixArtSigmaPipeline.__call__`` (see the module docstring for the defaults written None);
        with ``image`` (and ``strength``) image-to-image, with ``mask_image`` too inpainting (white = repaint;
        ``pixsigma.edit``); ``control_image`` for the pipeline's ControlNet; ``loras``/``kv`` for this call only."""
        output_type = output_type or "pil"
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        bad = sorted(set(callback_on_step_end_tensor_inputs or ()) - set(TENSOR_INPUTS))
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {bad} are not offered; accepted: {TENSOR_INPUTS}")
        if not isinstance(callback_steps, int) or isinstance(callback_steps, bool) or callback_steps < 1:
            raise ValueError(f"callback_steps must be a positive integer, got {callback_steps!r}")
        gens = generators(generator)
        req = GenerationRequest(
            prompt, "" if negative_prompt is None else negative_prompt, width, height, num_inference_steps,
            guidance_scale, sampler, None if gens is None else gens[0].initial_seed() % SEED_RANGE,
            num_images_per_prompt or 1, use_resolution_binning, kv=kv, guidance_interval=guidance_interval,
            expand_prompt=expand_prompt, loras=loras, control_image=one_image(control_image, "control_image"),
            control_type=control_type, control_scale=control_scale, init_image=one_image(image, "image"),
            mask=one_image(mask_image, "mask_image"), strength=strength,
            timesteps=None if timesteps is None else tuple(timesteps),
            sigmas=None if sigmas is None else tuple(sigmas), eta=eta, max_sequence_length=max_sequence_length,
            clean_caption=clean_caption, decode=output_type != "latent", latents=latents,
            prompt_embeds=prompt_embeds, prompt_attention_mask=prompt_attention_mask,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_prompt_attention_mask=negative_prompt_attention_mask, generator=generator)
        on_step = step_callbacks(self, callback, callback_steps, callback_on_step_end,
                                 callback_on_step_end_tensor_inputs)
        out = convert_output(self.generate(req, on_step=on_step), output_type)
        return PipelineOutput(out) if return_dict else (out,)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> DiffusersCall:
        """Every part onto ``device`` (an offloaded T5 stays in host memory until it encodes); returns the
        pipeline. The dtype is chosen at load (``from_pretrained(torch_dtype=…)``) and cannot change here."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if dtype is not None and dtype != self.dtype:
            raise ValueError(f"the pipeline runs in {self.dtype}; load it again with "
                             f"from_pretrained(..., torch_dtype={dtype}) to change that")
        if device is None:
            return self
        dev = resolve_device(str(device))
        for part in (self.transformer, self.vae, self.controlnet):
            if part is not None:
                part.to(dev)
        if not self.offload_t5:
            self.text_encoder.to(dev)
        self.device = dev
        self._text_cache = type(self._text_cache)((k, (e.to(dev), m.to(dev))) for k, (e, m) in self._text_cache.items())
        self.loras.set([LoraSpec(p, s) for p, s in self.loras.active])  # the adapters' tensors follow the DiT
        return self
