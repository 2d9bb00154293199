"""The ``consistency`` stage: latent consistency distillation (LCM, as PixArt-δ) of a loaded model.

One step, per sample: pick a point ``t_start`` of a ``ddim_timesteps``-point skipping grid (PixArt: 50 of the
1000 training timesteps, so ``t_end = t_start − 20``); noise the clean latents to ``t_start``. The frozen
**teacher** (the starting model, with classifier-free guidance at a ``guidance`` drawn per sample) takes one
DDIM step from there to ``t_end``. The **target** is the EMA student's consistency output at (x_end, t_end); the
**student**'s output at (x_start, t_start) is pulled to it with the pseudo-Huber loss. A consistency output is
``c_skip(t)·x_t + c_out(t)·x̂0``, LCM's boundary scalings, which make it the identity at t = 0.

The student is a LoRA on the DiT (``lora:``, the default: small, and it composes with other LoRAs; the teacher is
then the same DiT with its adapters switched off) or the whole DiT (``lora: null``; the teacher a frozen copy).
The target EMA is this module's own (``target_ema``; PixArt's 0.95), checkpointed with the run so a resume is
exact. The student gets no guidance input: it learns the guided teacher, so it samples at guidance 1 (one DiT
call per step, no CFG batch).

Hyper-parameters follow PixArt-Σ's LCM config (Huber c 0.001, 50 DDIM timesteps, EMA 0.95); its teacher scale
``w`` ∈ [3, 15] is written in LCM's form ``cond + w·(cond − uncond)``, which is ``guidance`` = w + 1 here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pixsigma.constants import NUM_TRAIN_TIMESTEPS

from .sample import pad_tokens

Tensor = torch.Tensor
SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0  # LCM's boundary scalings, as diffusers' LCMScheduler uses them


@dataclass(frozen=True)
class ConsistencyStage:
    """``huber_c``: the pseudo-Huber loss's c (0 = L2 on the outputs' difference, as a mean of squares);
    ``ddim_timesteps``: points of the skipping solver's grid; ``guidance``: (low, high) of the teacher's CFG scale,
    drawn uniformly per sample (low = high: fixed); ``target_ema``: decay of the target's EMA of the student."""

    huber_c: float = 0.001
    ddim_timesteps: int = 50
    guidance: tuple[float, float] = (4.0, 16.0)
    target_ema: float = 0.95

    def __post_init__(self) -> None:
        if isinstance(self.huber_c, bool) or not isinstance(self.huber_c, int | float) or self.huber_c < 0:
            raise ValueError(f"stage.consistency.huber_c must be a number >= 0 (PixArt: 0.001), got {self.huber_c!r}")
        n = self.ddim_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= NUM_TRAIN_TIMESTEPS // 2:
            raise ValueError(f"stage.consistency.ddim_timesteps must be an integer in [1, {NUM_TRAIN_TIMESTEPS // 2}] "
                             f"(PixArt: 50), got {n!r}")
        g = self.guidance
        try:
            low, high = (float(v) for v in g)
            ok = not any(isinstance(v, bool) for v in g) and 1.0 <= low <= high
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"stage.consistency.guidance must be [low, high] with 1 <= low <= high (the teacher's CFG "
                             f"scale; PixArt's w in [3, 15] is [4, 16]), got {g!r}")
        object.__setattr__(self, "guidance", (low, high))
        e = self.target_ema
        if isinstance(e, bool) or not isinstance(e, int | float) or not 0.0 <= e < 1.0:
            raise ValueError(f"stage.consistency.target_ema must be in [0, 1) (PixArt: 0.95), got {e!r}")


def ddim_grid(n: int, num_train: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """(n,) the skipping solver's timesteps, ascending: k·(num_train // n) − 1 for k = 1..n (19, 39, …, 999)."""
    ratio = num_train // n
    return torch.arange(1, n + 1, dtype=torch.long) * ratio - 1


def boundary_scalings(t: Tensor) -> tuple[Tensor, Tensor]:
    """LCM's (c_skip, c_out) at integer timesteps ``t``: c_skip(0) = 1 and c_out(0) = 0, so f(x, 0) = x."""
    s = t.double() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2)
    c_out = s / (s ** 2 + SIGMA_DATA ** 2).sqrt()
    return c_skip.float(), c_out.float()


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Per-sample mean of sqrt((a − b)² + c²) − c (c = 0: of (a − b)²)."""
    d = (a.float() - b.float()) ** 2
    per = d if c == 0 else (d + c * c).sqrt() - c
    return per.mean(dim=tuple(range(1, per.ndim)))


def _col(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def x0_and_eps(out: Tensor, xt: Tensor, ac: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x̂0, ε̂) a model output (its first C channels: ε or v) implies at x_t, with ᾱ_t ``ac`` (B,)."""
    pred = out[:, :xt.shape[1]].float()
    a, s = _col(ac, xt).sqrt(), _col(1.0 - ac, xt).sqrt()
    if prediction_type == "epsilon":
        return (xt - s * pred) / a, pred
    return a * xt - s * pred, s * xt + a * pred  # v = a·ε − s·x0


