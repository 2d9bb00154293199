"""The image-to-image and inpainting options of ``pixsigma generate`` (kept out of cli.py, which other features
share): read and refused before any model loads."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from pixsigma.edit import FEATHER_PX, IMG2IMG_STRENGTH, INPAINT_STRENGTH, check_strength

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


def _read(option: str, value: str, role: str) -> Any:
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {value}: no such file; {option} takes {role}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{option} {value} is not an image PIL can read ({type(e).__name__}); {option} takes "
                         f"{role}") from None


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
    out = {"init_image": _read("--init-image", args.init_image, "a PNG, JPEG or WebP image").convert("RGB"),
           "strength": args.strength}
    if args.mask is not None:
        out["mask"] = _read("--mask", args.mask, "an image whose white pixels mark what to repaint (any size)")
    return out
