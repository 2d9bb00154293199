"""ZeroGPU: how long each request asks for the GPU, and the models' move onto it inside the call.

On a ZeroGPU Space a GPU is attached only while a function marked ``spaces.GPU`` runs, and the Space's queue
favours short requests: ``spaces.GPU(duration=fn)`` takes a callable that receives the handler's own arguments
and returns the seconds to reserve. The estimate here is steps × images × the per-step cost of the request's
resolution (the one table below), plus a fixed cost per request, times a safety margin, never below a floor
nor above ZeroGPU's cap. The models are loaded on the CPU at import (no GPU exists then) and moved to CUDA at the
start of each decorated call. Where ``spaces`` is not installed the decorator is the identity.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from pixsigma_ui.engine import AppEngine, Limits

F = TypeVar("F", bound=Callable)

# Seconds per image per sampling step (guidance on: batch 2) of PixArt-Σ XL in bf16 on ZeroGPU's GPU, by base
# resolution; derived in docs/spaces.md from bench/flops.py's FLOPs per step.
STEP_SECONDS = {256: 0.005, 512: 0.015, 1024: 0.06, 2048: 0.45, 4096: 5.0}
REQUEST_SECONDS = 8.0  # per call: the move to CUDA, T5 encoding and the VAE decode
MARGIN = 1.5  # a request that outlives its reservation is killed: ask for half as much again
FLOOR_S = 15  # below this the reservation is all overhead
MAX_S = 300  # ZeroGPU's longest single reservation (docs/spaces.md)
COMPARE_IMAGES = 4  # a handler without num_images (Compare) renders α, Σ, Σ full and Σ KV
ZEROGPU_MEMORY = 70 * 2**30  # the GPU slice a ZeroGPU call gets: sets the per-request limits


def step_seconds(resolution: int) -> float:
    """The table's cost at ``resolution``, scaled by pixels from the nearest base resolution at or above it (from
    above: attention grows faster than pixels, so the smaller band's cost scaled up would underestimate)."""
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer (px), got {resolution!r}")
    above = [r for r in STEP_SECONDS if r >= resolution] or [max(STEP_SECONDS)]
    base = min(above)
    return STEP_SECONDS[base] * (resolution / base) ** 2


def estimate_seconds(steps: int, resolution: int, images: int) -> int:
    """GPU seconds to reserve for ``images`` images of ``steps`` steps at ``resolution`` px."""
    for name, v in (("steps", steps), ("images", images)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    work = REQUEST_SECONDS + steps * images * step_seconds(resolution)
    return int(min(MAX_S, max(FLOOR_S, math.ceil(work * MARGIN))))


def duration_for(fn: Callable, default_resolution: int) -> Callable[..., int]:
    """The ``spaces.GPU(duration=…)`` callable of handler ``fn``: reads ``steps``, ``resolution`` and
    ``num_images`` from the call's arguments (the handler's defaults where absent). Input the handler will
    refuse gets the floor: the call fails fast either way."""
    sig = inspect.signature(fn)
    images_default = 1 if "num_images" in sig.parameters else COMPARE_IMAGES

    def duration(*args: Any, **kwargs: Any) -> int:
        try:
            bound = sig.bind_partial(*args, **kwargs)
            bound.apply_defaults()
            given = bound.arguments
            steps = int(given.get("steps", 20))
            resolution = int(given.get("resolution", default_resolution))
            images = int(given.get("num_images", images_default))
            return estimate_seconds(steps, resolution, images)
        except (TypeError, ValueError):
            return FLOOR_S

    return duration


def on_cuda(engine: AppEngine, fn: F) -> F:
    """``fn`` that first moves the engine's models to CUDA when a GPU is attached (ZeroGPU: only inside the
    decorated call); generators stay generators, as gradio streams them."""
    def move() -> None:
        if torch.cuda.is_available() and engine.device.type != "cuda":
            engine.move_to("cuda")

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args: Any, **kwargs: Any):
            move()
            yield from fn(*args, **kwargs)
        return gen  # type: ignore[return-value]

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        move()
        return fn(*args, **kwargs)
    return call  # type: ignore[return-value]


def gpu_decorator(engine: AppEngine, spaces: Any = None) -> Callable[[F], F]:
    """``spaces.GPU(duration=<estimate>)`` around ``on_cuda(fn)`` where the ``spaces`` package is installed
    (a Space), else the identity. On ZeroGPU the engine, loaded on the CPU, gets a GPU's per-request limits."""
    if spaces is None:
        try:
            import spaces  # a Space's own package (ZeroGPU); optional
        except ImportError:
            return lambda fn: fn
    if engine.device.type == "cpu" and getattr(getattr(spaces, "config", None), "Config", None) is not None \
            and getattr(spaces.config.Config, "zero_gpu", False):
        engine.limits = Limits.for_device("cuda", ZEROGPU_MEMORY, engine.info().resolution)
    resolution = engine.info().resolution

    def decorate(fn: F) -> F:
        return spaces.GPU(duration=duration_for(fn, resolution))(on_cuda(engine, fn))

    return decorate
