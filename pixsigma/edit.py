"""Image-to-image and inpainting: the input fitted to the output and its bucket, encoded by the VAE, noised to the
step ``strength`` selects, denoised from there; with a mask, the noised input kept outside it at every step and the
result pasted back onto the input with a feathered edge.

The schedule is diffusers' img2img pipelines' (``get_timesteps``: ``int(steps × strength)`` steps are run, from
``timesteps[t_start × order:]`` with ``set_begin_index``; ``add_noise`` with the seed's noise at the first of
them). The input's latent is the VAE posterior's mean (diffusers samples it), so a seed always gives one image.
Inpainting blends latents as diffusers' 4-channel inpainting does (and PixArt-α's unmerged PR #7929): after each
step the latents outside the mask are the input noised to the next timestep, and after the last the clean input;
strength 1 with a mask starts from pure noise, as diffusers' inpainting pipelines do.

Plain functions on PIL images and tensors: no printing, no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pixsigma.constants import VAE_SCALE_FACTOR
from pixsigma.images import control_latent, fit_to_size

Tensor = torch.Tensor
IMG2IMG_STRENGTH = 0.8  # diffusers' img2img default: keeps the input's layout, redraws its details
INPAINT_STRENGTH = 1.0  # diffusers' inpainting default: the masked part is drawn afresh
FEATHER_PX = 8  # the pasted result fades into the input over this many pixels around the mask
MASK_THRESHOLD = 128  # grey level from which a mask pixel means "repaint" (white)


def check_strength(strength: Any, name: str = "strength") -> float:
    """``strength`` as a float in (0, 1]; anything else is refused naming ``name``."""
    if (isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength)
            or not 0 < strength <= 1):
        raise ValueError(f"{name} must be a number in (0, 1] (how far the input is noised: small keeps it nearly "
                         f"as it is, 1 starts from almost pure noise), got {strength!r}")
    return float(strength)


def check_edit_request(init_image: Any, mask: Any, strength: Any) -> None:
    """A request's edit fields, refused before any work."""
    for name, value in (("init_image", init_image), ("mask", mask)):
        if value is not None and not isinstance(value, Image.Image):
            raise ValueError(f"{name} must be a PIL image or None, got {type(value).__name__}")
    if mask is not None and init_image is None:
        raise ValueError("mask needs an init_image: the image whose white-masked part is repainted")
    if strength is not None:
        if init_image is None:
            raise ValueError("strength needs an init_image: it says how far that image is noised")
        check_strength(strength)


def edit_strength(strength: float | None, inpainting: bool) -> float:
    """The strength a request runs with: its own, else diffusers' default for img2img or inpainting."""
    if strength is not None:
        return float(strength)
    return INPAINT_STRENGTH if inpainting else IMG2IMG_STRENGTH


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Cover ``width × height`` by a bilinear resize, then centre-crop (unchanged when it already has that size)."""
    return fit_to_size(image, width, height)[0]


def binary_mask(mask: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, list[str]]:
    """``mask`` as a black/white "L" image of ``size`` (w, h): white (≥ ``MASK_THRESHOLD``) = repaint; a mask of
    another size is resized to it (a warning says so)."""
    grey = mask.convert("L")
    warnings = []
    if grey.size != size:
        warnings.append(f"mask {grey.width}x{grey.height} resized to the init image's {size[0]}x{size[1]}")
        grey = grey.resize(size, Image.Resampling.BILINEAR)
    return grey.point(lambda v: 255 if v >= MASK_THRESHOLD else 0), warnings


def latent_mask(mask: Image.Image, width: int, height: int) -> Tensor:
    """(1, 1, h/8, w/8) float: 1 where the latent cell holds any pixel to repaint, of the mask fitted to the
    ``width × height`` bucket."""
    m = np.asarray(fit(mask, width, height), dtype=np.float32) / 255.0
    cells = F.max_pool2d(torch.from_numpy(m)[None, None], VAE_SCALE_FACTOR)
    return (cells > 0).float()


def feather(mask: np.ndarray, width: int = FEATHER_PX) -> np.ndarray:
    """(H, W) bool -> (H, W) float32 weights: 1 on the mask, (width − d) / width at city-block distance d < width
    from it, 0 from ``width`` px on (so every pixel at least ``width`` px away, in any metric, is 0)."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    cross = torch.tensor([[0.0, 1, 0], [1, 1, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    total = m.clone()
    grown = m
    for _ in range(width - 1):
        grown = (F.conv2d(grown, cross, padding=1) > 0).float()
        total += grown
    return (total / width)[0, 0].numpy()


