"""The chain's figure in the form of the paper's Fig. 8 (matplotlib, headless).

Left: benchmark score against cumulative training steps, each stage starting where the one before ended, its
95 % interval as a band. Right: the training loss on the same axis, smoothed (EMA) over the raw loss drawn
faint. One colour per stage in both panels. Each stage boundary is a vertical line labelled with what changed
there (the VAE, the resolution, the model), with both scores drawn at it: the stage before's export under its
own conditions and this stage's start under the new ones, so a jump at the line belongs to the change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pixsigma.io import atomic_write  # noqa: E402

from .runfiles import read_metrics  # noqa: E402

LOSS_EMA = 0.9  # smoothing of the loss panel's bold line (the raw per-step loss is drawn faint under it)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def stage_colours(names: list[str]) -> dict[str, str]:
    """One colour per stage, by its place in the chain: the same in both panels."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def ema(values: list[float], decay: float = LOSS_EMA) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled toward 0."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc = decay * acc + (1 - decay) * v
        out.append(acc / (1 - decay ** (i + 1)))
    return out


def draw_chain(summary: dict[str, Any]) -> Figure:
    """The figure of ``chain.json``'s content (see the module docstring); every line carries its stage's name
    as its ``gid``."""
    stages = summary["stages"]
    colours = stage_colours([st["name"] for st in stages])
    fig, (ax, lx) = plt.subplots(1, 2, figsize=(12, 4.5))
    offset = 0
    for st in stages:
        c, name = colours[st["name"]], st["name"]
        pts = st.get("curve") or []
        xs = [offset + p[0] for p in pts]
        ys = [100 * p[1] for p in pts]
        if pts:
            label = f"{name} ({st.get('stage') or ''})" + (" – scored, not trained" if not st.get("steps") else "")
            ax.plot(xs, ys, marker="o", color=c, label=label, gid=name, zorder=3)
            ivs = [(p[2], p[3]) for p in pts if len(p) >= 4 and p[2] is not None]
            if len(ivs) == len(pts):
                lo, hi = [100 * a for a, _ in ivs], [100 * b for _, b in ivs]
                if len(pts) > 1:
                    ax.fill_between(xs, lo, hi, color=c, alpha=0.15, lw=0, gid=name)
                ax.vlines(xs, lo, hi, colors=c, lw=1.2, gid=name)  # each point's interval, a band needs two
        b = st.get("boundary")
        if b:
            ax.axvline(offset, color="0.6", lw=0.8, ls="--", zorder=1)
            ax.annotate(b.get("label") or "", (offset, 1), xycoords=("data", "axes fraction"), rotation=90,
                        va="top", ha="right", fontsize=7, color="0.3")
            before, after = b.get("before") or {}, b.get("after") or {}
            if before and after:  # the two scores at the boundary, joined: the jump is the change's
                ax.plot([offset, offset], [100 * before["attribute"], 100 * after["attribute"]], color=c, lw=1.2,
                        ls=":", gid=name)
        loss = read_metrics(Path(st["run_dir"])) if st.get("run_dir") else []
        if loss:
            lxs = [offset + r["step"] for r in loss]
            raw = [r["loss"] for r in loss]
            lx.plot(lxs, raw, color=c, lw=0.6, alpha=0.25, gid=name)
            lx.plot(lxs, ema(raw), color=c, lw=1.6, label=name, gid=name)
        if st.get("boundary"):
            lx.axvline(offset, color="0.6", lw=0.8, ls="--", zorder=1)
        offset += st.get("steps") or 0
    proto = summary.get("protocol") or {}
    n = proto.get("n", summary.get("bench", {}).get("n"))
    ax.set(xlabel="training steps (stages one after another)", ylabel="ShapesBench attribute accuracy (%)",
           title=f"{summary['preset']} chain: score per stage, 95 % interval (n={n})")
    lx.set(xlabel="training steps (stages one after another)", ylabel="loss",
           title=f"training loss (EMA {LOSS_EMA}, raw faint)", yscale="log")
    for a in (ax, lx):
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_chain(summary: dict[str, Any], path: str | Path) -> Path:
    """Draw ``chain.json``'s content into ``path`` (PNG, written atomically)."""
    fig = draw_chain(summary)
    try:
        return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
