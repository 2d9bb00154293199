"""Timing, memory and peak-throughput helpers, and the environment a number was measured in.

GPU timings use CUDA events around each repeat (after warm-up calls, which absorb
compilation, autotuning and allocator growth) and report the median; CPU timings use
``time.perf_counter``. Anything that cannot be measured raises ``NotMeasured``; a
caller never gets a placeholder number.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch


class NotMeasured(RuntimeError):
    """A measurement that could not be made; the message says why (it goes into the results as is)."""


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` timed calls after ``warmup`` untimed ones."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int
    warmup: int

    def to_dict(self) -> dict:
        return asdict(self)


def check_device(device: str) -> torch.device:
    """The torch device for ``cpu`` / ``cuda`` / ``cuda:N``; NotMeasured when it is not usable here."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise NotMeasured(f"unknown device {device!r}; accepted: cpu, cuda, cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise NotMeasured(f"device {device!r} requested but CUDA is not available "
                              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise NotMeasured(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
        return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    if dev.type != "cpu":
        raise NotMeasured(f"device type {dev.type!r} is not benchmarked; accepted: cpu, cuda")
    return dev


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> Timing:
    """Median latency of ``fn()``: CUDA events per repeat on a GPU, ``perf_counter`` on a CPU."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    if device.type == "cuda":
        # One event pair per repeat, read after a single sync, so timing adds no host stalls between calls.
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times), repeats, warmup)


def time_wall(fn: Callable[[], object], device: torch.device, warmup: int = 0, repeats: int = 1) -> Timing:
    """Wall-clock latency of a host-driven job (a whole image): perf_counter around ``fn()`` + device sync."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times), repeats, warmup)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Bytes ``torch.cuda.max_memory_allocated`` since the last reset; None on a CPU (not tracked)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192) -> dict:
    """Achieved FLOP/s of square ``n³`` matmuls in ``dtype``: the ceiling the DiT numbers are compared to."""
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    timing = time_calls(partial(torch.mm, a, b, out=out), device, warmup=3, repeats=10)
    flops = 2 * n**3
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops": flops,
            "tflops": flops / timing.median_s / 1e12, "timing": timing.to_dict()}


def free_memory(device: torch.device) -> None:
    """Give cached blocks back so the next peak-memory reading covers only what is alive."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    """Versions and hardware a run was measured on (written beside every table)."""
    import diffusers
    import transformers

    env = {"device_type": device.type, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda, "cudnn": None, "cpu": platform.processor() or platform.machine(),
           "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, gpu_memory_bytes=int(props.total_memory),
                   cudnn=torch.backends.cudnn.version(), driver_capability=f"{props.major}.{props.minor}")
    else:
        env["device_name"] = _cpu_name()
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
