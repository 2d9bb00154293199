"""Images ⇄ tensors: PIL images to the VAE's pixel range and back, fitting an image to a size, and the latent the
frozen VAE gives an image. A leaf: control maps, image-to-image, sampling and the trainers all read these.

Plain functions on PIL images and tensors: no printing, no files.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

Tensor = torch.Tensor


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu()


def to_pil(images: Tensor) -> list[Image.Image]:
    """[-1, 1] (B, 3, H, W) -> PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images).numpy()]


def from_pil(images: list[Image.Image]) -> Tensor:
    """PIL images of one size -> [-1, 1] float32 (B, 3, H, W): ``to_pil``'s inverse (the VAE's pixel range)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def resize_and_crop(images: Tensor, height: int, width: int) -> Tensor:
    """Cover (height, width) by bilinear resize, then centre-crop: back from a bucket to the asked size."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    ratio = max(height / h, width / w)
    rh, rw = int(h * ratio), int(w * ratio)
    images = torch.nn.functional.interpolate(images, size=(rh, rw), mode="bilinear", align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    return images[:, :, top:top + height, left:left + width]


def fit_to_size(image: Image.Image, width: int, height: int) -> tuple[Image.Image, str | None]:
    """Cover ``width × height`` by resizing, then centre-crop: (fitted image, a warning when the aspect ratio
    differed and parts were cropped, else None)."""
    w, h = image.size
    if (w, h) == (width, height):
        return image, None
    ratio = max(width / w, height / h)
    rw, rh = max(width, round(w * ratio)), max(height, round(h * ratio))
    resized = image.resize((rw, rh), Image.Resampling.BILINEAR)
    left, top = (rw - width) // 2, (rh - height) // 2
    fitted = resized.crop((left, top, left + width, top + height))
    if abs(w / h - width / height) > 0.01:
        return fitted, (f"control image {w}x{h} has another aspect ratio than the generated {width}x{height}: "
                        f"resized to cover it and centre-cropped")
    return fitted, None


@torch.no_grad()
def control_latent(vae, images: list[Image.Image]) -> Tensor:
    """Images (control maps, an init image) -> (B, C, h, w) latents: the VAE posterior's mean (deterministic),
    shifted and scaled as the DiT's latents are."""
    pixels = from_pil(images).to(vae.device, vae.dtype)
    mean = vae.encode(pixels).latent_dist.mean
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return (mean.float() - shift) * float(vae.config.scaling_factor)
