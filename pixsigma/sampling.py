"""Sampling as plain functions: scheduler by name, noise, micro-conditions, the loop for callers that bind the
model's inputs themselves (``denoise``: ``pixsigma.stack``'s guidance and loop), VAE decode.

No printing, file I/O or globals here: the pipeline and the CLI own those.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffusers
import torch

from pixsigma.config import DiTConfig
from pixsigma.constants import DEFAULT_STEPS, NUM_TRAIN_TIMESTEPS
from pixsigma.edit import Edit
from pixsigma.images import from_pil, resize_and_crop, to_pil, to_uint8
from pixsigma.stack.guidance import guided
from pixsigma.stack.latents import set_schedule, start_noise
from pixsigma.stack.loop import sample, step_kwargs

__all__ = ["DEFAULT_STEPS_FOR", "PIXART_BETAS", "SAMPLERS", "decode", "default_steps", "denoise", "from_pil",
           "initial_noise", "latent_preview_array", "latent_rgb", "make_scheduler", "micro_conditions",
           "resize_and_crop", "to_pil", "to_uint8"]  # from_pil … to_uint8: pixsigma.images' (read from here too)

Tensor = torch.Tensor
StepCallback = Callable[[int, int, Tensor], None]  # (step, total, latents)

SAMPLERS = ("default", "dpm-solver", "sa-solver", "ddim", "euler", "euler-a", "lcm")
DEFAULT_STEPS_FOR = {"default": DEFAULT_STEPS, "dpm-solver": DEFAULT_STEPS, "sa-solver": 25, "ddim": 50, "euler": 30,
                     "euler-a": 30, "lcm": 4}
# PixArt's training schedule, used when a model folder carries no scheduler config.
PIXART_BETAS = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_start": 0.0001, "beta_end": 0.02,
                "beta_schedule": "linear", "prediction_type": "epsilon"}


def make_scheduler(name: str | None, folder_config: dict[str, Any] | None = None,
                   prediction_type: str | None = None):
    """A diffusers scheduler: the folder's own (``default``), or one of SAMPLERS built on the same betas.
    ``prediction_type`` (the DiT's own, ``DiTConfig.prediction_type``) overrides the folder's."""
    name = name or "default"
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; accepted: {', '.join(SAMPLERS)}")
    base = dict(folder_config or {})
    if prediction_type is not None:
        base["prediction_type"] = prediction_type
    if name == "default":
        if base.get("_class_name"):
            return getattr(diffusers, base["_class_name"]).from_config(base)
        name = "dpm-solver"
    base = {**PIXART_BETAS, **{k: v for k, v in base.items() if k in PIXART_BETAS or k == "trained_betas"}}
    if name == "dpm-solver":
        return diffusers.DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++", solver_order=2)
    if name == "sa-solver":
        return diffusers.SASolverScheduler.from_config(base, algorithm_type="data_prediction")
    if name == "ddim":
        return diffusers.DDIMScheduler.from_config(base, clip_sample=False)  # latents are not in [-1, 1]
    if name == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(base)
    if name == "lcm":  # a consistency-distilled model's 1-8 steps (docs/fewstep.md); its grid: 50 of 1000 timesteps
        return diffusers.LCMScheduler.from_config(base, original_inference_steps=50, clip_sample=False)
    # Ancestral: each step re-noises a little, so a small model's errors are partly washed out rather than
    # carried to the end.
    return diffusers.EulerAncestralDiscreteScheduler.from_config(base)


def micro_conditions(config: DiTConfig, batch: int, height: int, width: int, dtype: torch.dtype,
                     device: torch.device) -> dict[str, Tensor]:
    """PixArt-α 1024's size and aspect-ratio conditions for ``batch`` images of ``height × width`` px (the DiT's
    ``resolution`` (B, 2) and ``aspect_ratio`` (B, 1) inputs); nothing for models without them."""
    if not config.micro_condition:
        return {}
    return {"resolution": torch.tensor([[height, width]], dtype=dtype, device=device).repeat(batch, 1),
            "aspect_ratio": torch.full((batch, 1), height / width, dtype=dtype, device=device)}


def default_steps(sampler: str | None) -> int:
    return DEFAULT_STEPS_FOR.get(sampler or "default", DEFAULT_STEPS)


def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype,
                  init_sigma: float = 1.0) -> tuple[Tensor, torch.Generator]:
    """Noise drawn on the CPU from ``seed`` (same image on every device), and the generator that drew it."""
    noise, gen = start_noise(shape, seed, None, None, device, dtype)
    return noise * init_sigma, gen


def denoise(model_fn: Callable[[Tensor, Tensor], Tensor], scheduler, latents: Tensor, steps: int,
            guidance: float, generator: torch.Generator | None = None, callback: StepCallback | None = None,
            learn_sigma: bool = True, edit: Edit | None = None) -> Tensor:
    """The stack's loop for callers that bind the model's inputs themselves (the trainers, the bench):
    ``model_fn(x, t)`` gets the CFG-doubled batch ([uncond; cond]) when guidance > 1 and returns the model output;
    only its first half (ε or v, as the scheduler's ``prediction_type`` says) is used when the model also predicts
    variance. ``latents`` are the start noise × ``init_noise_sigma``; ``edit`` (``pixsigma.edit``): start part way
    from a noised input image, and keep it outside a mask after each step."""
    set_schedule(scheduler, steps, latents.device)
    timesteps = scheduler.timesteps
    if edit is not None:
        latents, timesteps = edit.start(scheduler, latents, steps)

    def on_step(i: int, t: Tensor, x: Tensor) -> None:
        callback(i + 1, len(timesteps), x)

    return sample(guided(model_fn, guidance, learn_sigma=learn_sigma), scheduler, latents, timesteps,
                  step_kwargs(scheduler, generator), edit, on_step if callback is not None else None)


def decode(vae, latents: Tensor, tiled: bool = False) -> Tensor:
    """Latents -> images in [-1, 1], (B, 3, 8H, 8W). Tiled decoding keeps 2K/4K within memory."""
    scale = vae.config.scaling_factor
    dtype = vae.dtype
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # SD/SDXL VAEs overflow in fp16
        dtype = torch.float32
    if tiled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    return vae.decode(latents.to(dtype) / scale, return_dict=False)[0]


# Rough latent -> RGB projection for previews without the VAE (SD/SDXL-like latents; good enough to watch).
_PREVIEW = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                         [-0.184, -0.271, -0.473]])


def latent_rgb(latents: Tensor) -> Tensor:
    """(B, 4, h, w) latents -> (B, 3, h, w) rough RGB in [-1, 1]; other channel counts: the grey mean."""
    x = latents.float().cpu()
    if x.shape[1] != 4:
        return x.mean(1, keepdim=True).expand(-1, 3, -1, -1).clamp(-1, 1)
    return torch.einsum("bchw,cr->brhw", x, _PREVIEW).clamp(-1, 1)


def latent_preview_array(latents: Tensor) -> Tensor:
    """(B, 4, H, W) latents -> uint8 (H, W, 3) preview of the first image, contrast-stretched."""
    lat = latents[:1, :4].float().cpu()  # (1, 4, H, W)
    rgb = torch.einsum("bchw,cr->hwr", lat, _PREVIEW)  # (H, W, 3)
    rgb = (rgb - rgb.amin()) / (rgb.amax() - rgb.amin() + 1e-6)
    return (rgb * 255).to(torch.uint8)
