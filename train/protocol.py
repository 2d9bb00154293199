"""The chain's one evaluation protocol, the conditions of each scored point, and the 95 % intervals.

Every point of a chain is scored alike: the same held-out prompts as typed (and, at the chain's two ends, the
same prompts through the world's expander), the same sampler, steps, guidance and seeds. What may differ
between points is only what a stage changes: the VAE (the pipeline a point decodes through) and the
resolution. A stage's start and its export are scored under identical conditions; at a boundary where a
condition changes, the model before it is scored under both (the previous stage's end, and this stage's
start), so a jump there is credited to the change, not to training.

Intervals are percentile bootstraps over prompts (the mean of per-prompt scores, resampled with a fixed
seed); a change between two points on the same prompts and seeds is judged on the paired bootstrap of the
per-prompt differences: "within noise" when its interval holds 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
BOOT_SEED = 0
# Which evaluation condition each change between two scored points is, in the plot's words.
CONDITION_LABELS = {"pipeline": "VAE", "resolution": "px"}


@dataclass(frozen=True)
class Protocol:
    """How every point of a chain is scored; recorded in ``chain.json``."""

    bench: str  # the benchmark's name
    n: int  # held-out prompts, the first n of the bench, the same at every point
    steps: int  # sampler steps
    sampler: str
    guidance: float
    seed: int  # batch b of the bench is drawn from seed + b
    batch_size: int
    expander: str | None  # the world's expander, applied at the ends (α and the final export) as well as off
    level: float = LEVEL
    resamples: int = RESAMPLES
    boot_seed: int = BOOT_SEED

    def __post_init__(self) -> None:
        for name in ("n", "steps", "batch_size", "resamples"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"protocol {name} must be an integer >= 1, got {v!r}")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"protocol level must be in (0, 1), got {self.level!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prompts": f"the first {self.n} held-out {self.bench} prompts as typed",
                "interval": f"{round(100 * self.level)} % percentile bootstrap over prompts, {self.resamples} "
                            f"resamples, seed {self.boot_seed}"}


PROTOCOL_SAMPLING = "protocol"  # the chain's own sampler, steps and guidance (Protocol); else e.g. "lcm 4, guidance 1"
CONDITIONS = ("pipeline", "resolution", "expander", "sampling")
_DEFAULTS = {"sampling": PROTOCOL_SAMPLING}  # chain.json points written before the key existed


def conditions(pipeline: str, resolution: int, expand: bool = False, sampling: str = PROTOCOL_SAMPLING
               ) -> dict[str, Any]:
    """What may differ between two scored points of one protocol: the pipeline (its VAE), the resolution,
    whether the prompts went through the expander, and the sampling (a consistency model's few steps)."""
    return {"pipeline": pipeline, "resolution": int(resolution), "expander": bool(expand), "sampling": sampling}


def changed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The conditions that differ between two points ([] when they were scored alike)."""
    return [k for k in CONDITIONS if before.get(k, _DEFAULTS.get(k)) != after.get(k, _DEFAULTS.get(k))]


def change_label(before: dict[str, Any], after: dict[str, Any]) -> str:
    """'VAE alpha → sigma', '128 → 256 px', joined by ', '; '' when nothing changed."""
    parts = []
    for k in changed(before, after):
        if k == "pipeline":
            parts.append(f"VAE {before[k]} → {after[k]}")
        elif k == "resolution":
            parts.append(f"{before[k]} → {after[k]} px")
        elif k == "sampling":
            parts.append(f"sampling {before.get(k, PROTOCOL_SAMPLING)} → {after.get(k, PROTOCOL_SAMPLING)}")
        else:
            parts.append("expander " + ("on" if after[k] else "off"))
    return ", ".join(parts)


def _check(values: Any, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"{name} must be a non-empty list of finite per-prompt scores, got {values!r}")
    return x


def bootstrap_interval(values: Any, level: float = LEVEL, resamples: int = RESAMPLES,
                       seed: int = BOOT_SEED) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` (one score per prompt): ``resamples``
    resamples of the prompts with replacement, drawn from ``seed``."""
    x = _check(values, "values")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return round(float(lo), 4), round(float(hi), 4)


def paired_change(before: Any, after: Any, level: float = LEVEL, resamples: int = RESAMPLES,
                  seed: int = BOOT_SEED) -> dict[str, Any]:
    """The change of the mean from ``before`` to ``after`` (per-prompt scores of the same prompts and seeds),
    its paired bootstrap interval, and whether it is within noise (the interval holds 0)."""
    a, b = _check(before, "before"), _check(after, "after")
    if a.size != b.size:
        raise ValueError(f"a paired change needs the same prompts on both sides, got {a.size} and {b.size} scores")
    lo, hi = bootstrap_interval(b - a, level, resamples, seed)
    return {"change": round(float((b - a).mean()), 4), "interval": [lo, hi], "within_noise": lo <= 0.0 <= hi}


def with_interval(score: dict[str, Any], protocol: Protocol) -> dict[str, Any]:
    """``score`` (a world's scores with ``per_prompt``) with its attribute's interval and without the list."""
    out = {k: v for k, v in score.items() if k != "per_prompt"}
    if score.get("per_prompt"):
        out["interval"] = list(bootstrap_interval(score["per_prompt"], protocol.level, protocol.resamples,
                                                  protocol.boot_seed))
    return out


def separated(low: dict[str, Any], high: dict[str, Any]) -> bool:
    """``high`` beats ``low`` by a margin outside both intervals (high's lower end above low's upper end)."""
    return bool(low.get("interval") and high.get("interval") and high["interval"][0] > low["interval"][1])


def paired(before: dict[str, Any], after: dict[str, Any], protocol: Protocol) -> dict[str, Any] | None:
    """``paired_change`` of two scored points (None when either lacks its per-prompt scores)."""
    if not (before.get("per_prompt") and after.get("per_prompt")):
        return None
    return paired_change(before["per_prompt"], after["per_prompt"], protocol.level, protocol.resamples,
                         protocol.boot_seed)


def boundary(before: dict[str, Any], after: dict[str, Any], model_change: str, protocol: Protocol) -> dict[str, Any]:
    """The boundary between two stages: the previous export under its own conditions (``before``) and this
    stage's start (``after``), what changed (conditions, and the model itself), and the paired change."""
    was, now = before.get("conditions", {}), after.get("conditions", {})
    return {"changes": changed(was, now), "label": ", ".join(x for x in (change_label(was, now), model_change) if x),
            "model_change": model_change, "before": with_interval(before, protocol),
            "after": with_interval(after, protocol), "paired": paired(before, after, protocol)}


def recovery(stages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``chain.json``'s verdict from its stage rows: whether every trained stage ends at or above its start (or
    within noise of it), and whether the last export beats α by a margin outside both intervals (α as shipped,
    and α's weights through the Σ-side conditions: the second stage's start)."""
    if len(stages) < 2:
        return None
    rows = [{"name": r["name"], "start": r["start_shapesbench"]["attribute"], "end": r["shapesbench"]["attribute"],
             **r["training_change"], "recovered": r["training_change"]["change"] >= 0
             or r["training_change"]["within_noise"]} for r in stages if r.get("training_change")]
    last = stages[-1]["shapesbench"]

    def versus(low: dict[str, Any] | None) -> dict[str, Any] | None:
        if not low:
            return None
        return {"alpha": low["attribute"], "alpha_interval": low.get("interval"), "final": last["attribute"],
                "final_interval": last.get("interval"), "margin": round(last["attribute"] - low["attribute"], 4),
                "separated": separated(low, last)}
    own = versus(stages[0]["shapesbench"])
    sigma_side = versus(stages[1].get("start_shapesbench"))
    return {"stages": rows, "final_vs_alpha": own, "final_vs_alpha_sigma_side": sigma_side,
            "met": bool(rows) and all(r["recovered"] for r in rows) and bool(own and own["separated"])}


def _pct(score: dict[str, Any] | None) -> str:
    if not score:
        return "–"
    iv = score.get("interval")
    return f"{100 * score['attribute']:.1f}" + (f" [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]" if iv else "")


def _change(ch: dict[str, Any] | None) -> str:
    if not ch:
        return ""
    lo, hi = ch["interval"]
    verdict = "within noise" if ch["within_noise"] else "real"
    return f"{100 * ch['change']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], {verdict}"


def format_summary(summary: dict[str, Any]) -> str:
    """``chain.json`` in words: each boundary and stage with its scores, intervals and whether a change is
    within noise, then the verdict."""
    lines = []
    for st in summary["stages"]:
        b = st.get("boundary")
        if b:
            lines.append(f"  | {b['label'] or 'no change'}: {_pct(b['before'])} → {_pct(b['after'])} "
                         f"({_change(b.get('paired'))})")
        if st.get("steps"):
            lines.append(f"{st['name']:12s} {st['steps']:4d} steps: {_pct(st['start_shapesbench'])} → "
                         f"{_pct(st['shapesbench'])} ({_change(st.get('training_change'))})")
        else:
            lines.append(f"{st['name']:12s} scored: {_pct(st['shapesbench'])}")
    rec = summary.get("recovery")
    if rec:
        for key, what in (("final_vs_alpha", "α as shipped"), ("final_vs_alpha_sigma_side", "α through VAE-Σ")):
            v = rec.get(key)
            if v:
                sep = "outside both intervals" if v["separated"] else "NOT outside both intervals"
                pair = f"; paired {_change(v['paired'])}" if v.get("paired") else ""
                lines.append(f"final vs {what}: {100 * v['final']:.1f} vs {100 * v['alpha']:.1f}, "
                             f"margin {100 * v['margin']:+.1f}, {sep}{pair}")
        lines.append("recovery criteria " + ("met" if rec["met"] else "NOT met"))
    n = (summary.get("protocol") or {}).get("n")
    return "\n".join(lines + [f"(ShapesBench attribute %, n = {n}, 95 % intervals)"])
