"""Aspect-ratio buckets: the PixArt tables for 256–2048 px, a 4096 one built the same way, and snapping.

Tables map the ratio h/w (rounded to 2 decimals, as the released tables key them)
to (height, width) in pixels. 256/512 are the 1024 table scaled by 1/4 and 1/2; 4096
is the 2048 table doubled. Any other base resolution (the shapes demo's 128/256 px)
scales the nearest table and snaps each side to a multiple of ``SIZE_MULTIPLE``.
"""

from __future__ import annotations

from functools import cache

from pixsigma.constants import SIZE_MULTIPLE

# (h, w) in units of 64 px for ratios h/w <= 1; the other half mirrors them.
_HALF_1024 = [(8, 32), (8, 29), (9, 28), (9, 27), (9, 26), (10, 25), (10, 24), (11, 23), (11, 22), (11, 21),
              (12, 21), (12, 20), (13, 19), (13, 18), (14, 18), (14, 17), (15, 17), (15, 16), (16, 16)]
_HALF_2048 = [(16, 64), (16, 62), (16, 60), (16, 58), (18, 56), (18, 54), (18, 52), (20, 50), (20, 48), (22, 46),
              (22, 44), (22, 42), (24, 42), (24, 40), (26, 38), (26, 36), (28, 36), (28, 34), (30, 34), (30, 32),
              (32, 32)]
# Mirrors the released tables do not carry (so binning matches diffusers' pipelines exactly).
_MISSING_1024 = frozenset({(21, 11), (26, 9), (28, 9), (29, 8)})
_MISSING_2048 = frozenset({(42, 22)})

MIN_RESOLUTION, MAX_RESOLUTION = 64, 4096


def _mirror(half: list[tuple[int, int]], unit: float, drop: set[tuple[int, int]] = frozenset()) -> dict:
    pairs = half + [(w, h) for h, w in reversed(half) if h != w and (w, h) not in drop]
    return {round(h / w, 2): (round(h * unit), round(w * unit)) for h, w in pairs}


def _snap(x: float) -> int:
    return max(SIZE_MULTIPLE, int(round(x / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


@cache
def bucket_table(resolution: int) -> dict[float, tuple[int, int]]:
    """ratio h/w -> (h, w) px for a base ``resolution`` (the side of its square bucket)."""
    if not isinstance(resolution, int) or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise ValueError(f"base resolution must be an integer in [{MIN_RESOLUTION}, {MAX_RESOLUTION}] px, "
                         f"got {resolution!r}")
    t1024 = _mirror(_HALF_1024, 64, _MISSING_1024)
    if resolution in (256, 512, 1024):
        s = resolution / 1024
        return {r: (round(h * s), round(w * s)) for r, (h, w) in t1024.items()}
    if resolution in (2048, 4096):
        return _mirror(_HALF_2048, 64 * resolution / 2048, _MISSING_2048)
    base = t1024 if resolution < 2048 else _mirror(_HALF_2048, 64, _MISSING_2048)
    s = resolution / (1024 if resolution < 2048 else 2048)
    out: dict[float, tuple[int, int]] = {}
    for _, (h, w) in base.items():
        hh, ww = _snap(h * s), _snap(w * s)
        out.setdefault(round(hh / ww, 2), (hh, ww))
    return dict(sorted(out.items()))


def nearest_bucket(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The bucket (h, w) of ``resolution`` whose ratio is closest to height/width."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    table = bucket_table(resolution)
    ratio = min(table, key=lambda r: abs(r - height / width))
    return table[ratio]


def check_size(height: int, width: int) -> None:
    """Refuse sizes the model cannot take when binning is off (multiples of 16, within range)."""
    max_side = 2 * MAX_RESOLUTION
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v < SIZE_MULTIPLE or v > max_side or v % SIZE_MULTIPLE:
            raise ValueError(f"{name} {v!r} is not accepted without binning: use a multiple of {SIZE_MULTIPLE} "
                             f"between {SIZE_MULTIPLE} and {max_side} px (or leave binning on to snap to a bucket)")
