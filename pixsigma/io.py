"""Atomic output files (text, JSON, folders, PNGs carrying their generation parameters in a text chunk)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from pixsigma.constants import PARAMS_CHUNK


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp_path)`` into a temp file beside ``path``, then rename over it: readers see the old file or
    the new one, never half of one; the temp file is removed if writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be read by others (the app, users)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(obj: Any, path: str | os.PathLike, indent: int = 1) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent))


def swap_in_folder(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Replace folder ``final`` by the finished folder ``tmp`` (same parent): readers never see half of one."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


@contextmanager
def new_folder(final: str | os.PathLike) -> Iterator[Path]:
    """A temp folder beside ``final`` to fill; swapped in whole for ``final`` when the block ends, removed
    (``final`` untouched) when it raises."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the finished folder is an ordinary shared one
    try:
        yield tmp
        swap_in_folder(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (inf, -inf, nan) recorded as its string ("inf", "-inf", "nan"), so
    ``json.dumps(allow_nan=False)`` holds: ``Infinity`` and ``NaN`` are not JSON, and other readers refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def params_text(params: dict[str, Any]) -> str:
    """The JSON a PNG carries: keys sorted, unknown objects as their str, non-finite numbers as strings."""
    return json.dumps(finite_json(params), sort_keys=True, default=str, allow_nan=False)


def save_png(image: Image.Image, path: str | os.PathLike, params: dict[str, Any]) -> Path:
    """Write ``image`` to ``path`` with ``params`` as JSON in the PNG text chunk 'parameters' (``params_text``:
    always valid JSON). Written to a temp file in the same folder, then renamed: a crash never leaves half a PNG."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output {path} must end in .png (the parameters travel in a PNG text chunk)")
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMS_CHUNK, params_text(params))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_params(path: str | os.PathLike) -> dict[str, Any]:
    """The generation parameters a pixsigma PNG carries ({} if none)."""
    with Image.open(path) as im:
        text = im.text.get(PARAMS_CHUNK) if hasattr(im, "text") else None
    return json.loads(text) if text else {}


def numbered_paths(path: str | os.PathLike, n: int) -> list[Path]:
    """``out.png`` for one image, ``out-0.png``, ``out-1.png``… for several."""
    path = Path(path)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]
