"""Images an attacker or a careless user sends, written byte by byte at test time (tiny files, huge headers)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, depth: int, colour: int, rows: list[bytes] | None = None,
              palette: bytes | None = None) -> bytes:
    """A PNG of ``width × height`` (``colour``: 0 grey, 2 RGB, 3 palette) at ``depth`` bits; ``rows`` are the
    raw scanlines (filter byte added here), None: all zero, compressed as a stream (a 20000² image is ~50 KB)."""
    channels = {0: 1, 2: 3, 3: 1}[colour]
    line = (width * channels * depth + 7) // 8
    z = zlib.compressobj(9)
    parts = []
    zero = b"\0" * (line + 1)
    for y in range(height):
        parts.append(z.compress(b"\0" + rows[y] if rows is not None else zero))
    parts.append(z.flush())
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    if colour == 3:
        out += _chunk(b"PLTE", palette or b"\0\0\0")
    return out + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def huge_paletted_png(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit paletted ``side × side`` PNG of a few dozen KB (400 million pixels at the default side)."""
    path.write_bytes(png_bytes(side, side, 1, 3, palette=b"\0\0\0"))
    return path


def grey16_png(path: Path, values: np.ndarray) -> Path:
    """A 16-bit grey PNG of ``values`` (H, W) uint16."""
    rows = [v.astype(">u2").tobytes() for v in values]
    path.write_bytes(png_bytes(values.shape[1], values.shape[0], 16, 0, rows))
    return path


def rgb16_png(path: Path, values: np.ndarray) -> Path:
    """A 16-bit RGB PNG of ``values`` (H, W, 3) uint16."""
    rows = [v.astype(">u2").tobytes() for v in values]
    path.write_bytes(png_bytes(values.shape[1], values.shape[0], 16, 2, rows))
    return path
