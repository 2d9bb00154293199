"""Guidance, the layer around the denoiser: classifier-free guidance (``uncond + g · (cond − uncond)``), only
inside a timestep interval where one is asked (Kynkäänniemi et al. 2024, "Applying guidance in a limited
interval"; outside it a step runs the conditional half alone, at half the cost), and the learned-variance half of
the DiT's output dropped. The interval changes the image, so nothing turns it on by default."""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor
Denoiser = Callable[[Tensor, Tensor], Tensor]  # (latents (B, C, H, W), timestep (0-d)) -> prediction (B, C, H, W)
BatchCall = Callable[[Tensor, Tensor], Tensor]  # (x, t (B,)) -> model output, its inputs bound


def check_interval(interval: tuple[float, float] | None) -> None:
    if interval is not None and not 0 <= interval[0] <= interval[1]:
        raise ValueError(f"guidance interval must satisfy 0 <= t_low <= t_high, got {tuple(interval)}")


def guidance_on(t: Tensor, interval: tuple[float, float] | None) -> bool:
    """Whether guidance runs at timestep ``t`` (every sample of a step shares it)."""
    if interval is None:
        return True
    step_t = float(t.reshape(-1)[0])
    return interval[0] <= step_t <= interval[1]


def guided(pair: BatchCall, scale: float, single: BatchCall | None = None,
           interval: tuple[float, float] | None = None, learn_sigma: bool = True) -> Denoiser:
    """The denoiser of a sampler step. ``pair(x, t)`` runs the guidance batch ([uncond; cond], 2B rows) when
    ``scale > 1``, else the B conditional rows; ``single(x, t)`` runs the conditional rows alone (needed for an
    ``interval``). The output's first C channels are the prediction when the model also predicts variance."""
    check_interval(interval)
    if interval is not None and single is None:
        raise ValueError("a guidance interval needs the conditional call alone (single)")
    cfg = scale > 1.0

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        t = t.reshape(1).to(x.device)
        if not cfg:
            out = pair(x, t.expand(x.shape[0]))
        elif not guidance_on(t, interval):
            out = single(x, t.expand(x.shape[0]))  # = uncond + g · (cond − uncond) with uncond = cond
        else:
            x2 = torch.cat([x, x])
            uncond, cond = pair(x2, t.expand(x2.shape[0])).chunk(2)
            out = uncond + scale * (cond - uncond)
        channels = x.shape[1]
        return out[:, :channels] if learn_sigma and out.shape[1] == 2 * channels else out

    return denoise


def cfg_interval(dit: Callable[..., Tensor], t_low: float, t_high: float) -> Callable[..., Tensor]:
    """The interval as a wrapper of a DiT call ``dit(x, t, y, mask, **extra)`` that receives guidance batches
    ([uncond; cond] halves), for loops that double the batch themselves (``pixsigma.sampling.denoise``): outside
    the interval only the conditional half runs and its output is returned for both halves, so
    ``uncond + g·(cond − uncond)`` equals ``cond``."""
    check_interval((t_low, t_high))

    def call(x: Tensor, t: Tensor, y: Tensor, mask: Tensor | None = None, **extra) -> Tensor:
        if x.shape[0] % 2:
            raise ValueError(f"cfg_interval needs a CFG batch ([uncond; cond]) of even size, got {x.shape[0]}")
        if guidance_on(t, (t_low, t_high)):
            return dit(x, t, y, mask, **extra)
        b = x.shape[0] // 2
        half = {k: (v[b:] if isinstance(v, Tensor) else v) for k, v in extra.items()}
        out = dit(x[b:], t[b:], y[b:], None if mask is None else mask[b:], **half)  # (B, C_out, H, W)
        return torch.cat([out, out])

    return call
