"""The ControlNet stage's own parts: the frozen base with its trainable copies, the loss of one step, the
optimizer groups (zero-initialised projections may learn faster than the copies) and the condition makers
the feature cache applies to each training image.

The shared loop (train/loop.py) calls these when ``stage.name == "controlnet"``; nothing here runs a loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from PIL import Image

from pixsigma.control import CONDITION_MAKERS, check_control_type
from pixsigma.model.controlnet import ControlNet, controlled_forward, trainable_copy
from pixsigma.model.dit import PixArtDiT
from train.diffusion import GaussianDiffusion

Tensor = torch.Tensor
TRAIN_CONTROL_TYPES = ("canny", "regions")  # condition makers a training run can derive from its images


def check_train_control_type(kind: str) -> str:
    check_control_type(kind)
    if kind not in TRAIN_CONTROL_TYPES:
        raise ValueError(f"controlnet.control_type {kind!r} cannot be derived from training images; accepted: "
                         f"{', '.join(TRAIN_CONTROL_TYPES)}")
    return kind


def condition(images: list[Image.Image], kind: str) -> list[Image.Image]:
    """The control maps of training images (at the size they are trained at)."""
    check_train_control_type(kind)
    return [CONDITION_MAKERS[kind](im) for im in images]


def pixels_to_images(pixels: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images (what the condition makers read)."""
    from pixsigma.sampling import to_pil

    return to_pil(pixels)


def make_trainable(base: PixArtDiT, num_copies: int | None = None) -> ControlNet:
    """The stage's model: ``base`` frozen (eval: no dropout, nothing of it trains) and a fresh ControlNet."""
    base.eval()
    return trainable_copy(base, num_copies)


def param_groups(net: ControlNet, lr: float, proj_lr: float | None = None) -> list[dict[str, Any]]:
    """Optimizer groups: the copied blocks at ``lr``, the zero-initialised projections at ``proj_lr`` (default
    ``lr``)."""
    proj = [p for n, p in net.named_parameters() if "_proj." in n and "copied_block" not in n]
    ids = {id(p) for p in proj}
    rest = [p for p in net.parameters() if id(p) not in ids]
    return [{"params": rest, "lr": lr}, {"params": proj, "lr": proj_lr if proj_lr is not None else lr}]


def controlnet_losses(base: PixArtDiT, net: ControlNet, diffusion: GaussianDiffusion, x0: Tensor, control: Tensor,
                      y: Tensor, mask: Tensor | None, extra: dict[str, Tensor] | None = None,
                      t: Tensor | None = None, noise: Tensor | None = None) -> dict[str, Tensor]:
    """Per-sample losses of the base + ControlNet at noised ``x0`` (B, C, h, w) with control latents
    ``control`` (B, C, h, w): the base's own objective, gradients reaching only the ControlNet."""
    t = diffusion.sample_timesteps(x0.shape[0], x0.device) if t is None else t
    noise = torch.randn_like(x0) if noise is None else noise
    xt = diffusion.q_sample(x0, t, noise)
    out = controlled_forward(base, net, xt, t, y, mask, control, 1.0, **(extra or {}))
    return diffusion.training_losses(out, x0, xt, t, noise)


def trainable_names(net: ControlNet) -> Iterable[str]:
    return (n for n, p in net.named_parameters() if p.requires_grad)
