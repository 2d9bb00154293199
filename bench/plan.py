"""What one run measures (settings, per-device profile) and how failures are recorded.

A measurement that fails is recorded as "not measured: reason" and collected; the run
then fails as a whole (no results written, non-zero exit) unless ``allow_partial``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch

from bench.measure import NotMeasured, free_memory
from pixsigma.speed import MODES

PARTS = ("dit", "e2e", "guidance")
T = TypeVar("T")


class BenchFailed(RuntimeError):
    """Some requested measurement could not be made; ``reasons`` lists each, as written to stderr."""

    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons))
        self.reasons = reasons


@dataclass(frozen=True)
class BenchSettings:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    sizes: tuple[int, ...] = ()  # square image sides in px; () = the profile's
    quick: bool = False  # tiny models, few repeats: a smoke test of the whole bench
    modes: tuple[str, ...] = ()  # pixsigma speed modes to time; () = the profile's
    parts: tuple[str, ...] = PARTS
    e2e_mode: str | None = None  # speed mode of the whole-image runs; None = the profile's
    allow_partial: bool = False  # write what was measured even if something was not
    steps: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for s in self.sizes:
            if not isinstance(s, int) or s < 16 or s % 16:
                raise ValueError(f"size {s!r} is not a positive multiple of 16 px (VAE factor 8 × patch 2)")
        bad = [m for m in (*self.modes, *([self.e2e_mode] if self.e2e_mode else [])) if m not in MODES]
        if bad:
            raise ValueError(f"unknown speed mode(s) {bad}; accepted: {', '.join(MODES)}")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"parts must be a non-empty subset of {', '.join(PARTS)}, got {list(self.parts)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")


@dataclass(frozen=True)
class Profile:
    """How a device kind is benchmarked: model scale, precision, sizes and repeats."""

    key: str  # results entry: cuda | cpu | cuda-quick | cpu-quick
    title: str
    arch: str  # bench.models.ARCHS
    dtype: torch.dtype
    sizes: tuple[int, ...]
    modes: tuple[str, ...]
    e2e_mode: str
    matmul_n: int
    graphs_max: int  # CUDA graphs are timed up to this size (launch overhead is noise above it)
    repeats: dict[int, int] = field(default_factory=dict)  # size -> timed repeats (default below)
    default_repeats: int = 3
    warmup: int = 2  # untimed calls before timing (default); compiled modes get 1 more, CUDA graphs 2 more
    warmups: dict[int, int] = field(default_factory=dict)  # size -> untimed calls
    e2e_repeats: dict[int, int] = field(default_factory=dict)
    guidance_interval: tuple[float, float] = (250.0, 750.0)  # timesteps where CFG stays on

    def repeats_for(self, size: int) -> int:
        return self.repeats.get(size, self.default_repeats)

    def warmup_for(self, size: int, mode: str = "eager") -> int:
        extra = {"compile": 1, "graphs": 2}.get(mode, 0)  # the first call compiles; graphs record on the next
        return self.warmups.get(size, self.warmup) + extra

    def e2e_repeats_for(self, size: int) -> int:
        return self.e2e_repeats.get(size, 1)


def profile_for(settings: BenchSettings, device: torch.device) -> Profile:
    cuda = device.type == "cuda"
    if settings.quick:
        p = Profile(key=f"{device.type}-quick", title=f"Quick smoke run ({device.type}, tiny random models)",
                    arch="tiny", dtype=torch.bfloat16 if cuda else torch.float32, sizes=(64, 128),
                    modes=("eager", "sdpa"), e2e_mode="eager", matmul_n=256, graphs_max=128,
                    default_repeats=2, warmup=1)
    elif cuda:
        p = Profile(key="cuda", title="GPU run: XL/2 (PixArt-Σ size), random weights", arch="xl",
                    dtype=torch.bfloat16, sizes=(1024, 2048, 4096), modes=("eager", "sdpa", "compile", "graphs"),
                    e2e_mode="compile", matmul_n=8192, graphs_max=1024, repeats={1024: 10, 2048: 5, 4096: 2},
                    warmup=2, warmups={2048: 1, 4096: 1}, e2e_repeats={1024: 2})
    else:
        p = Profile(key="cpu", title="CPU run: demo scale", arch="demo", dtype=torch.float32, sizes=(256,),
                    modes=("eager", "sdpa"), e2e_mode="eager", matmul_n=1024, graphs_max=0, default_repeats=10,
                    warmup=1, e2e_repeats={256: 3})
    overrides: dict[str, Any] = {}
    if settings.sizes:
        overrides["sizes"] = tuple(settings.sizes)
    if settings.modes:
        overrides["modes"] = tuple(settings.modes)
    if settings.e2e_mode:
        overrides["e2e_mode"] = settings.e2e_mode
    return replace(p, **overrides)


class Recorder:
    """Runs measurements, turning any failure into an explicit "not measured" entry."""

    def __init__(self, device: torch.device):
        self.device, self.failures, self.started = device, [], time.perf_counter()

    def log(self, msg: str) -> None:
        print(f"[bench {time.perf_counter() - self.started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def attempt(self, what: str, fn: Callable[[], T]) -> tuple[T | None, str | None]:
        """(fn(), None), or (None, reason) with the failure recorded against ``what``."""
        try:
            return fn(), None
        except NotMeasured as e:
            reason = str(e)
        except torch.OutOfMemoryError as e:
            reason = f"out of memory ({str(e).splitlines()[0][:200]})"
        except Exception as e:  # anything else still leaves an explicit hole, never a number
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        free_memory(self.device)
        self.failures.append(f"{what}: not measured: {reason}")
        self.log(f"NOT MEASURED {what}: {reason}")
        return None, reason


def failed_row(row: dict, reason: str) -> dict:
    return {**row, "status": "not measured", "reason": reason}
