"""The ControlNet stage's own parts: the frozen base with its trainable copies, the loss of one step, the
optimizer groups (zero-initialised projections may learn faster than the copies) and the condition makers
the feature cache applies to each training image.

The shared loop (train/loop.py) calls these when ``stage.name == "controlnet"``; nothing here runs a loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pixsigma.control import CONDITION_MAKERS, check_control_type
from pixsigma.model.controlnet import ControlNet, controlled_forward, trainable_copy
from pixsigma.model.dit import PixArtDiT

from .diffusion import GaussianDiffusion
from .stages import CONTROLNET_TRAIN_TYPES

Tensor = torch.Tensor


def check_train_control_type(kind: str) -> str:
    check_control_type(kind)
    if kind not in CONTROLNET_TRAIN_TYPES:
        raise ValueError(f"control type {kind!r} cannot be derived from training images; accepted: "
                         f"{', '.join(CONTROLNET_TRAIN_TYPES)}")
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


class TrainableControlNet(ControlNet):
    """A ControlNet bound to its frozen base: ``forward`` is the base + ControlNet forward, and parameters and
    ``state_dict`` are the ControlNet's alone (the base is held outside the module tree), so the shared loop's
    accelerate prepare, checkpoints and EMA see only what trains."""

    @classmethod
    def around(cls, base: PixArtDiT, num_copies: int | None = None) -> TrainableControlNet:
        fresh = make_trainable(base, num_copies)
        net = cls(fresh.config, base.config)
        net.load_state_dict(fresh.state_dict())
        net.__dict__["_base"] = base  # not a submodule: never trained, saved or averaged
        return net.to(base.final_layer.linear.weight.device)

    @property
    def base(self) -> PixArtDiT:
        return self.__dict__["_base"]

    def forward(self, x: Tensor, t: Tensor, y: Tensor, mask: Tensor | None = None, control: Tensor | None = None,
                **extra: Tensor) -> Tensor:
        return controlled_forward(self.base, self, x, t, y, mask, control, 1.0, **extra)


def build_trainee(cfg, base: PixArtDiT, device: torch.device) -> TrainableControlNet:
    """The controlnet stage's trained module around the loaded (now frozen) model, which moves to ``device``
    here (accelerate moves only what it is given). Validation images are not drawn for this stage."""
    if cfg.sample_every:
        raise ValueError("the controlnet stage draws no validation images: set sample_every: 0")
    return TrainableControlNet.around(base.to(device), cfg.stage.controlnet.copies)


def optimizer_params(cfg, net: ControlNet) -> list[dict[str, Any]]:
    return param_groups(net, cfg.optim.lr, cfg.stage.controlnet.proj_lr)


def export_controlnet(accelerator, model: torch.nn.Module, ema, config, run_dir: Path,
                      extra: dict[str, Any]) -> dict[str, str]:
    """Collective. Writes ``final/`` as a pixsigma ControlNet folder (the EMA weights where there are some);
    ``export_final``'s signature (``config``, the base's, is not needed)."""
    from pixsigma.controlnet_weights import save_controlnet
    from pixsigma.io import new_folder

    from .runfiles import FINAL

    state = accelerator.get_state_dict(model)
    out: dict[str, str] = {}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        net = ControlNet(unwrapped.config, unwrapped.base.config)
        net.load_state_dict(ema.shadow if ema is not None else state)
        with new_folder(run_dir / FINAL) as tmp:
            save_controlnet(net, tmp, extra=extra)
        out[FINAL] = str(run_dir / FINAL)
    accelerator.wait_for_everyone()
    return out


def control_from_pixels(vae, pixels: Tensor, kind: str) -> Tensor:
    """(B, 3, H, W) training pixels in [-1, 1] -> the unscaled VAE posterior mean of their control maps (what the
    feature cache stores, and what online training computes per batch)."""
    from pixsigma.sampling import from_pil

    maps = condition(pixels_to_images(pixels), kind)
    mean, _ = vae.posterior(from_pil(maps))
    return mean
