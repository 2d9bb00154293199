"""DiT per-step latency, side by side: diffusers' PixArtTransformer2DModel (the peer) and pixsigma
without and with KV compression in each speed mode, with the same weights and inputs.

Also checks that what should be equal is: pixsigma without KV against the peer, and every
speed mode against eager (max abs difference of the outputs, reported, not asserted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch

from bench.flops import dit_step_flops
from bench.measure import free_memory, peak_memory, reset_peak_memory, time_calls
from bench.models import build_peer, build_pixsigma, dit_config, dit_inputs, random_dit_weights, run_peer, run_pixsigma
from bench.plan import Profile, Recorder, failed_row
from pixsigma.speed import chosen_backends, optimize

BATCH = 2  # one image with classifier-free guidance


def _timed(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeats: int
           ) -> tuple[dict, torch.Tensor]:
    """(timing + memory, output of the first call). Extra memory = peak during the calls − resident before."""
    free_memory(device)
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    reset_peak_memory(device)
    with torch.no_grad():
        out = fn().float().clone()  # the first call also warms up (compiles, tunes SDPA)
        timing = time_calls(fn, device, max(0, warmup - 1), repeats)
    peak = peak_memory(device)
    extra = None if peak is None or resident is None else peak - resident
    timing = replace(timing, warmup=max(1, warmup))  # the first call above was a warm-up too
    return {"timing": timing.to_dict(), "extra_memory_bytes": extra}, out


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a - b).abs().max().item()
    ref = b.abs().max().item()
    return {"max_abs_diff": d, "max_abs_ref": ref, "relative": d / ref if ref else float("inf")}


def bench_dit(p: Profile, device: torch.device, rec: Recorder, peak_tflops: float | None, seed: int = 0
              ) -> tuple[list[dict], list[dict]]:
    """(latency rows, equality rows) for every size of the profile."""
    rows: list[dict] = []
    equality: list[dict] = []
    for size in p.sizes:
        _bench_size(p, size, device, rec, peak_tflops, seed, rows, equality)
        free_memory(device)
    return rows, equality


def _finish(row: dict, measured: dict | None, reason: str | None, flops: int, peak_tflops: float | None) -> dict:
    if measured is None:
        return failed_row(row, reason)
    tflops = flops / measured["timing"]["median_s"] / 1e12
    frac = tflops / peak_tflops if peak_tflops else None
    return {**row, "status": "ok", **measured, "flops": flops, "tflops": tflops, "peak_fraction": frac}


def _bench_size(p: Profile, size: int, device: torch.device, rec: Recorder, peak_tflops: float | None, seed: int,
                rows: list[dict], equality: list[dict]) -> None:
    cfg = dit_config(p.arch, size)
    inputs = dit_inputs(cfg, size, BATCH, device, p.dtype, seed)
    weights, reason = rec.attempt(f"{size}px DiT weights", lambda: random_dit_weights(cfg, device, seed))
    if weights is None:
        rows.append(failed_row({"size": size, "impl": "all", "kv": "–", "mode": "–"}, reason))
        return

    # The peer: diffusers, eager, torch's default SDPA choice, as users run it.
    rec.log(f"{size}px diffusers")

    def peer_run() -> tuple[dict, torch.Tensor]:
        peer = build_peer(cfg, weights, device, p.dtype)
        return _timed(lambda: run_peer(peer, inputs), device, p.warmup_for(size), p.repeats_for(size))

    res, reason = rec.attempt(f"{size}px diffusers", peer_run)
    row = {"size": size, "impl": "diffusers", "kv": "off", "mode": "eager"}
    peer_row = _finish(row, res[0] if res else None, reason, dit_step_flops(cfg, size, size, BATCH).total,
                       peak_tflops)
    rows.append(peer_row)
    peer_out = res[1] if res else None
    peer_s = peer_row["timing"]["median_s"] if peer_row["status"] == "ok" else None
    free_memory(device)
    for kv in (False, True):
        _bench_pixsigma(p, size, kv, weights, inputs, device, rec, peak_tflops, peer_s, peer_out, rows, equality)
        free_memory(device)


def _bench_pixsigma(p: Profile, size: int, kv: bool, weights: dict, inputs: dict, device: torch.device,
                    rec: Recorder, peak_tflops: float | None, peer_s: float | None, peer_out: torch.Tensor | None,
                    rows: list[dict], equality: list[dict]) -> None:
    """Every speed mode of one pixsigma model (KV off or on) at one size."""
    cfg = dit_config(p.arch, size, kv)
    kvc = cfg.kv_compress
    kv_label = f"R={kvc.ratio} on {kvc.layers[0]}–{kvc.layers[-1]}" if kv else "off"
    flops = dit_step_flops(cfg, size, size, BATCH).total
    model, reason = rec.attempt(f"{size}px pixsigma KV {kv_label} build",
                                lambda: build_pixsigma(cfg, weights, device, p.dtype))
    eager_out = None
    for mode in p.modes:
        row = {"size": size, "impl": "pixsigma", "kv": kv_label, "mode": mode}
        what = f"{size}px pixsigma KV {kv_label} {mode}"
        if model is None:
            rows.append(failed_row(row, reason))
            continue
        if mode == "graphs" and size > p.graphs_max:
            rows.append({**row, "status": "skipped", "reason": f"CUDA graphs are timed up to {p.graphs_max} px "
                         "only (kernel-launch overhead is noise at this size)"})
            continue
        rec.log(what)
        res, reason_m = rec.attempt(what, partial(_time_mode, model, mode, inputs, device,
                                                  p.warmup_for(size, mode), p.repeats_for(size)))
        out_row = _finish(row, res[0] if res else None, reason_m, flops, peak_tflops)
        if res is not None:
            out_row["speedup"] = peer_s / out_row["timing"]["median_s"] if peer_s else None
            out_row["sdpa_backends"] = chosen_backends(model)
            out = res[1]
            if mode == "eager":
                eager_out = out
                if not kv and peer_out is not None:
                    equality.append({"size": size, "a": "pixsigma (KV off, eager)", "b": "diffusers", "status": "ok",
                                     **_diff(out, peer_out)})
            elif eager_out is not None:
                equality.append({"size": size, "a": f"pixsigma (KV {kv_label}, {mode})",
                                 "b": f"pixsigma (KV {kv_label}, eager)", "status": "ok", **_diff(out, eager_out)})
        rows.append(out_row)
    if model is not None:
        optimize(model, "eager")


def _time_mode(model, mode: str, inputs: dict, device: torch.device, warmup: int, repeats: int
               ) -> tuple[dict, torch.Tensor]:
    optimize(model, mode)
    return _timed(lambda: run_pixsigma(model, inputs), device, warmup, repeats)
