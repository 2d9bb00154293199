"""The chain's figure in the form of the paper's Fig. 8: benchmark score against training steps, one curve per
stage, each stage starting where the one before ended on the step axis (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_chain(summary: dict[str, Any], path: str | Path) -> Path:
    """Draw ``chain.json``'s stages (their ``curve`` points: [step in stage, attribute]) into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pixsigma.io import atomic_write
    from train.runfiles import read_metrics

    fig, (ax, lx) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for st in summary["stages"]:
        pts = st.get("curve") or []
        if pts:
            xs = [offset + p[0] for p in pts]
            ys = [100 * p[1] for p in pts]
            ax.plot(xs, ys, marker="o", label=f"{st['name']} ({st['stage']})")
            ax.axvline(offset, color="0.85", lw=0.8)
        loss = read_metrics(Path(st["run_dir"]))
        if loss:
            lx.plot([offset + r["step"] for r in loss], [r["loss"] for r in loss], lw=0.8, label=st["name"])
        offset += st.get("steps") or 0
    bench = summary.get("bench", {})
    ax.set(xlabel="training steps (stages one after another)", ylabel="ShapesBench attribute accuracy (%)",
           title=f"{summary['preset']} chain: score per stage (n={bench.get('n')})")
    lx.set(xlabel="training steps", ylabel="loss", title="training loss", yscale="log")
    for a in (ax, lx):
        if a.lines:
            a.legend(fontsize=8)
    fig.tight_layout()
    out = atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out

