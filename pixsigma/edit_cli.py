"""The image-to-image and inpainting options of ``pixsigma generate`` (kept out of cli.py, which other features
share): read and refused before any model loads."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pixsigma.edit import FEATHER_PX, IMG2IMG_STRENGTH, INPAINT_STRENGTH, check_strength
from pixsigma.image_load import MAX_PIXELS, TINY_SIDE, load_image, tiny_warning

log = logging.getLogger("pixsigma")

EDIT_HELP = f"""image-to-image and inpainting:
  --init-image IMAGE redraws an image (resized and centre-cropped to the output, which is the image's own size
  unless --width/--height say otherwise); --strength F in (0, 1] says how far it is noised first (default
  {IMG2IMG_STRENGTH}: small keeps it nearly as it is, 1 starts from almost pure noise). --mask IMAGE repaints
  only its white part (default strength {INPAINT_STRENGTH}); pixels {FEATHER_PX} px or more from it stay exactly
  the input's. A mask of any size is resized to the image (a warning says so). More: docs/edit.md
  python -m pixsigma generate "a red star" --model demo --init-image in.png --strength 0.6 --out out.png
  python -m pixsigma generate "a green ring" --model demo --init-image in.png --mask mask.png --out out.png
"""


def add_edit_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--init-image", metavar="IMAGE", help="image to redraw (image-to-image; with --mask: inpainting)")
    g.add_argument("--strength", type=float, metavar="F", help=f"how far --init-image is noised, in (0, 1] "
                   f"(default {IMG2IMG_STRENGTH}; with --mask {INPAINT_STRENGTH})")
    g.add_argument("--mask", metavar="IMAGE", help="inpainting mask for --init-image: white = repaint")
    g.epilog = (g.epilog or "") + "\n" + EDIT_HELP


def read_image(option: str, value: str, role: str, mode: str = "RGB") -> Any:
    """``value``'s image in ``mode`` through the one loader (``pixsigma.image_load``: at most ``MAX_PIXELS``, 16-bit
    scaled); a tiny one is warned about."""
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {value}: no such file; {option} takes {role}")
    try:
        image = load_image(path, f"{option} {value}", mode, MAX_PIXELS)
    except ValueError as e:
        raise ValueError(f"{e}; {option} takes {role}") from None
    if (warning := tiny_warning(image, f"{option} {value}")) is not None:
        log.warning(warning)
    return image


def output_size_warning(width: int | None, height: int | None) -> str | None:
    """A warning for an output under ``TINY_SIDE`` px a side (--width 1 --height 1 writes a 1×1 PNG)."""
    small = [f"{name} {v}" for name, v in (("--width", width), ("--height", height)) if v is not None and v < TINY_SIDE]
    if not small:
        return None
    return (f"{' and '.join(small)}: under {TINY_SIDE} px a side, the model draws at its nearest bucket and the PNG "
            "is resized down to that size")


def edit_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """GenerationRequest's edit fields from the options; the images are opened here, so bad input fails first."""
    if args.init_image is None:
        for option, value in (("--mask", args.mask), ("--strength", args.strength)):
            if value is not None:
                raise ValueError(f"{option} {value} needs --init-image IMAGE (the image to "
                                 f"{'repaint' if option == '--mask' else 'noise and redraw'})")
        return {}
    if args.strength is not None:
        check_strength(args.strength, "--strength")
    out = {"init_image": read_image("--init-image", args.init_image, "a PNG, JPEG or WebP image"),
           "strength": args.strength}
    if args.mask is not None:
        out["mask"] = read_image("--mask", args.mask, "an image whose white pixels mark what to repaint (any size)",
                                 "L")
    return out
