"""A diffusers-shaped face for :class:`pixsigma.pipeline.PixSigmaPipeline`: ``pipe(prompt, …).images``,
``pipe.to(device)`` and ``from_pretrained(…, torch_dtype=…)``'s name for the dtype.

Every call becomes one :class:`pixsigma.pipeline.GenerationRequest` (the one validated form) run by
``generate``, so ``pipe(prompt, generator=torch.Generator().manual_seed(s), …)`` is exactly
``pipe.generate(GenerationRequest(prompt, seed=s, …))``. A generator stands for its seed
(``generator.initial_seed()``): the noise is drawn afresh from that seed, as for a fresh generator in diffusers,
whatever was drawn from it before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from pixsigma.constants import DTYPE_NAMES

TORCH_DTYPES = dict(zip((torch.float32, torch.bfloat16, torch.float16), DTYPE_NAMES))
OUTPUT_TYPES = ("pil", "np", "pt")
TENSOR_INPUTS = ("latents",)  # what a step-end callback can read
SEED_RANGE = 2**63  # GenerationRequest's seeds


@dataclass
class PipelineOutput:
    """diffusers' ``ImagePipelineOutput``: ``images`` (PIL images, a (B, H, W, 3) float array in [0, 1] for
    ``output_type="np"``, or a (B, 3, H, W) tensor in [0, 1] for ``"pt"``)."""

    images: Any


def dtype_name(dtype: str | None, torch_dtype: torch.dtype | None) -> str | None:
    """The pipeline's dtype name from ``dtype`` and diffusers' ``torch_dtype`` (either may be given)."""
    if torch_dtype is None:
        return dtype
    if torch_dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown torch_dtype {torch_dtype!r}; accepted: torch.float32, torch.bfloat16, "
                         f"torch.float16")
    name = TORCH_DTYPES[torch_dtype]
    if dtype is not None and dtype != name:
        raise ValueError(f"dtype {dtype!r} and torch_dtype {torch_dtype} disagree: give one of them")
    return name


def seed_of(generator: torch.Generator | list | None) -> int | None:
    """The seed a call draws with: the generator's ``initial_seed()`` (None: a random one)."""
    if isinstance(generator, list | tuple):
        if len(generator) != 1:
            raise ValueError(f"generator: pass one torch.Generator (every image of a call is drawn from its seed), "
                             f"got a list of {len(generator)}")
        generator = generator[0]
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator.initial_seed() % SEED_RANGE


def one_image(value: Any, name: str) -> Image.Image | None:
    """A PIL image (or a list holding one) as the request's image; anything else is refused naming ``name``."""
    if isinstance(value, list | tuple) and len(value) == 1:
        value = value[0]
    if value is None or isinstance(value, Image.Image):
        return value
    raise ValueError(f"{name} must be a PIL image (or a list of one), got {type(value).__name__}")


def convert_output(images: list[Image.Image], output_type: str) -> Any:
    if output_type == "pil":
        return images
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])  # (B, H, W, 3)
    return arr if output_type == "np" else torch.from_numpy(arr).permute(0, 3, 1, 2)


class DiffusersCall:
    """Mixed into ``PixSigmaPipeline``: diffusers' call and ``to``."""

    def __call__(self, prompt: str | list[str], negative_prompt: str | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list | None = None, image: Image.Image | None = None,
                 mask_image: Image.Image | None = None, strength: float | None = None,
                 callback_on_step_end: Callable[..., Any] | None = None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None, output_type: str = "pil",
                 return_dict: bool = True, use_resolution_binning: bool = True, sampler: str | None = None,
                 expand_prompt: bool = True) -> PipelineOutput | tuple:
        """diffusers' ``PixArtSigmaPipeline.__call__``: text-to-image, or image-to-image with ``image`` and
        ``strength``, or inpainting with ``mask_image`` too (white = repaint; ``pixsigma.edit``).

        Unset steps and guidance are the model folder's (``sampling.json``), else the sampler's; ``strength`` None
        is diffusers' default (0.8 image-to-image, 1.0 inpainting). ``generator``: its ``initial_seed()`` is the
        seed. ``callback_on_step_end(pipe, i, t, {"latents": latents})`` is called after each step (its return
        value is not read: latents cannot be replaced). ``sampler`` and ``expand_prompt`` are pixsigma's own
        (``GenerationRequest``)."""
        from pixsigma.pipeline import GenerationRequest

        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        bad = sorted(set(callback_on_step_end_tensor_inputs or ()) - set(TENSOR_INPUTS))
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {bad} are not offered; accepted: {TENSOR_INPUTS}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be one string (it applies to every prompt), got "
                             f"{type(negative_prompt).__name__}")
        req = GenerationRequest(prompt, negative_prompt or "", width, height, num_inference_steps, guidance_scale,
                                sampler, seed_of(generator), num_images_per_prompt, use_resolution_binning,
                                expand_prompt=expand_prompt, init_image=one_image(image, "image"),
                                mask=one_image(mask_image, "mask_image"), strength=strength)
        callback = None if callback_on_step_end is None else self._step_end(req, callback_on_step_end)
        images = self.generate(req, callback).images
        out = convert_output(images, output_type)
        return PipelineOutput(out) if return_dict else (out,)

    def _step_end(self, req, fn: Callable[..., Any]) -> Callable[[int, int, torch.Tensor], None]:
        """A ``generate`` callback calling diffusers' ``fn(pipe, i, t, {"latents": …})`` with each step's timestep."""
        from pixsigma.edit import edit_strength, schedule
        from pixsigma.sampling import make_scheduler

        _, steps = self.resolve_sampling(req)
        sched = make_scheduler(req.sampler, self.scheduler_config, self.transformer.config.prediction_type)
        sched.set_timesteps(steps)
        timesteps = sched.timesteps
        if req.init_image is not None:
            timesteps = schedule(sched, steps, edit_strength(req.strength, req.mask is not None))[0]

        def callback(step: int, total: int, latents: torch.Tensor) -> None:
            fn(self, step - 1, timesteps[step - 1], {"latents": latents})

        return callback

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> DiffusersCall:
        """Every part onto ``device`` (an offloaded T5 stays in host memory until it encodes); returns the
        pipeline. The dtype is chosen at load (``from_pretrained(torch_dtype=…)``) and cannot change here."""
        from pixsigma.lora import LoraSpec
        from pixsigma.pipeline import resolve_device

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
