"""The one place the denoiser is composed from its layers: the DiT (speed mode on its forward, KV and adapters on
its modules), the ControlNet's residuals at block level where the request has a control image, and guidance
around them."""

from __future__ import annotations

import torch

from pixsigma.model.controlnet import ControlNet
from pixsigma.model.dit import PixArtDiT
from pixsigma.stack.conditioning import Conditioning
from pixsigma.stack.control import with_control
from pixsigma.stack.guidance import Denoiser, guided

Tensor = torch.Tensor


def build_denoiser(dit: PixArtDiT, cond: Conditioning, guidance: float,
                   interval: tuple[float, float] | None = None, controlnet: ControlNet | None = None,
                   control: Tensor | None = None, control_scale: float = 1.0) -> Denoiser:
    """``(latents, t) -> prediction`` for one request."""
    call = dit
    if control is not None:
        call = with_control(call, dit, controlnet, control, control_scale)
    cfg = guidance > 1.0
    y2, m2, e2 = cond.pair() if cfg else cond.single()
    y1, m1, e1 = cond.single()

    def pair(x: Tensor, t: Tensor) -> Tensor:
        return call(x, t, y2, m2, **e2)

    def single(x: Tensor, t: Tensor) -> Tensor:
        return call(x, t, y1, m1, **e1)

    return guided(pair, guidance, single, interval if cfg else None, dit.config.learn_sigma)
