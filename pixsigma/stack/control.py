"""The control layer: a request's control image made into the map its ControlNet was trained on, encoded by the
VAE, and the ControlNet's residuals added at block level inside the DiT's own forward
(``pixsigma.model.controlnet.ControlResiduals``), so the KV setting and the speed mode that run the DiT's blocks
run the ControlNet's copies too."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from pixsigma.control import control_map, default_control_type
from pixsigma.images import control_latent
from pixsigma.model.controlnet import ControlNet, ControlResiduals
from pixsigma.model.dit import PixArtDiT
from pixsigma.speed import match_blocks

Tensor = torch.Tensor
ModelCall = Callable[..., Tensor]  # (x, t, y, mask, **extra) -> model output


def prepare_control(vae, net: ControlNet | None, image: Image.Image, kind: str | None, width: int, height: int,
                    device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Image.Image, str, list[str]]:
    """(the control latent (1, C, h, w), the map the ControlNet reads, its type, warnings) for a ``width × height``
    generation."""
    if net is None:
        raise ValueError("this model has no ControlNet: pass one (--controlnet PATH, or "
                         "PixSigmaPipeline.from_pretrained(..., controlnet=PATH)) to use a control image")
    kind = kind or default_control_type(net)
    cmap, warnings = control_map(image, kind, width, height)
    return control_latent(vae, [cmap]).to(device, dtype), cmap, kind, warnings


def with_control(call: ModelCall, base: PixArtDiT, net: ControlNet, latent: Tensor, scale: float) -> ModelCall:
    """``call`` (the DiT, whatever runs it) with the ControlNet's residuals of ``latent`` at ``scale``; scale 0 is
    ``call`` itself (the base image, exactly)."""
    if scale == 0:
        return call
    match_blocks(base, [blk.copied_block for blk in net.controlnet])

    def controlled(x: Tensor, t: Tensor, y: Tensor, mask: Tensor | None = None, **extra: Tensor) -> Tensor:
        return call(x, t, y, mask, **extra, block_hook=ControlResiduals(base, net, latent, scale))

    return controlled
