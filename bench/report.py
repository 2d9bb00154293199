"""Results on disk: ``results.json`` (every number with its settings) and ``results.md`` (the tables).

A results file holds one run per device kind (``cuda``, ``cpu``); writing a run replaces
that kind's entry and keeps the others, so the committed CPU numbers survive a GPU run.
Each section names the device, torch, CUDA, cuDNN, diffusers and transformers versions it
was measured with. Rows that could not be measured say so ("not measured: reason").
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.flops import format_flops
from pixsigma.io import atomic_write_text

JSON_NAME, MD_NAME = "results.json", "results.md"
# The peer's published per-step figures (diffusers DiT, one H100, torch 2.11, bf16, batch 2): a reference only.
PEER_REFERENCE_MS = {1024: 38.7, 2048: 292.0, 4096: 3480.0}
GIB = 1024**3
NOISY = 0.25  # (max − min) / median above which a latency is flagged


def save(run: dict, out_dir: Path) -> tuple[Path, Path]:
    """Merge ``run`` (keyed by ``run['key']``) into ``out_dir/results.json`` and rewrite both files."""
    json_path, md_path = out_dir / JSON_NAME, out_dir / MD_NAME
    runs: dict = {}
    if json_path.is_file():
        try:
            runs = json.loads(json_path.read_text()).get("runs", {})
        except (json.JSONDecodeError, AttributeError):
            runs = {}  # a corrupt file is replaced, not merged
    runs[run["key"]] = run
    runs = dict(sorted(runs.items()))
    atomic_write_text(json_path, json.dumps({"runs": runs}, indent=2) + "\n")
    atomic_write_text(md_path, render(runs))
    return json_path, md_path


def render(runs: dict) -> str:
    lines = ["# pixsigma benchmark results", "",
             "Written by `python -m bench`; see `bench/README.md` for what is measured and how. "
             "Each section is one run on one device; every number in it was measured in that run.", ""]
    for run in runs.values():
        lines += _render_run(run)
    return "\n".join(lines).rstrip() + "\n"


def _ms(s: float | None) -> str:
    return "–" if s is None else (f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s")


def _s(s: float | None) -> str:
    return "–" if s is None else f"{s:.2f} s"


def _gib(b: int | None) -> str:
    return "–" if b is None else f"{b / GIB:.2f} GiB"


def _latency(timing: dict, fmt=None) -> str:
    """The median; with min/max beside it when repeats disagree by more than NOISY (a busy machine)."""
    fmt = fmt or _ms
    med, lo, hi = timing["median_s"], timing["min_s"], timing["max_s"]
    if timing.get("repeats", 1) > 1 and (hi - lo) > NOISY * med:
        return f"{fmt(med)} (noisy: {fmt(lo)}–{fmt(hi)})"
    return fmt(med)


def _status(row: dict) -> str | None:
    return None if row.get("status") == "ok" else f"{row.get('status')}: {row.get('reason')}"


def _render_run(run: dict) -> list[str]:
    env, s = run["environment"], run["settings"]
    out = [f"## {run['title']}", "",
           f"Measured {run['started']} in {run['seconds']:.0f} s: `{run['command']}`", "",
           "| device | torch | CUDA | cuDNN | diffusers | transformers | CPU threads |",
           "|---|---|---|---|---|---|---|",
           f"| {env.get('device_name')} | {env.get('torch')} | {env.get('cuda') or '–'} | {env.get('cudnn') or '–'} "
           f"| {env.get('diffusers')} | {env.get('transformers')} | {env.get('cpu_threads')} |", ""]
    out += [f"- {note}" for note in run.get("notes", [])] + [""]
    peak = run.get("matmul_peak", {})
    if peak.get("status") == "ok":
        out += [f"Matmul peak measured in this run: **{peak['tflops']:.1f} TFLOP/s** "
                f"({peak['n']}³ {peak['dtype']} matmuls).", ""]
    elif peak:
        out += [f"Matmul peak: {_status(peak)}", ""]
    dit = run.get("dit", [])
    if dit:
        out += [f"### DiT forward per step ({s['arch_label']}, {s['dtype']}, batch {s['batch']} = CFG)", "",
                "| size | implementation | KV | speed mode | latency | FLOPs | TFLOP/s | of peak | "
                f"{'vs peer (unreliable: busy machine)' if run.get('busy') else 'vs peer'} | extra memory |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in dit:
            head = f"| {r['size']} | {r['impl']} | {r['kv']} | {r['mode']} |"
            if _status(r):
                out.append(f"{head} {_status(r)} | | | | | |")
                continue
            vs = "–" if r.get("speedup") is None else f"{r['speedup']:.2f}×"
            frac = "–" if r.get("peak_fraction") is None else f"{100 * r['peak_fraction']:.0f} %"
            out.append(f"{head} {_latency(r['timing'])} | {format_flops(r['flops'])} | {r['tflops']:.1f} | "
                       f"{frac} | {vs} | {_gib(r.get('extra_memory_bytes'))} |")
        out.append("")
        if run["key"] == "cuda":
            ref = ", ".join(f"{k}: {_ms(v / 1e3)}" for k, v in PEER_REFERENCE_MS.items())
            out += [f"Peer per step, published reference (one H100, torch 2.11): {ref}.", ""]
    eq = run.get("equality", [])
    if eq:
        out += ["### Same method, same output", "", "| size | a | b | max abs diff | max abs (b) | relative |",
                "|---|---|---|---|---|---|"]
        for r in eq:
            if _status(r):
                out.append(f"| {r['size']} | {r['a']} | {r['b']} | {_status(r)} | | |")
            else:
                out.append(f"| {r['size']} | {r['a']} | {r['b']} | {r['max_abs_diff']:.3g} | {r['max_abs_ref']:.3g} "
                           f"| {r['relative']:.3g} |")
        out.append("")
    e2e = run.get("e2e", [])
    if e2e:
        out += [f"### Whole image, {s['steps']} steps (text encoder → DiT → VAE)", "",
                "| size | pipeline | T5 | DiT | latency | peak GPU memory |", "|---|---|---|---|---|---|"]
        for r in e2e:
            head = f"| {r['size']} | {r['pipeline']} | {r['t5']} | {r['dit']} |"
            out.append(f"{head} {_status(r)} | |" if _status(r) else
                       f"{head} {_latency(r['timing'], _s)} | {_gib(r.get('peak_memory_bytes'))} |")
        out.append("")
    gi = run.get("guidance_interval", [])
    if gi:
        out += ["### Guidance interval (option, changes the image)", "", "| size | guidance | sampling loop |",
                "|---|---|---|"]
        for r in gi:
            out.append(f"| {r['size']} | {r['guidance']} | {_status(r) or _latency(r['timing'], _s)} |")
        out.append("")
    targets = run.get("targets", [])
    if targets:
        out += ["### Targets", "", "| target | measured | met |", "|---|---|---|"]
        for t in targets:
            met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
            out.append(f"| {t['target']} | {t['measured']} | {met} |")
        out.append("")
    return out
