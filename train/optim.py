"""Optimizer (CAME by default, AdamW), the LR schedule, EMA weights, and the loop's resumable position.

Everything here has ``state_dict``/``load_state_dict`` so ``accelerator.save_state`` checkpoints it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from .config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter] | list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """Over the parameters that require grad; ``params`` may be torch's parameter groups (dicts with their own
    ``lr``), as the controlnet stage gives."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        params = [p for p in params if p.requires_grad]
    if cfg.name == "came":
        from came_pytorch import CAME

        return CAME(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps[0])


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "constant") -> float:
    """The LR multiplier after ``step`` optimizer steps: linear warm-up from ~0 over ``warmup_steps``, then 1
    (``constant``, PixArt's) or a half cosine that reaches 0 at ``total_steps`` (``cosine``)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total_steps, cfg.schedule))


class EMA:
    """fp32 exponential moving average of the parameters (and a copy of the buffers)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.is_floating_point():
                s.lerp_(v.detach().to(s.device, s.dtype), 1.0 - self.decay)
            else:
                s.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.to(self.shadow[k].device) for k, v in state["shadow"].items()}


@dataclass
class TrainState:
    """Where the loop is: optimizer steps done, and the data position (epoch, batches consumed in it)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
