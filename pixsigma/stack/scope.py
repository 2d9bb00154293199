"""A request's state on the pipeline, scoped to the request: its LoRAs (``req.loras``; None keeps the pipeline's
own set, ``PixSigmaPipeline.set_loras``), its KV override, the ControlNet's KV (which follows the DiT's) and the
VAE's dtype (an fp16 VAE is upcast to decode) hold for the request only, and everything is put back as it was when
the request ends, raises or is cancelled (a callback raising)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pixsigma.lora import LoraSpec


@contextmanager
def request_scope(pipe: Any, req: Any) -> Iterator[None]:
    """Apply ``req``'s LoRAs and KV override to ``pipe`` for the ``with`` block; restore the pipeline's own after."""
    dit, net = pipe.transformer, pipe.controlnet
    own_loras = list(pipe.loras.active)
    own_kv = dit.config.kv_compress
    own_net_kv = net.kv if net is not None else None
    own_vae_dtype = pipe.vae.dtype  # decoding an fp16 SD/SDXL VAE upcasts it (pixsigma.sampling.decode)
    try:
        if req.loras is not None and [(s.path, s.scale) for s in req.loras] != own_loras:
            pipe.loras.set(list(req.loras))  # a swap of adapters, never a reload
        if req.kv is not None and req.kv != own_kv:
            dit.set_kv_compress(req.kv)
        if net is not None and net.kv != dit.config.kv_compress:
            net.set_kv_compress(dit.config.kv_compress)  # copy i compresses as base layer i does
        yield
    finally:
        if dit.config.kv_compress != own_kv:
            dit.set_kv_compress(own_kv)
        if net is not None and net.kv != own_net_kv:
            net.set_kv_compress(own_net_kv)
        if pipe.vae.dtype != own_vae_dtype:
            pipe.vae.to(own_vae_dtype)
        if list(pipe.loras.active) != own_loras:
            pipe.loras.set([LoraSpec(p, s) for p, s in own_loras])