def _adapter_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")]


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The DiT without its peft LoRA layers (the teacher of a LoRA student); they stay trainable afterwards."""
    layers = _adapter_layers(model)
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


class ConsistencyDistiller:
    """The stage's loss, teacher and target. ``net`` is the unwrapped student (its trainable parameters are what
    the target averages); ``teacher`` a frozen model, or None for ``net`` with its adapters off.
    ``state_dict``/``load_state_dict``: the target's EMA, for ``accelerate``'s checkpoints."""

    def __init__(self, net: nn.Module, alphas_cumprod: Tensor, cfg: ConsistencyStage, prediction_type: str,
                 teacher: nn.Module | None = None):
        if teacher is None and not _adapter_layers(net):
            raise ValueError("a consistency student without LoRA layers needs its own frozen teacher")
        self.net, self.teacher, self.cfg, self.prediction_type = net, teacher, cfg, prediction_type
        self.ac = alphas_cumprod.double()  # (T,)
        self.grid = ddim_grid(cfg.ddim_timesteps, len(alphas_cumprod))
        self.ratio = len(alphas_cumprod) // cfg.ddim_timesteps
        self.shadow = {k: p.detach().float().clone() for k, p in self._trainable()}

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(k, p) for k, p in self.net.named_parameters() if p.requires_grad]

    @contextmanager
    def target_weights(self) -> Iterator[None]:
        """The student with the target's EMA weights swapped in (no grad), restored after."""
        params = dict(self._trainable())
        saved = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.shadow[k].to(p.device, p.dtype))
            try:
                yield
            finally:
                for k, p in params.items():
                    p.copy_(saved[k])

    @torch.no_grad()
    def update_target(self) -> None:
        for k, p in self._trainable():
            s = self.shadow[k]
            s.lerp_(p.detach().to(s.device, s.dtype), 1.0 - self.cfg.target_ema)

    def state_dict(self) -> dict:
        # not "shadow": checkpoint_model reads that key as the run's EMA weights
        return {"target_ema": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.to(self.shadow[k].device) for k, v in state["target_ema"].items()}

    def sample_points(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(t_start, t_end, guidance) per sample: a grid point, the point one solver step before it, a CFG scale."""
        idx = torch.randint(0, len(self.grid), (batch,), device=device)
        start = self.grid.to(device)[idx]
        end = (start - self.ratio).clamp(min=0)
        low, high = self.cfg.guidance
        g = low + (high - low) * torch.rand(batch, device=device)
        return start, end, g

    def teacher_step(self, call: Callable[..., Tensor], x_start: Tensor, start: Tensor, end: Tensor, g: Tensor,
                     cond: tuple[Tensor, Tensor], uncond: tuple[Tensor, Tensor], extra: dict) -> Tensor:
        """x at ``end``: one DDIM step of the guided teacher (uncond + g·(cond − uncond)) from ``x_start``."""
        y = torch.cat([uncond[0], cond[0]])
        mask = torch.cat([uncond[1], cond[1]])
        twice = {k: torch.cat([v, v]) for k, v in extra.items()}
        out = call(torch.cat([x_start] * 2), torch.cat([start] * 2), y, mask, **twice)
        ac_s = self.ac.to(x_start.device)[start]
        x0, eps = x0_and_eps(out, torch.cat([x_start] * 2), torch.cat([ac_s] * 2), self.prediction_type)
        (x0_u, x0_c), (eps_u, eps_c) = x0.chunk(2), eps.chunk(2)
        w = _col(g, x_start)
        x0_g, eps_g = x0_u + w * (x0_c - x0_u), eps_u + w * (eps_c - eps_u)
        ac_e = _col(self.ac.to(x_start.device)[end], x_start)
        return ac_e.sqrt() * x0_g + (1.0 - ac_e).sqrt() * eps_g

    def consistency_output(self, out: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """c_skip(t)·x_t + c_out(t)·x̂0(out)."""
        x0, _ = x0_and_eps(out, xt, self.ac.to(xt.device)[t], self.prediction_type)
        c_skip, c_out = boundary_scalings(t)
        return _col(c_skip, xt) * xt.float() + _col(c_out, xt) * x0

    def losses(self, student: Callable[..., Tensor], x0: Tensor, y: Tensor, mask: Tensor,
               y_null: Tensor, mask_null: Tensor, extra: dict) -> dict[str, Tensor]:
        """Per-sample ``loss`` (pseudo-Huber) and ``mse`` (B,) of one batch of clean latents x0 (B, C, h, w) with
        captions y (B, L, C) and the null caption (1, L0, C). The teacher and the target run first, without grad;
        then ``student`` (the wrapped model, whose backward the caller runs) once."""
        b, dev = x0.shape[0], x0.device
        start, end, g = self.sample_points(b, dev)
        noise = torch.randn_like(x0)
        ac_s = _col(self.ac.to(dev)[start], x0)
        x_start = ac_s.sqrt() * x0 + (1.0 - ac_s).sqrt() * noise
        length = max(y.shape[1], y_null.shape[1])
        y, mask = pad_tokens(y, mask, length)
        yn, mn = pad_tokens(y_null.to(y), mask_null.to(mask), length)
        uncond = (yn.expand(b, -1, -1), mn.expand(b, -1))
        with torch.no_grad():
            if self.teacher is not None:
                x_end = self.teacher_step(self.teacher, x_start, start, end, g, (y, mask), uncond, extra)
            else:
                with adapters_off(self.net):
                    x_end = self.teacher_step(self.net, x_start, start, end, g, (y, mask), uncond, extra)
            x_end = x_end.to(x0.dtype)
            with self.target_weights():
                target = self.consistency_output(self.net(x_end, end, y, mask, **extra), x_end, end)
        pred = self.consistency_output(student(x_start, start, y, mask, **extra), x_start, start)
        return {"loss": pseudo_huber(pred, target, self.cfg.huber_c), "mse": pseudo_huber(pred.detach(), target, 0.0)}
