"""The one small training loop the demo's frozen parts share (the T5 text encoder, both VAEs' phases).

The DiT has its own loop (``train/``: accelerate, checkpoints, resume); these parts train once, in
minutes, in one process, so a plain loop with a time budget is all they need.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch


def fit(step_loss: Callable[[int], torch.Tensor], optimizer: torch.optim.Optimizer,
        lr_lambda: Callable[[int], float], steps: int, what: str, max_seconds: float | None = None,
        log: Callable[[str], None] | None = None, clip: float | None = None) -> tuple[int, float]:
    """``steps`` optimizer steps on ``step_loss(step)`` with the LR multiplier ``lr_lambda(step)`` (and the
    gradient norm clipped to ``clip``); returns (steps done, last loss). Stops early, and says so, once
    ``max_seconds`` have passed: then the result is no longer a pure function of the seed."""
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    t0, done, last = time.perf_counter(), 0, float("nan")
    for step in range(steps):
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        sched.step()
        done, last = step + 1, loss.item()
        if log is not None and (step % 100 == 0 or done == steps):
            log(f"{what} step {done}/{steps} loss {last:.4f}")
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            if log is not None:
                log(f"{what}: time budget reached after {done} steps (the result is no longer seed-deterministic)")
            break
    return done, last


def warmup_cosine(steps: int, warmup: int = 50) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
