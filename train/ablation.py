"""The paper's Table 3 in miniature: the KV stage trained with each compression operator and placement.

``python -m train.chain --ablation kv`` runs the chain up to the res-up stage, then trains its KV stage
from that same export for the same steps with: conv (the paper's choice), pool and discard on the deep half of
the layers, and conv on the shallow half. Each variant's starting point and export are scored on the same
held-out prompts and seeds as the chain; its seconds per step come from its own run. Writes
``DIR/ablation_kv.json`` and ``DIR/ablation_kv.md`` (beside the paper's FIDs: deep 8.53 vs shallow 9.28;
conv 8.51, pool 9.42, discard 8.92). Every score carries its 95 % interval (``train.protocol``), and each
variant's export is compared with the paper's choice (conv, deep) on the same prompts and seeds: a difference is
"real" when its paired interval leaves out 0, else within noise.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .chain import Chain

from .protocol import Protocol, paired_change, with_interval

ABLATION_JSON, ABLATION_MD, ABLATION_DIR = "ablation_kv.json", "ablation_kv.md", "ablation_kv"
BURST_S = 0.05  # metrics rows closer in time than this were written together
# variant -> (operator, "deep"/"shallow", the paper's FID for the same comparison: Table 3)
REFERENCE = "conv_deep"  # the paper's choice, which every other variant is compared with
VARIANTS = {"conv_deep": ("conv", "deep", "8.51 (deep 8.53)"), "pool_deep": ("pool", "deep", "9.42"),
            "discard_deep": ("discard", "deep", "8.92"), "conv_shallow": ("conv", "shallow", "9.28")}


def variant_layers(depth: int, where: str) -> str:
    """The layer span of ``where``: the deep half (the paper's placement) or the shallow half."""
    half = depth // 2
    return f"{half}-{depth - 1}" if where == "deep" else f"0-{half - 1}"


def run_kv_ablation(chain: Chain) -> dict[str, Any]:
    """Train and score the KV variants of ``chain`` (see the module docstring); returns ``ablation_kv.json``'s
    content. The chain is given, not built here: ``train.chain``'s CLI runs this, so importing it would be a circle."""
    from pixsigma.io import atomic_write_json, atomic_write_text

    from .runfiles import BENCH, read_metrics

    preset, runs_dir, start_from = chain.preset, chain.runs_dir, chain.start_from
    steps = list(chain.lab.plan)
    kv_step = next(st for st in steps if st.name.endswith("kv"))
    resup = steps[steps.index(kv_step) - 1]
    chain.run(until=resup.name)
    depth = _depth(runs_dir / resup.name)
    rows: dict[str, Any] = {}
    finals: dict[str, Any] = {}  # each variant's per-prompt scores of its export
    for name, (operator, where, paper) in VARIANTS.items():
        layers = variant_layers(depth, where)
        run = _same_run(runs_dir / kv_step.name, kv_step.steps, operator, layers)
        if run is None:  # the chain's own KV run is this variant when it was trained alike: not trained twice
            variant = replace(kv_step, name=f"{ABLATION_DIR}/{name}")
            extra = [f"stage.kv.operator={operator}", f"stage.kv.layers={layers}", "stage.kv.ratio=2"]
            if chain.run_stage(variant, resup, extra=extra) is None:
                break
            run = runs_dir / variant.name
        bench = json.loads((run / BENCH).read_text())
        rows[name] = {"operator": operator, "layers": layers, "where": where, "steps": bench["steps"],
                      "seconds": bench.get("seconds"), "seconds_per_step": seconds_per_step(read_metrics(run)),
                      "start_shapesbench": with_interval(bench["start"], chain.protocol),
                      "shapesbench": with_interval(bench["final"], chain.protocol), "paper_fid": paper,
                      "run_dir": str(run)}
        finals[name] = bench["final"].get("per_prompt")
    result = {"preset": preset, "start_from": start_from, "from": str(runs_dir / resup.name),
              "bench": {"n": chain.lab.bench_n, "steps": chain.lab.bench_steps},
              "protocol": chain.protocol.to_dict(), "variants": rows,
              "differences": differences(finals, chain.protocol)}
    atomic_write_json(result, runs_dir / ABLATION_JSON, indent=1)
    atomic_write_text(runs_dir / ABLATION_MD, format_table(result))
    return result


def differences(finals: dict[str, Any], protocol: Protocol) -> list[dict[str, Any]]:
    """Each variant's export against ``REFERENCE``'s on the same prompts and seeds: the change, its paired
    interval, and ``real`` (the interval leaves out 0)."""
    ref = finals.get(REFERENCE)
    out = []
    for name, values in finals.items():
        if name == REFERENCE or not ref or not values:
            continue
        ch = paired_change(ref, values, protocol.level, protocol.resamples, protocol.boot_seed)
        out.append({"variant": name, "versus": REFERENCE, "change": ch["change"], "interval": ch["interval"],
                    "real": not ch["within_noise"]})
    return out


def _pct(score: dict[str, Any]) -> str:
    """'38.8 [32.1, 45.0]': the attribute score and its interval in %."""
    iv = score.get("interval")
    return f"{100 * score['attribute']:.1f}" + (f" [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]" if iv else "")


def seconds_per_step(rows: list[dict[str, Any]]) -> float | None:
    """Steady seconds per step from a run's metrics rows: the median over logged intervals, so a warm-up or a
    resume after a kill does not count."""
    from statistics import median

    points: list[tuple[float, int]] = []  # rows are written in bursts (at a log step): a burst's last row is when
    for r in rows:  # its steps were done
        if not isinstance(r.get("time"), (int, float)):
            continue
        if points and r["time"] - points[-1][0] < BURST_S:
            points[-1] = (r["time"], r["step"])
        else:
            points.append((r["time"], r["step"]))
    rates = [(t1 - t0) / (s1 - s0) for (t0, s0), (t1, s1) in zip(points, points[1:]) if s1 > s0]
    return round(median(rates), 4) if rates else None


def _same_run(run: Path, steps: int, operator: str, layers: str) -> Path | None:
    """``run`` when it is a finished, scored KV run of ``steps`` steps with ``operator`` on ``layers``."""
    import yaml

    from pixsigma.config import parse_layers

    from .runfiles import BENCH, FINAL

    try:
        bench = json.loads((run / BENCH).read_text())
        kv = yaml.safe_load((run / "config.yaml").read_text())["stage"]["kv"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None
    want = (operator, list(parse_layers(layers)), 2)
    same = (kv.get("operator"), list(kv.get("layers") or []), kv.get("ratio")) == want
    return run if same and (run / FINAL).is_dir() and "final" in bench and bench.get("steps") == steps else None


def _depth(run_dir: Path) -> int:
    from pixsigma.weights import PIXSIGMA_CONFIG

    from .runfiles import FINAL

    return int(json.loads((run_dir / FINAL / PIXSIGMA_CONFIG).read_text())["dit"]["depth"])


def format_table(result: dict[str, Any]) -> str:
    """The variants side by side (accuracies in %), with the paper's FID for the same comparison."""
    lines = ["| variant | operator | layers | attribute [95 % interval] | count | colour | shape | position | "
             "at start | s/step | paper FID ↓ |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["variants"].items():
        s = r["shapesbench"]
        cells = [_pct(s)] + [f"{100 * s[k]:.1f}" for k in ("count", "colour", "shape", "position")]
        sps = f"{r['seconds_per_step']:.3f}" if r.get("seconds_per_step") else "–"
        lines.append(f"| {name} | {r['operator']} | {r['layers']} | " + " | ".join(cells)
                     + f" | {_pct(r['start_shapesbench'])} | {sps} | {r['paper_fid']} |")
    b = result["bench"]
    lines += ["", f"ShapesBench n = {b['n']}, {b['steps']} sampler steps; higher is better; intervals: 95 % bootstrap "
              "over prompts.", ""]
    for d in result.get("differences", []):
        verdict = "real" if d["real"] else "within noise"
        lines.append(f"- {d['variant']} vs {d['versus']}: {100 * d['change']:+.1f} points "
                     f"[{100 * d['interval'][0]:+.1f}, {100 * d['interval'][1]:+.1f}]: {verdict}")
    return "\n".join(lines) + "\n"
