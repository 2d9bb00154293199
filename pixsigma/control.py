"""Control images for a ControlNet: condition makers (Canny edges, flat colour regions, raw), the map of a control
image at the generation bucket, and finding a model's ControlNet. The map's latent (the frozen VAE's posterior
mean × scaling factor, so the same inputs always give the same image) is ``pixsigma.images.control_latent``; the
request's control layer is ``pixsigma.stack.control``.

Plain functions on PIL images and tensors; the pipeline, the CLI, the app and the trainer all call these.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from pixsigma.controlnet_weights import find_controlnet, load_controlnet
from pixsigma.images import control_latent, fit_to_size

__all__ = ["CONDITION_MAKERS", "CONTROL_TYPES", "canny", "canny_edges", "canny_thick", "check_control_request",
           "check_control_scale", "check_control_type", "control_latent", "control_map", "controlnet_for",
           "default_control_type", "fit_to_size", "raw", "regions"]  # control_latent, fit_to_size: pixsigma.images'

Tensor = torch.Tensor
CANNY_LOW, CANNY_HIGH = 0.1, 0.2  # hysteresis thresholds on the gradient magnitude of [0, 1] grey levels
REGION_LEVELS = 4  # levels per RGB channel of a flat colour-region map
THICK_EDGE_WIDTH = 5  # px: a 1-px edge barely moves a small VAE's latent (the demo's); a 5-px one does


def _grey(image: Image.Image) -> Tensor:
    """(1, 1, H, W) float grey levels in [0, 1]."""
    arr = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None, None]


def _gaussian(x: Tensor, sigma: float = 1.0) -> Tensor:
    r = max(1, int(round(2 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def canny_edges(image: Image.Image, low: float = CANNY_LOW, high: float = CANNY_HIGH, sigma: float = 1.0) -> Tensor:
    """Canny's edge detector (blur, Sobel gradients, non-maximum suppression, hysteresis): (H, W) bool."""
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    g = _gaussian(_grey(image), sigma)
    sx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]) / 4  # /4: magnitude in grey levels per pixel
    pad = F.pad(g, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(pad, sx.view(1, 1, 3, 3))[0, 0]
    gy = F.conv2d(pad, sx.t().contiguous().view(1, 1, 3, 3))[0, 0]
    mag = torch.hypot(gx, gy)
    # quantise the gradient direction to 0/45/90/135 degrees; keep pixels not smaller than both neighbours along it
    angle = (torch.rad2deg(torch.atan2(gy, gx)) + 180) % 180
    sector = ((angle + 22.5) // 45).long() % 4
    m = F.pad(mag[None, None], (1, 1, 1, 1))[0, 0]
    h, w = mag.shape
    offsets = [((0, 1), (0, -1)), ((1, 1), (-1, -1)), ((1, 0), (-1, 0)), ((1, -1), (-1, 1))]
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for s, ((dy1, dx1), (dy2, dx2)) in enumerate(offsets):
        n1 = m[1 + dy1:1 + dy1 + h, 1 + dx1:1 + dx1 + w]
        n2 = m[1 + dy2:1 + dy2 + h, 1 + dx2:1 + dx2 + w]
        keep |= (sector == s) & (mag >= n1) & (mag >= n2)
    strong = keep & (mag >= high)
    weak = keep & (mag >= low)
    edges = strong
    for _ in range(max(h, w)):  # hysteresis: grow strong edges through connected weak ones
        grown = weak & (F.max_pool2d(edges[None, None].float(), 3, 1, 1)[0, 0] > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges


def canny(image: Image.Image) -> Image.Image:
    """White Canny edges on black (the usual ControlNet edge map), RGB."""
    arr = (canny_edges(image).numpy() * 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def canny_thick(image: Image.Image) -> Image.Image:
    """Canny edges dilated to ``THICK_EDGE_WIDTH`` pixels, white on black (the demo ControlNet's map)."""
    return canny(image).filter(ImageFilter.MaxFilter(THICK_EDGE_WIDTH))


def regions(image: Image.Image) -> Image.Image:
    """A flat colour-region map: each pixel snapped to ``REGION_LEVELS`` levels per channel, then a 5×5 mode
    filter so regions are flat and their borders clean (a sketch of flat colours passes through unchanged)."""
    step = 255 / (REGION_LEVELS - 1)
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    snapped = (np.round(arr / step) * step).round().astype(np.uint8)
    return Image.fromarray(snapped).filter(ImageFilter.ModeFilter(5))


def raw(image: Image.Image) -> Image.Image:
    """The image as given (already a control map)."""
    return image.convert("RGB")


CONDITION_MAKERS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "canny": canny, "canny-thick": canny_thick, "regions": regions, "raw": raw}
CONTROL_TYPES = tuple(CONDITION_MAKERS)


def default_control_type(net) -> str:
    """The control type a ControlNet was trained on, where its folder says (``control_type``), else canny."""
    return getattr(net, "control_type", None) or "canny"


def check_control_type(kind: str) -> str:
    if kind not in CONDITION_MAKERS:
        raise ValueError(f"unknown control type {kind!r}; accepted: {', '.join(CONTROL_TYPES)}")
    return kind


def check_control_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 4:
        raise ValueError(f"control scale must be a number in 0-4 (0 = off, 1 = as trained), got {scale!r}")
    return float(scale)


def control_map(image: Image.Image, kind: str, width: int, height: int) -> tuple[Image.Image, list[str]]:
    """The control map a ControlNet reads for ``image``: fitted to the generation size, then made by ``kind``
    (edges are found at the generation size, so their width is the one the ControlNet was trained on)."""
    check_control_type(kind)
    fitted, warning = fit_to_size(image.convert("RGB"), width, height)
    return CONDITION_MAKERS[kind](fitted), [warning] if warning else []


def check_control_request(image: Image.Image | None, kind: str | None, scale: float) -> None:
    """A request's control fields, refused before any work (the image only where one is given)."""
    if image is not None and not isinstance(image, Image.Image):
        raise ValueError(f"control_image must be a PIL image or None, got {type(image).__name__}")
    if kind is not None:  # None: the ControlNet's own type (default_control_type)
        check_control_type(kind)
    check_control_scale(scale)


def controlnet_for(folder: Path, path: str | os.PathLike | None, dit):
    """The ControlNet a pipeline loads: ``path`` (any layout ``load_controlnet`` accepts), else the one the model
    folder ships (``controlnet/``), else None."""
    path = path if path is not None else find_controlnet(folder)
    return None if path is None else load_controlnet(path, dit)
