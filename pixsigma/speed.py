"""Opt-in inference speed-ups for the DiT.

``optimize(model, mode)`` changes how a :class:`PixArtDiT` runs, never what it computes
(up to the rounding of different kernels):

- ``eager``   plain PyTorch (undoes any other mode);
- ``sdpa``    per input shape, time the scaled-dot-product-attention backends on the model's own
              self-attention shapes (full and KV-compressed) once and run that shape under the fastest
              (``torch.nn.attention.sdpa_kernel``; cuDNN vs flash vs memory-efficient on a GPU);
- ``compile`` ``sdpa`` + ``torch.compile`` of each transformer block (regional compilation: the blocks
              share one compiled artifact, so compiling costs one block, not 28), specialised per bucket
              shape (``dynamic=False``: each bucket gets kernels for its exact size);
- ``graphs``  ``compile`` with CUDA graphs (``mode="reduce-overhead"``): removes kernel-launch overhead,
              which matters at 1024 px and below, not at 4K.

A ControlNet's copied blocks run inside the DiT's forward (``PixArtDiT.forward(block_hook=…)``), so the kernel
choice and the CUDA-graph step mark cover them; ``match_blocks`` compiles them as the DiT's own blocks are.
``cfg_interval`` (the guidance interval, which changes images) lives in ``pixsigma.stack.guidance``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch._dynamo
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pixsigma.model.dit import PixArtDiT
from pixsigma.stack.guidance import cfg_interval

__all__ = ["MODES", "cfg_interval", "choose_sdpa_backend", "chosen_backends", "match_blocks", "optimize",
           "speed_mode"]

Tensor = torch.Tensor
MODES = ("eager", "sdpa", "compile", "graphs")
# Backends worth timing per device type; MATH is never the fastest on a GPU and needs N² memory.
SDPA_CANDIDATES = {"cuda": (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION),
                   "cpu": (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)}
_ALL_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                 SDPBackend.MATH)
# Each bucket shape × KV setting × mode is one compiled entry of the shared block code; dynamo's default
# limit (8) would silently fall back to eager after a few buckets.
RECOMPILE_LIMIT = 64


@dataclass
class _SpeedState:
    mode: str
    backends: dict[tuple, SDPBackend | None] = field(default_factory=dict)  # per input signature


def optimize(model: PixArtDiT, mode: str = "compile") -> PixArtDiT:
    """Make ``model`` run in ``mode`` (one of MODES), in place, and return it. Calling again replaces the
    previous mode; ``eager`` restores plain PyTorch. Weights, ``state_dict`` and outputs are unchanged."""
    if mode not in MODES:
        raise ValueError(f"unknown speed mode {mode!r}; accepted: {', '.join(MODES)}")
    if not isinstance(model, PixArtDiT):
        raise TypeError(f"optimize() takes a PixArtDiT, got {type(model).__name__}")
    _undo(model)
    if mode == "eager":
        return model
    state = _SpeedState(mode)
    model._speed = state
    match_blocks(model, model.blocks)
    plain = type(model).forward.__get__(model)

    def forward(x: Tensor, t: Tensor, y: Tensor, mask: Tensor | None = None, **extra) -> Tensor:
        if mode == "graphs":
            # One forward = one CUDA-graph iteration: the 28 block graphs form one path whose intermediate
            # outputs stay valid until the next forward (otherwise every block call would start a new one).
            torch.compiler.cudagraph_mark_step_begin()
        backend = _backend_for(model, state, x, y)
        if backend is None:
            return plain(x, t, y, mask, **extra)
        with sdpa_kernel(_priority(backend), set_priority=True):
            return plain(x, t, y, mask, **extra)

    model.forward = forward  # instance attribute: the class, other models and the state_dict are untouched
    return model


def match_blocks(model: PixArtDiT, blocks: Iterable[nn.Module]) -> None:
    """Compile ``blocks`` (the DiT's own, or a ControlNet's copies of them) as ``model``'s mode compiles its
    blocks (regional, per bucket shape); uncompile them in the other modes. A block already compiled alike is kept,
    so calling this on every request compiles once."""
    mode = speed_mode(model)
    compiled = mode in ("compile", "graphs")
    if compiled:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        if getattr(block, "_speed_compiled", None) == (mode if compiled else None):
            continue
        block._compiled_call_impl = None
        if compiled:
            kwargs = {"dynamic": False, "fullgraph": True}
            if mode == "graphs":
                kwargs["mode"] = "reduce-overhead"
            block.compile(**kwargs)
        block._speed_compiled = mode if compiled else None


def speed_mode(model: PixArtDiT) -> str:
    """The mode ``model`` currently runs in."""
    state = getattr(model, "_speed", None)
    return state.mode if state is not None else "eager"


def chosen_backends(model: PixArtDiT) -> dict[str, str]:
    """The SDPA backend picked per input signature so far (for reports)."""
    state = getattr(model, "_speed", None)
    if state is None:
        return {}
    return {"x".join(str(s) for s in key[0]): (b.name if b is not None else "default")
            for key, b in state.backends.items()}


def _undo(model: PixArtDiT) -> None:
    if "forward" in model.__dict__:
        del model.forward
    if hasattr(model, "_speed"):
        del model._speed
    match_blocks(model, model.blocks)


def _priority(best: SDPBackend) -> list[SDPBackend]:
    # The fastest first; the rest stay allowed so the masked cross-attention (which flash cannot run)
    # still finds a kernel.
    return [best] + [b for b in _ALL_BACKENDS if b != best]


def _backend_for(model: PixArtDiT, state: _SpeedState, x: Tensor, y: Tensor) -> SDPBackend | None:
    c = model.config
    key = (tuple(x.shape), x.dtype, x.device.type, c.kv_compress, y.shape[1])
    if key not in state.backends:
        h, w = x.shape[-2] // c.patch_size, x.shape[-1] // c.patch_size
        lengths: dict[int, int] = {}
        for layer in range(c.depth):
            r = c.kv_compress.ratio_for(layer)
            m = h * w if r == 1 else -(-h // r) * -(-w // r)  # keys per self-attention after KV merging
            lengths[m] = lengths.get(m, 0) + 1
        dtype = next(model.parameters()).dtype
        state.backends[key] = choose_sdpa_backend(x.shape[0], c.num_heads, c.head_dim, h * w, lengths,
                                                  dtype, x.device)
    return state.backends[key]


@torch.no_grad()
def choose_sdpa_backend(batch: int, heads: int, head_dim: int, queries: int, key_lengths: dict[int, int],
                        dtype: torch.dtype, device: torch.device) -> SDPBackend | None:
    """The backend with the least total time over the self-attentions of one forward: ``key_lengths`` maps
    a key count M to how many layers attend over it. None when no candidate runs (keep torch's default)."""
    candidates = SDPA_CANDIDATES.get(device.type, ())
    g = torch.Generator(device=device).manual_seed(0)

    def heads_view(n: int) -> Tensor:  # the model's layout: (B, N, h, d) viewed as (B, h, N, d)
        return torch.randn(batch, n, heads, head_dim, generator=g, device=device, dtype=dtype).transpose(1, 2)

    q = heads_view(queries)
    cost = dict.fromkeys(candidates, 0.0)
    for m, count in key_lengths.items():
        k, v = heads_view(m), heads_view(m)
        for backend in candidates:
            if cost[backend] != float("inf"):
                t = _time_sdpa(backend, q, k, v)
                cost[backend] = float("inf") if t is None else cost[backend] + count * t
    runnable = {b: c for b, c in cost.items() if c != float("inf")}
    return min(runnable, key=runnable.get) if runnable else None


def _time_sdpa(backend: SDPBackend, q: Tensor, k: Tensor, v: Tensor) -> float | None:
    """Median seconds of three SDPA calls on ``backend``; None when it cannot run these shapes."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    try:
        with sdpa_kernel(backend):
            sdpa(q, k, v)  # warm-up (and the "no kernel for these inputs" check)
            times = []
            for _ in range(3):
                if q.device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    sdpa(q, k, v)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / 1e3)
                else:
                    t0 = time.perf_counter()
                    sdpa(q, k, v)
                    times.append(time.perf_counter() - t0)
    except RuntimeError:  # backend unavailable for this dtype/shape/GPU
        return None
    return sorted(times)[len(times) // 2]
