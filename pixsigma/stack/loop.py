"""The bare sampler loop: for each timestep, scale the input, ask the denoiser, step the scheduler, then the edit
hook (inpainting keeps the input outside its mask) and the step callback (which may replace the latents, as
diffusers' ``callback_on_step_end`` does)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Protocol

import torch

Tensor = torch.Tensor
Denoiser = Callable[[Tensor, Tensor], Tensor]
StepHook = Callable[[int, Tensor, Tensor], Tensor | None]  # (step index, timestep, latents) -> new latents or None


class EditHook(Protocol):
    def after_step(self, scheduler, latents: Tensor, timesteps: Tensor, i: int) -> Tensor: ...


def step_kwargs(scheduler, generator=None, eta: float = 0.0) -> dict:
    """The scheduler step's extra arguments it accepts: the generator (stochastic samplers) and η (DDIM)."""
    params = inspect.signature(scheduler.step).parameters
    out = {}
    if "generator" in params:
        out["generator"] = generator
    if "eta" in params:
        out["eta"] = eta
    return out


def sample(denoiser: Denoiser, scheduler, latents: Tensor, timesteps: Tensor, extra: dict | None = None,
           edit: EditHook | None = None, on_step: StepHook | None = None) -> Tensor:
    """Run ``timesteps`` from ``latents``; returns the final latents."""
    extra = extra or {}
    for i, t in enumerate(timesteps):
        pred = denoiser(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(pred, t, latents, **extra, return_dict=False)[0]
        if edit is not None:
            latents = edit.after_step(scheduler, latents, timesteps, i)
        if on_step is not None:
            new = on_step(i, t, latents)
            if new is not None:
                latents = new
    return latents
