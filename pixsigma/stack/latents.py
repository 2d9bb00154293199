"""Latent init: the schedule (``steps`` of the sampler's, or diffusers' custom ``timesteps`` / ``sigmas``), the
start noise (drawn on the generator's device from the request's seed or generators, or given), and the start of
image-to-image and inpainting part way down the schedule (``pixsigma.edit.Edit.start``)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from pixsigma.edit import Edit

Tensor = torch.Tensor


def set_schedule(scheduler, steps: int, device: torch.device, timesteps: Sequence[int] | None = None,
                 sigmas: Sequence[float] | None = None) -> int:
    """``scheduler.set_timesteps`` for ``steps`` steps, or for custom ``timesteps`` / ``sigmas`` where the
    scheduler takes them (diffusers' ``retrieve_timesteps``); returns the number of steps set."""
    params = inspect.signature(scheduler.set_timesteps).parameters
    for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
        if value is not None:
            if name not in params:
                raise ValueError(f"the {type(scheduler).__name__} sampler takes no custom {name}; use a sampler "
                                 f"that does or give steps")
            scheduler.set_timesteps(**{name: list(value)}, device=device)
            return len(scheduler.timesteps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scheduler.set_timesteps(steps, device=device)
    return steps


def draw_noise(shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device,
               dtype: torch.dtype) -> Tensor:
    """Standard normal noise of ``shape`` drawn on each generator's own device (the same image on every device for a
    CPU generator): one generator for the whole batch, or one per image (diffusers' ``randn_tensor``)."""
    if len(generators) == 1:
        g = generators[0]
        return torch.randn(shape, generator=g, device=g.device, dtype=dtype).to(device)
    if len(generators) != shape[0]:
        raise ValueError(f"generator: {len(generators)} generators for {shape[0]} images")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).to(device)
                      for g in generators])


def start_noise(shape: tuple[int, ...], seed: int, generators: list[torch.Generator] | None,
                latents: Tensor | None, device: torch.device,
                dtype: torch.dtype) -> tuple[Tensor, torch.Generator | list[torch.Generator]]:
    """(the unscaled start noise, the generator(s) the sampler's steps draw from): given ``latents``, else drawn
    from ``generators``, else from a CPU generator seeded with ``seed``."""
    gens = generators or [torch.Generator("cpu").manual_seed(int(seed))]
    if latents is not None:
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, this request needs {tuple(shape)}")
        noise = latents.to(device, dtype)
    else:
        noise = draw_noise(shape, gens, device, dtype)
    return noise, gens[0] if len(gens) == 1 else gens


def initial_latents(scheduler, noise: Tensor, steps: int, edit: Edit | None = None) -> tuple[Tensor, Tensor]:
    """(the latents the loop starts from, the timesteps it runs) on a scheduler whose schedule is set: the noise
    × ``init_noise_sigma``, or an edit's noised input part way down the schedule."""
    latents = noise * scheduler.init_noise_sigma
    if edit is None:
        return latents, scheduler.timesteps
    return edit.start(scheduler, latents, steps)