def paste(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """``generated`` inside ``mask`` (white), fading over ``FEATHER_PX`` into ``original``, whose pixels are kept
    exactly wherever the fade is 0."""
    alpha = feather(np.asarray(mask) > 0)[..., None]  # (H, W, 1)
    gen = np.asarray(generated.convert("RGB"), dtype=np.float32)
    orig = np.asarray(original.convert("RGB"))
    mixed = np.clip(np.round(alpha * gen + (1 - alpha) * orig), 0, 255).astype(np.uint8)
    return Image.fromarray(np.where(alpha > 0, mixed, orig))


def schedule(scheduler, steps: int, strength: float) -> tuple[Tensor, int]:
    """diffusers' ``get_timesteps``: (the timesteps run, their first index) for ``strength`` of ``steps``, on a
    scheduler whose ``set_timesteps(steps)`` was called; sets its begin index. Fewer than one step is refused."""
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ValueError(f"strength {strength:g} with {steps} steps runs int({steps} × {strength:g}) = 0 steps: "
                         f"use a strength of at least {1 / steps:.3g} or more steps")
    begin = (steps - run) * getattr(scheduler, "order", 1)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:], begin


@dataclass
class Edit:
    """What the sampling loop and the pipeline need for one img2img or inpainting request."""

    init: Tensor  # (B, C, h, w) clean latents of the input
    noise: Tensor  # (B, C, h, w) the seed's noise (unscaled)
    strength: float
    original: Image.Image  # the input fitted to the output size
    mask: Image.Image | None = None  # black/white at the output size; None: img2img
    cells: Tensor | None = None  # (1, 1, h, w) the mask at latent resolution (1 = repaint)

    def start(self, scheduler, latents: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """(the latents to start from, the timesteps to run) after ``scheduler.set_timesteps(steps)``;
        ``latents`` is text-to-image's start (the noise × ``init_noise_sigma``)."""
        timesteps, _ = schedule(scheduler, steps, self.strength)
        if self.cells is not None and self.strength == 1.0:
            return latents, timesteps  # diffusers' inpainting at full strength: pure noise
        t = timesteps[:1].repeat(latents.shape[0])
        return scheduler.add_noise(self.init, self.noise, t).to(latents.dtype), timesteps

    def after_step(self, scheduler, latents: Tensor, timesteps: Tensor, i: int) -> Tensor:
        """Inpainting: outside the mask, the input noised to the next timestep (after the last one: clean)."""
        if self.cells is None:
            return latents
        if i + 1 < len(timesteps):
            t = timesteps[i + 1:i + 2].repeat(latents.shape[0])
            kept = scheduler.add_noise(self.init, self.noise, t)
        else:
            kept = self.init
        return (self.cells * latents + (1 - self.cells) * kept).to(latents.dtype)

    def finish(self, images: list[Image.Image]) -> list[Image.Image]:
        """The output images: inpainting pastes them onto the input outside the mask."""
        if self.mask is None:
            return images
        return [paste(im, self.original, self.mask) for im in images]

    @property
    def params(self) -> dict[str, Any]:
        """What the PNG records of the edit."""
        return {"mode": "inpaint" if self.mask is not None else "img2img", "strength": self.strength}


@torch.no_grad()
def encode_image(vae, image: Image.Image) -> Tensor:
    """(1, C, h, w) latent of ``image``: the VAE posterior's mean, shifted and scaled as the DiT's latents are."""
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # SD/SDXL VAEs overflow in fp16 (sampling.decode upcasts the same way)
    return control_latent(vae, [image])


def plan_edit(vae, init_image: Image.Image, mask: Image.Image | None, strength: float | None,
              size: tuple[int, int], bucket: tuple[int, int], noise: Tensor) -> tuple[Edit, list[str]]:
    """The :class:`Edit` of a request: the input fitted to the output ``size`` (w, h) and encoded at ``bucket``
    (w, h) for every one of ``noise``'s B images; warnings say what was resized or cropped."""
    (w, h), (gw, gh) = size, bucket
    image = init_image.convert("RGB")
    warnings = []
    if abs(image.width / image.height - w / h) > 0.01:
        warnings.append(f"init image {image.width}x{image.height} has another aspect ratio than the output {w}x{h}: "
                        f"resized to cover it and centre-cropped")
    original = fit(image, w, h)
    init = encode_image(vae, fit(original, gw, gh)).to(noise.device, noise.dtype)
    init = init.expand(noise.shape[0], -1, -1, -1)
    if mask is None:
        return Edit(init, noise, edit_strength(strength, False), original), warnings
    bw, mask_warnings = binary_mask(mask, image.size)
    warnings += mask_warnings
    fitted = fit(bw, w, h).point(lambda v: 255 if v >= MASK_THRESHOLD else 0)
    if fitted.getextrema()[1] == 0:
        warnings.append("the mask has no white pixels: nothing is repainted, the output is the init image")
    cells = latent_mask(fitted, gw, gh).to(noise.device, noise.dtype)
    return Edit(init, noise, edit_strength(strength, True), original, fitted, cells), warnings
