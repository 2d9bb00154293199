"""Whole images: prompt -> T5 -> 20 DiT steps with CFG -> VAE (tiled from 2K), through PixSigmaPipeline.

GPU: a random T5-XXL-sized encoder, the XL/2 DiT with KV compression (R = 2 on the deep
half) and an SDXL-sized VAE, assembled with ``PixSigmaPipeline(...)``; each size runs with
T5 on the GPU and with T5 offloaded to the CPU (peak memory is the pipeline's own reading).
CPU: the shipped demo model, or — only while it does not exist — a random pipeline that
says so in every row; beside it the demo with its few-step adapter ``demo-lcm`` (4 LCM steps at guidance 1,
one DiT call a step: docs/fewstep.md). Also the guidance-interval option on the sampling loop.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch

from bench.measure import free_memory, time_wall
from bench.models import (
    build_pixsigma,
    build_t5,
    build_tokenizer,
    build_vae,
    dit_config,
    dit_inputs,
    random_dit_weights,
)
from bench.plan import Profile, Recorder, failed_row
from pixsigma.lora import LoraSpec
from pixsigma.pipeline import GenerationRequest, PixSigmaPipeline
from pixsigma.sampling import denoise, initial_noise, make_scheduler
from pixsigma.speed import cfg_interval, optimize

PROMPT = "a small red star above a large blue ring in the photo of a lake at sunset"
DEMO_PROMPT = "a red star above a blue circle"
FEW_STEP_LORA = "demo-lcm"  # the demo's consistency adapter: its sampling.json brings 4 LCM steps at guidance 1
FEW_STEP_PIPELINE = f"demo + {FEW_STEP_LORA} (its own sampling: 4 LCM steps, guidance 1)"


def make_dit(p: Profile, size: int, device: torch.device, seed: int):
    """The benchmark DiT (same random weights as the DiT section) configured for base ``size``, with KV."""
    cfg = dit_config(p.arch, size, kv=True)
    weights = random_dit_weights(cfg, device, seed)
    model = build_pixsigma(cfg, weights, device, p.dtype)
    del weights
    return optimize(model, p.e2e_mode)


def _fresh(pipe: PixSigmaPipeline, offload_t5: bool) -> PixSigmaPipeline:
    """Same parts, empty prompt cache: every timed image encodes its prompts (and moves T5 if offloaded)."""
    fresh = PixSigmaPipeline(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler_config,
                             pipe.device, pipe.dtype, offload_t5, pipe.name)
    fresh.max_tokens = pipe.max_tokens
    fresh.loras = pipe.loras  # one record of the adapters hooked on the shared DiT (pipe.set_loras(None) clears)
    return fresh


def _run_images(pipe: PixSigmaPipeline, req: GenerationRequest, offload: bool, device: torch.device,
                warmup: int, repeats: int) -> dict:
    results = []

    def one():
        results.append(_fresh(pipe, offload).generate(req))

    for _ in range(warmup):  # compiles the DiT for this shape, tunes SDPA, loads VAE kernels
        _fresh(pipe, offload).generate(replace(req, steps=1))
    timing = time_wall(one, device, 0, repeats)
    peaks = [r.peak_memory_bytes for r in results if r.peak_memory_bytes is not None]
    last = results[-1]
    return {"status": "ok", "timing": timing.to_dict(), "peak_memory_bytes": max(peaks) if peaks else None,
            "generated_size": last.params["generated_size"], "steps": last.params["steps"]}


def bench_e2e_random(p: Profile, device: torch.device, rec: Recorder, steps: int, seed: int,
                     label: str) -> list[dict]:
    """Random parts at the profile's scale, T5 resident and offloaded (offloading only on a GPU)."""
    rows: list[dict] = []
    free_memory(device)
    # Whatever earlier sections left allocated (compiled graphs' pools) is not the pipeline's: subtract it.
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    parts, reason = rec.attempt("e2e text encoder + VAE", lambda: (
        build_t5(p.arch, dit_config(p.arch, p.sizes[0]).caption_channels, device, p.dtype),
        build_vae(p.arch, device, p.dtype), build_tokenizer()))
    offloads = (False, True) if device.type == "cuda" else (False,)
    if parts is None:
        return [failed_row({"size": s, "pipeline": label, "t5": "–", "dit": "–"}, reason) for s in p.sizes]
    t5, vae, tok = parts
    for size in p.sizes:
        dit, reason = rec.attempt(f"e2e {size}px DiT", partial(make_dit, p, size, device, seed))
        for i, offload in enumerate(offloads):
            row = {"size": size, "pipeline": label, "t5": "offloaded to CPU" if offload else "on device",
                   "dit": f"KV R=2 deep half, {p.e2e_mode}"}
            if dit is None:
                rows.append(failed_row(row, reason))
                continue
            what = f"e2e {size}px T5 {row['t5']}"
            rec.log(what)
            pipe = PixSigmaPipeline(dit, vae, t5, tok, None, device, p.dtype, offload, name=label)
            req = GenerationRequest(PROMPT, width=size, height=size, steps=steps, seed=seed)
            t5.to("cpu" if offload else device)
            free_memory(device)
            # Warm up once per size (the DiT and VAE are shared by both T5 placements).
            res, reason_r = rec.attempt(what, partial(_run_images, pipe, req, offload, device, int(i == 0),
                                                      p.e2e_repeats_for(size)))
            if res and res["peak_memory_bytes"] is not None:
                res = {**res, "peak_memory_bytes": res["peak_memory_bytes"] - baseline, "baseline_bytes": baseline}
            rows.append({**row, **res} if res else failed_row(row, reason_r))
        if dit is not None:
            optimize(dit, "eager")
        dit = None
        free_memory(device)
    t5 = vae = None
    free_memory(device)
    return rows


