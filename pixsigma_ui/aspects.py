"""Aspect ratios as the app offers them ('16:9', width:height) and the bucket size each gives at a resolution:
a leaf, so every tab and panel reads the same table without importing another tab."""

from __future__ import annotations

import reprlib

from pixsigma.buckets import nearest_bucket

ASPECTS = ("1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "2:1", "1:2")  # width:height


def parse_aspect(text: str) -> float:
    """'16:9' (width:height) -> height / width."""
    try:
        w, h = (float(x) for x in str(text).split(":"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"aspect_ratio {reprlib.repr(text)} must be 'width:height' with positive numbers, e.g. "
                         f"{', '.join(ASPECTS)}") from None
    return h / w


def bucket_size(aspect: str, resolution: int) -> tuple[int, int]:
    """(height, width) the bucket table of ``resolution`` gives ``aspect``."""
    return nearest_bucket(round(1000 * parse_aspect(aspect)), 1000, resolution)


def aspect_choices(resolution: int) -> list[tuple[str, str]]:
    """Dropdown (label, value) pairs, the label showing the bucket's pixel size at ``resolution``."""
    out = []
    for a in ASPECTS:
        h, w = bucket_size(a, int(resolution))
        out.append((f"{a}  ({w}×{h})", a))
    return out
