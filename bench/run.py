"""One benchmark run on one device: environment and matmul peak, then the DiT side by side, whole
images, and the guidance interval; then the speed targets checked against what was measured."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

import torch

from bench.dit import bench_dit
from bench.e2e import FEW_STEP_LORA, FEW_STEP_PIPELINE, bench_e2e_demo, bench_e2e_random, bench_guidance
from bench.measure import check_device, environment, matmul_peak
from bench.plan import PARTS, BenchFailed, BenchSettings, Profile, Recorder, profile_for
from pixsigma.registry import MODEL_ALIASES

GB = 1e9  # the memory targets, in decimal gigabytes


def resolve(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(device)


def run_bench(settings: BenchSettings, command: str = "python -m bench") -> dict:
    """Measure everything ``settings`` asks for and return the run (see bench.report for its layout).
    Raises BenchFailed if the device is unusable, or if anything was not measured and partial results
    are not allowed."""
    try:
        device = resolve(settings.device)
    except Exception as e:
        raise BenchFailed([str(e)]) from None
    p = profile_for(settings, device)
    rec = Recorder(device)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    rec.log(f"{p.title} on {device}: sizes {list(p.sizes)}, modes {list(p.modes)}, parts {list(settings.parts)}")
    notes = _notes(p)
    key, title = p.key, p.title
    if set(settings.parts) != set(PARTS):  # a partial run is its own entry; it never overwrites a full one
        key, title = f"{key}-{'+'.join(settings.parts)}", f"{title} — parts: {', '.join(settings.parts)}"
    load_start = _load()
    run: dict = {"key": key, "title": title, "started": started,
                 "command": command,
                 "environment": environment(device), "notes": notes,
                 "settings": {"device": str(device), "arch": p.arch, "arch_label": _arch_label(p),
                              "dtype": str(p.dtype).removeprefix("torch."), "batch": 2, "sizes": list(p.sizes),
                              "modes": list(p.modes), "e2e_mode": p.e2e_mode, "steps": settings.steps,
                              "parts": list(settings.parts), "seed": settings.seed}}
    peak, reason = rec.attempt("matmul peak", lambda: matmul_peak(device, p.dtype, p.matmul_n))
    run["matmul_peak"] = {"status": "ok", **peak} if peak else {"status": "not measured", "reason": reason}
    peak_tflops = peak["tflops"] if peak else None
    if "dit" in settings.parts:
        run["dit"], run["equality"] = bench_dit(p, device, rec, peak_tflops, settings.seed)
    if "e2e" in settings.parts:
        run["e2e"] = _e2e(p, device, rec, settings, notes)
    if "guidance" in settings.parts:
        run["guidance_interval"] = bench_guidance(p, device, rec, settings.steps, settings.seed)
    run["targets"] = targets(run, p)
    run["seconds"] = time.perf_counter() - t0
    if device.type == "cpu" and load_start is not None:
        load_end, env = _load(), run["environment"]
        notes.append(f"CPU load average (1 min) at start / end: {load_start:.2f} / {load_end:.2f} on "
                     f"{env['cpu_count']} cores, this run using {env['cpu_threads']} threads.")
        run["busy"] = max(load_start, load_end) > env["cpu_threads"] + 1  # more runnable work than our threads
        if run["busy"]:
            notes.append("BUSY MACHINE: other processes competed for the CPU during this run, so its CPU "
                         "latencies overstate what an idle machine does; rerun on an idle machine to judge targets.")
    run["failures"] = rec.failures
    if rec.failures and not settings.allow_partial:
        raise BenchFailed(rec.failures)
    rec.log(f"done in {run['seconds']:.0f} s")
    return run


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _arch_label(p: Profile) -> str:
    return {"xl": "XL/2, 28 blocks, D 1152", "demo": "demo DiT architecture", "tiny": "tiny DiT"}[p.arch] + \
        ", random weights"


def _notes(p: Profile) -> list[str]:
    notes = ["Same random weights for every implementation; KV = the paper's KV token compression "
             "(R = 2 on the deeper half of the blocks), which changes the output (not compared to the peer).",
             "FLOPs are analytic (bench/flops.py: matmuls, convolutions and attention, 2 per multiply-add); "
             "TFLOP/s = FLOPs / median latency; 'of peak' divides by the matmul peak measured in this run.",
             "'extra memory' = peak allocated during the timed calls minus what was resident before (weights)."]
    if p.key.startswith("cuda"):
        notes.append("Whole-image peak memory = torch.cuda.max_memory_allocated during the image minus what earlier "
                     "sections left allocated (JSON: baseline_bytes); the T5 placement is in its own column.")
    if p.key.endswith("quick"):
        notes.insert(0, "QUICK RUN: tiny random models; a smoke test of the bench, not a performance number.")
    return notes


def _e2e(p: Profile, device: torch.device, rec: Recorder, settings: BenchSettings, notes: list[str]) -> list[dict]:
    if p.arch == "demo":
        rows, found = bench_e2e_demo(p, device, rec, settings.steps, settings.seed)
        if found:
            return rows
        notes.append(f"FALLBACK: the trained demo model is not at {MODEL_ALIASES['demo']} yet, so the whole-image "
                     "row is a random pipeline with the demo's DiT architecture and a small T5 and VAE — "
                     "NOT the demo model.")
        return bench_e2e_random(p, device, rec, settings.steps, settings.seed,
                                "FALLBACK random pipeline (demo DiT architecture), not the demo")
    label = {"xl": "random T5-XXL + XL/2 DiT + SDXL VAE", "tiny": "tiny random pipeline (--quick)"}[p.arch]
    return bench_e2e_random(p, device, rec, settings.steps, settings.seed, label)


def _best(rows: list[dict], size: int, kv: bool | None) -> float | None:
    ok = [r["speedup"] for r in rows if r.get("status") == "ok" and r["impl"] == "pixsigma" and r["size"] == size
          and r.get("speedup") is not None and (kv is None or (r["kv"] != "off") == kv)]
    return max(ok) if ok else None


def _e2e_row(rows: list[dict], size: int, offloaded: bool) -> dict | None:
    for r in rows:
        if r["size"] == size and r.get("status") == "ok" and r["t5"].startswith("offloaded") == offloaded:
            return r
    return None


def targets(run: dict, p: Profile) -> list[dict]:
    """The speed and memory targets, each met / not met / not measured in this run."""
    out = []

    def add(target: str, value: float | None, ok: bool | None, shown: str) -> None:
        out.append({"target": target, "measured": shown if value is not None else "not measured in this run",
                    "met": ok if value is not None else None, "value": value})

    dit, e2e = run.get("dit", []), run.get("e2e", [])
    if p.key == "cuda":
        for size, need, kv, what in ((1024, 1.5, False, "no KV: same output"), (4096, 2.2, True, "KV R=2")):
            v = _best(dit, size, kv)
            add(f"DiT step ≥ {need}× diffusers at {size} ({what})", v, v is not None and v >= need,
                f"{v:.2f}×" if v else "")
        for size in p.sizes:
            v = _best(dit, size, None)
            add(f"DiT step faster than diffusers at {size}", v, v is not None and v > 1, f"{v:.2f}×" if v else "")
        r = _e2e_row(e2e, 4096, True)
        v = r["timing"]["median_s"] if r else None
        add("20-step 4096² image ≤ 35 s (T5 offloaded)", v, v is not None and v <= 35, f"{v:.1f} s" if v else "")
        for size, limit in ((1024, 12), (4096, 24)):
            r = _e2e_row(e2e, size, True)
            v = r["peak_memory_bytes"] if r else None
            add(f"peak GPU memory ≤ {limit} GB at {size} (T5 offloaded)", v, v is not None and v <= limit * GB,
                f"{v / GB:.2f} GB" if v else "")
    elif p.key == "cpu":
        slow = next((r for r in e2e if r["size"] == 256 and r.get("status") == "ok"
                     and r["pipeline"].startswith("demo (")), None)
        fast = next((r for r in e2e if r["size"] == 256 and r.get("status") == "ok"
                     and r["pipeline"] == FEW_STEP_PIPELINE), None)
        v = slow["timing"]["median_s"] / fast["timing"]["median_s"] if slow and fast else None
        add(f"demo 256 px with {FEW_STEP_LORA} (4 steps) ≥ 3× faster than its {slow['steps'] if slow else 20}-step "
            "default", v, v is not None and v >= 3, f"{v:.1f}×" if v else "")
        r = next((r for r in e2e if r["size"] == 256 and r.get("status") == "ok"
                  and r["pipeline"] != FEW_STEP_PIPELINE), None)
        v = r["timing"]["median_s"] if r else None
        demo = r is not None and r["pipeline"].startswith("demo")
        shown = f"{v:.2f} s" if v is not None else ""
        if r is not None and not demo:
            add("demo 256 px, 20 steps ≤ 3 s on 2 CPU cores", None, None, "")
            out[-1]["measured"] = f"{shown} on the FALLBACK random pipeline — not the demo, so not judged"
        else:
            add("demo 256 px, 20 steps ≤ 3 s on 2 CPU cores", v, v is not None and v <= 3, shown)
    return out