def _fits(pipe: PixSigmaPipeline, lora: str) -> bool:
    """Whether ``lora`` exists and its shapes fit the pipeline's DiT."""
    try:
        pipe.loras.load(LoraSpec(lora))
    except (OSError, ValueError, KeyError, RuntimeError):
        return False
    return True


def bench_e2e_demo(p: Profile, device: torch.device, rec: Recorder, steps: int, seed: int
                   ) -> tuple[list[dict], bool]:
    """The shipped demo at each size (binning off: exactly that many pixels); (rows, found)."""
    try:
        pipe = PixSigmaPipeline.from_pretrained("demo", device=str(device), dtype="fp32")
    except FileNotFoundError:
        return [], False
    optimize(pipe.transformer, p.e2e_mode)
    rows = []
    for size in p.sizes:
        row = {"size": size, "pipeline": "demo (trained, assets/demo/sigma)", "t5": "demo's own",
               "dit": f"demo, {p.e2e_mode}"}
        rec.log(f"e2e demo {size}px")
        req = GenerationRequest(DEMO_PROMPT, width=size, height=size, steps=steps, seed=seed, binning=False)
        res, reason = rec.attempt(f"e2e demo {size}px",
                                  lambda req=req, size=size: _run_images(pipe, req, False, device, 1,
                                                                         p.e2e_repeats_for(size)))
        rows.append({**row, **res} if res else failed_row(row, reason))
        if not _fits(pipe, FEW_STEP_LORA):
            continue  # a stand-in for the demo (the tests' tiny pipeline): its adapter is not this model's
        fast = {**row, "pipeline": FEW_STEP_PIPELINE}
        rec.log(f"e2e demo {size}px, {FEW_STEP_LORA}")
        req = GenerationRequest(DEMO_PROMPT, width=size, height=size, seed=seed, binning=False, loras=FEW_STEP_LORA)
        res, reason = rec.attempt(f"e2e demo {size}px {FEW_STEP_LORA}",
                                  lambda req=req, size=size: _run_images(pipe, req, False, device, 1,
                                                                         p.e2e_repeats_for(size)))
        pipe.set_loras(None)
        rows.append({**fast, **res} if res else failed_row(fast, reason))
    return rows, True


def bench_guidance(p: Profile, device: torch.device, rec: Recorder, steps: int, seed: int) -> list[dict]:
    """The DiT sampling loop at the smallest size: CFG on every step vs. only inside the interval."""
    size = min(p.sizes)
    lo, hi = p.guidance_interval
    rows = []
    for name in ("every step", f"only for t in [{lo:g}, {hi:g}]"):
        row = {"size": size, "guidance": name}
        rec.log(f"guidance {name} at {size}px")

        def run(interval=name != "every step"):
            dit = make_dit(p, size, device, seed)
            inputs = dit_inputs(dit.config, size, 2, device, p.dtype, seed)
            y, mask = inputs["y"], inputs["mask"]  # (2, L, C): [uncond; cond]
            call = cfg_interval(dit, lo, hi) if interval else dit
            shape = (1, dit.config.in_channels, size // 8, size // 8)

            def loop(n=steps):
                sched = make_scheduler("dpm-solver", prediction_type=dit.config.prediction_type)
                latents, gen = initial_noise(shape, seed, device, p.dtype, sched.init_noise_sigma)
                with torch.no_grad():
                    return denoise(lambda x, t: call(x, t, y, mask), sched, latents, n, 4.5, gen, None,
                                   dit.config.learn_sigma)

            try:
                loop(steps)  # warm-up through every step: compiles both the CFG and the cond-only batch
                return {"status": "ok", "timing": time_wall(loop, device, 0, p.e2e_repeats_for(size)).to_dict()}
            finally:
                optimize(dit, "eager")

        res, reason = rec.attempt(f"guidance {name}", run)
        rows.append({**row, **res} if res else failed_row(row, reason))
        free_memory(device)
    return rows
