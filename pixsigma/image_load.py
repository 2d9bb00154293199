"""The one image loader at the edges (the CLI's --init-image/--mask/--control, the app's uploads, training data).

An image is refused before its pixels are decoded when its header says it holds more than a pixel budget (PIL's
``Image.open`` reads only the header; its own DecompressionBombError is turned into the same refusal), naming the
parameter, the size and the limit. Every mode becomes the one asked for by scaling, never clipping: 16-bit and
32-bit grey ("I;16", "I", "F") and 16-bit arrays keep their brightness; an alpha channel is composited over white
for images and over black for masks (a transparent pixel is not painted); palettes, CMYK and the rest go through
PIL's own conversion. EXIF rotation is applied, as a viewer shows the photo.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 8192 * 8192  # the CLI's and the trainer's budget: twice a 4K output's side
TINY_SIDE = 64  # an input under this many px a side is almost surely a mistake: warned, not refused
_GREY_WIDE = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # modes PIL's convert would clip to 0..255
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class ImageTooLarge(ValueError):
    """An image over the pixel budget (a ValueError: a user's mistake, refused in their words)."""


def budget_text(max_pixels: int) -> str:
    side = int(max_pixels ** 0.5)
    square = f", e.g. {side}×{side}" if side * side == max_pixels else ""
    return f"at most {max_pixels:,} pixels{square}"


def check_pixels(width: int, height: int, name: str, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse ``width × height`` over ``max_pixels``, naming ``name``."""
    if width * height > max_pixels:
        raise ImageTooLarge(f"{name} is {width}×{height} ({width * height:,} pixels); {budget_text(max_pixels)} "
                            "are accepted")


def open_checked(path: str | Path, name: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """``path`` opened lazily (header only) and checked against ``max_pixels``; the caller closes it. Unreadable
    files and images over the budget are refused with a ValueError naming ``name``."""
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:  # PIL's own bound, far above ours: the header was read, not pixels
        found = _BOMB_PIXELS.search(str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "larger than PIL opens"
        raise ImageTooLarge(f"{name} is {size}; {budget_text(max_pixels)} are accepted") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{name} is not an image PIL can read ({type(e).__name__})") from None
    try:
        check_pixels(im.width, im.height, name, max_pixels)
    except ValueError:
        im.close()
        raise
    return im


def load_image(path: str | Path, name: str, mode: str = "RGB", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image at ``path`` in ``mode`` ("RGB", "L" for a mask, "RGBA"), refused over ``max_pixels`` before
    decoding, its pixels read in full (a truncated file is refused here, not later)."""
    with open_checked(path, name, max_pixels) as im:
        try:
            im.load()
            return convert(im, mode)
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"{name} is not an image PIL can read (truncated or damaged: "
                             f"{type(e).__name__})") from None


def wide_grey_to_l(arr: np.ndarray) -> np.ndarray:
    """(H, W) 16/32-bit integer or float grey -> uint8, scaled by the range its values say: floats up to 1 are
    0..1, uint16 and values above 255 are 16-bit levels (what PIL reads from 16-bit PNG/TIFF), others 8-bit."""
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(a.max()) if a.size else 0.0
    if arr.dtype == np.uint16:  # "I;16*": 16-bit for certain, however dark
        full = 65535.0
    else:
        full = 1.0 if arr.dtype.kind == "f" and top <= 1.0 else 255.0 if top <= 255 else 65535.0
    return np.clip(np.rint(a * (255.0 / full)), 0, 255).astype(np.uint8)


def from_array(arr: np.ndarray) -> Image.Image:
    """An (H, W) or (H, W, 1|3|4) uint8/uint16/float array as an "L", "RGB" or "RGBA" image, scaled not clipped
    (uint16 by 65535/255, floats in 0..1 by 255)."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"an image array must be (H, W) or (H, W, 3|4), got shape {arr.shape}")
    if arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif arr.dtype.kind == "f":
        arr = np.clip(np.rint(np.nan_to_num(arr) * 255.0), 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = wide_grey_to_l(arr) if arr.ndim == 2 else np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def convert(im: Image.Image, mode: str = "RGB") -> Image.Image:
    """``im`` (loaded) in ``mode``, scaled rather than clipped (see the module docstring)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in _GREY_WIDE:
        im = Image.fromarray(wide_grey_to_l(np.asarray(im)))
    if mode != "RGBA" and (im.mode in _ALPHA or (im.mode == "P" and "transparency" in im.info)):
        rgba = im.convert("RGBA")
        background = (0, 0, 0, 255) if mode == "L" else (255, 255, 255, 255)  # a mask's transparent: not painted
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba)
    return im if im.mode == mode else im.convert(mode)


def tiny_warning(image: Image.Image, name: str) -> str | None:
    """A warning when ``image`` is under ``TINY_SIDE`` px a side (None otherwise)."""
    if min(image.size) < TINY_SIDE:
        return (f"{name} is only {image.width}×{image.height} px (under {TINY_SIDE} px a side): it carries "
                "almost nothing to redraw or follow")
    return None
