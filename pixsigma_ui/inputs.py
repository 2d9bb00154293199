"""Handler inputs as they arrive from the browser, ``gradio_client`` or a raw HTTP call, and the app's refusals.

The heavy events run with ``preprocess=False``: gradio's own checks refuse an out-of-range slider without naming
it ("Value 0 is less than minimum value 2.") and turn a wrong type into a bare ``{"error": null}``, so every value
is checked here, by name. A refused input is one log line and a short message; a server fault keeps its traceback
in the log and the user is told it was the server's.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import random
import reprlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from pixsigma.image_load import load_image, tiny_warning
from pixsigma.pipeline import OutOfMemory
from pixsigma_ui.engine import MAX_SEED

log = logging.getLogger("pixsigma.app")
MAX_MESSAGE_CHARS = 300  # a refusal is read by a person; a longer one only echoes abuse back
# Values are quoted in messages with reprlib.repr: shortened, so a 10 MB string never comes back.
RANDOM_SEED = -1  # "any seed": the API's way to ask for randomize_seed
MAX_UPLOAD_PIXELS = 4096 * 4096  # an uploaded image larger than the largest output is refused before decoding
# (the default of app.py's --max-image-pixels, which sets upload_pixels below)
upload_pixels = MAX_UPLOAD_PIXELS


def cap(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` cut to ``limit`` characters (an ellipsis marks the cut)."""
    message = str(message)
    return message if len(message) <= limit else message[: limit - 1] + "…"


def as_int(value: Any, name: str) -> int:
    """A whole number: sliders send floats such as 3.0; text, booleans, NaN and fractions are refused."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value != int(value):
        kind = " (text)" if isinstance(value, str) else ""
        raise ValueError(f"{name} must be a whole number, got {reprlib.repr(value)}{kind}")
    return int(value)


def as_float(value: Any, name: str) -> float:
    """A finite number; text, booleans, NaN and infinities are refused."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        kind = " (text)" if isinstance(value, str) else ""
        raise ValueError(f"{name} must be a number, got {reprlib.repr(value)}{kind}")
    return float(value)


def as_text(value: Any, name: str) -> str:
    """Text; None (an empty field) is ''."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {reprlib.repr(value)}")
    return value


def as_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {reprlib.repr(value)}")
    return value


def resolve_seed(seed: Any, randomize: Any = False) -> int:
    """The seed to draw with: a random one when ``randomize`` is on or ``seed`` is -1, else ``seed`` (0 to 2³²−1)."""
    if as_bool(randomize, "randomize_seed") or (not isinstance(seed, bool) and seed == RANDOM_SEED):
        return random.SystemRandom().randrange(MAX_SEED + 1)
    seed = as_int(seed, "seed")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED}, or -1 for a random one, got {seed}")
    return seed


def upload_path(payload: Any, name: str) -> Path | None:
    """The file an image input names (a FileData dict or a path; None: none), only inside gradio's upload folder:
    a payload naming any other file on the server is refused."""
    if payload is None:
        return None
    if isinstance(payload, dict):
        payload = payload.get("path")
    if not isinstance(payload, str) or not payload:
        raise ValueError(f"{name}: expected an uploaded image, got {reprlib.repr(payload)}")
    from gradio.utils import get_upload_folder

    path = Path(payload).resolve()
    if not path.is_relative_to(Path(get_upload_folder()).resolve()):
        raise ValueError(f"{name} must be an image uploaded to this app")
    return path


def open_upload(path: Path | None, name: str, mode: str = "RGB") -> Image.Image | None:
    """The uploaded image at ``path`` in ``mode`` (None: None) through the one loader (``pixsigma.image_load``: over
    ``upload_pixels`` refused before decoding, 16-bit scaled); unreadable ones are refused naming ``name``, a tiny
    one is warned about on the page."""
    if path is None:
        return None
    image = load_image(path, name, mode, upload_pixels)
    if (warning := tiny_warning(image, name)) is not None and mode != "RGBA":  # RGBA: the editor's brush layers
        gr.Warning(warning)
    return image


def refuse(message: str) -> gr.Error:
    """A user's mistake: one log line, no traceback; the message as the user sees it."""
    message = cap(message)
    log.info("refused: %s", message.replace("\n", " "))
    return gr.Error(message, print_exception=False)


def guarded(handler: Callable[..., Any]) -> Callable[..., Any]:
    """A handler (a function or a generator function) whose ValueErrors and out-of-memory errors become short
    refusals, and whose other failures are logged with their traceback and reported as the server's fault.
    gradio reads the wrapped signature (API parameter names, the injected ``gr.Progress``)."""

    def translate(e: Exception) -> gr.Error:
        if isinstance(e, gr.Error):
            # raised by gradio or a library: still a refusal, kept to one line
            return refuse(e.message) if e.print_exception else e
        if isinstance(e, ValueError | OutOfMemory):
            return refuse(str(e))
        log.exception("server fault in %s", handler.__name__)
        return gr.Error("the server failed on this request (it is logged); please try again later",
                        print_exception=False)

    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from handler(*args, **kwargs)
            except Exception as e:
                raise translate(e) from None

        return stream

    @functools.wraps(handler)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except Exception as e:
            raise translate(e) from None

    return call
