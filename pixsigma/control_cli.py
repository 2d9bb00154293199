"""The ControlNet options of ``pixsigma generate`` (kept out of cli.py, which other features share)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from pixsigma.control import CONTROL_TYPES, check_control_scale

CONTROL_HELP = """controlnet:
  --control IMAGE follows a control image with a ControlNet: --controlnet PATH (a pixsigma ControlNet folder, an
  official ControlPixArtHalf .pth/.safetensors, or a diffusers research PixArtControlNetAdapterModel folder), or the
  one the model folder ships (controlnet/, as the demo does). --control-type canny (edges of a photo or sketch),
  canny-thick (the same, 5 px wide: the demo's), regions (flat colour regions) or raw (the image is already the
  map); left out: the type the ControlNet was trained on. A control image of another aspect ratio is
  resized to cover the generated bucket and centre-cropped (a warning says so).
  python -m pixsigma generate "a red star above a blue ring" --model demo --control sketch.png --out star.png
"""


def add_control_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--controlnet", help="ControlNet weights (default: the model folder's controlnet/, if any)")
    g.add_argument("--control", metavar="IMAGE", help="control image the ControlNet follows")
    g.add_argument("--control-type", choices=CONTROL_TYPES,
                   help="how the control image becomes a map (default: the type the ControlNet was trained on, "
                        "else canny)")
    g.add_argument("--control-scale", type=float, default=1.0,
                   help="strength of the ControlNet's residuals (0 = off, 1 = as trained; default 1)")
    g.epilog = (g.epilog or "") + "\n" + CONTROL_HELP


def control_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """GenerationRequest's control fields from the options; the image is opened here, so a bad one fails first."""
    check_control_scale(args.control_scale)
    if args.control is None:
        if args.control_type is not None or args.control_scale != 1.0:
            raise ValueError("--control-type and --control-scale need --control IMAGE")
        return {}
    path = Path(args.control)
    if not path.is_file():
        raise FileNotFoundError(f"--control {path} does not exist")
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--control {path} is not an image PIL can read ({type(e).__name__})") from None
    return {"control_image": image, "control_type": args.control_type, "control_scale": args.control_scale}
