"""The demo's few-step adapter ``demo-lcm``: exported from its consistency run, and measured with ShapesBench.

``measure`` scores the demo Σ with the adapter at 1, 2, 4 and 8 LCM steps (guidance 1: one DiT call a step)
against the teacher without it (20 DPM-Solver++ steps at guidance 4.5, PixArt's default, and the folder's own
30 ancestral-Euler steps at 2.0), on the same held-out ShapesBench prompts and seeds, as typed and expanded by
the folder's prompt expander; with seconds per image on this machine. It prints the model card's markdown table
and writes the numbers as JSON.

    python -m shapes.fewstep_demo export runs/shapes_sigma_lcm assets/demo/loras/lcm   # latest checkpoint
    python -m shapes.fewstep_demo measure demo-lcm --n 64 --out assets/demo/fewstep.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pixsigma.constants import DEFAULT_GUIDANCE, DEFAULT_STEPS, FEW_STEP_SAMPLING
from pixsigma.folder_settings import SamplingDefaults
from pixsigma.io import atomic_write_json
from pixsigma.layout import CHECKOUT

from . import shapesbench
from .report import generate_fn

if CHECKOUT is not None:  # a clone imports train/ by its name; a wheel has it as pixsigma.train (pixsigma.layout)
    from train.checkpoint import latest_checkpoint
    from train.config import build_config
    from train.lora import export_lora_checkpoint
else:
    from pixsigma.train.checkpoint import latest_checkpoint
    from pixsigma.train.config import build_config
    from pixsigma.train.lora import export_lora_checkpoint

SIZE = 256
STUDENT_STEPS = (1, 2, 4, 8)
PARTS = ("teacher", "baseline", "student")  # the teacher's and the baseline's rows do not depend on the adapter
# (label, request settings): the teacher as PixArt samples by default, and as the demo folder samples
TEACHERS = (("Σ teacher, 20 DPM-Solver++ steps, guidance 4.5",
             {"sampler": "dpm-solver", "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE}),
            ("Σ teacher, the folder's 30 ancestral-Euler steps, guidance 2", {}))


def export(run_dir: Path, out: Path, checkpoint: Path | None = None) -> Path:
    """The LoRA of ``checkpoint`` (default: the run's latest) with the run's few-step ``sampling.json``."""
    cfg = build_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    if cfg.lora is None:
        raise ValueError(f"{run_dir} trained the whole DiT, not a LoRA: its final/ (or a checkpoint) is the model")
    ckpt = checkpoint or latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} holds no complete checkpoint")
    folder = export_lora_checkpoint(ckpt, cfg.stage.load_from, cfg.lora, out)
    SamplingDefaults(**FEW_STEP_SAMPLING).write(folder)
    return folder


def _score(pipe, n: int, loras: str | None, expand: bool, **sampling: Any) -> dict[str, float]:
    pipe.set_loras(loras)
    t0 = time.perf_counter()
    r = shapesbench.evaluate(generate_fn(pipe, SIZE, expand_prompt=expand, **sampling), n=n, width=SIZE,
                             height=SIZE, batch_size=min(n, 16))
    seconds = (time.perf_counter() - t0) / n
    pipe.set_loras(None)
    return {"attribute": r["attribute"], "count": r["count"], "colour": r["colour"], "shape": r["shape"],
            "position": r["position"], "seconds_per_image": seconds}


def measure(lora: str, n: int, parts: tuple[str, ...] = PARTS) -> list[dict[str, Any]]:
    """One row per (prompts as typed or expanded) × (teacher setting, the sampler without the adapter, adapter
    steps), of the ``parts`` asked."""
    from pixsigma.pipeline import PixSigmaPipeline

    pipe = PixSigmaPipeline.from_pretrained("demo", device="cpu")
    rows = []
    for expand in (False, True):
        if "teacher" in parts:
            for label, sampling in TEACHERS:
                rows.append({"part": "teacher", "model": label, "expanded": expand,
                             **_score(pipe, n, None, expand, **sampling)})
        if "baseline" in parts:  # what the sampler alone gives: the teacher, 4 LCM steps, no adapter
            rows.append({"part": "baseline", "model": "Σ without the adapter, 4 LCM steps, guidance 1",
                         "expanded": expand, **_score(pipe, n, None, expand, sampler="lcm", steps=4, guidance=1.0)})
        if "student" in parts:
            for steps in STUDENT_STEPS:
                rows.append({"part": "student", "steps": steps, "expanded": expand,
                             "model": f"Σ + demo-lcm, {steps} LCM step{'s' if steps > 1 else ''}, guidance 1",
                             **_score(pipe, n, lora, expand, sampler="lcm", steps=steps, guidance=1.0)})
    return rows


def table(rows: list[dict[str, Any]], n: int) -> str:
    head = (f"| {n} ShapesBench prompts | model | attribute | count | colour | shape | position | s / image |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        pct = " | ".join(f"{100 * r[k]:.1f} %" for k in ("attribute", "count", "colour", "shape", "position"))
        lines.append(f"| {'expanded' if r['expanded'] else 'as typed'} | {r['model']} | {pct} | "
                     f"{r['seconds_per_image']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shapes.fewstep_demo", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="a LoRA folder from the consistency run's latest (or a given) checkpoint")
    e.add_argument("run_dir", type=Path)
    e.add_argument("out", type=Path)
    e.add_argument("--checkpoint", type=Path, default=None)
    m = sub.add_parser("measure", help="ShapesBench at 1, 2, 4, 8 steps against the teacher (markdown + JSON)")
    m.add_argument("lora", help="a LoRA folder or a shipped name (demo-lcm)")
    m.add_argument("--n", type=int, default=64)
    m.add_argument("--out", type=Path, default=None,
                   help="also write the rows as JSON here (rows of the other part already there are kept)")
    m.add_argument("--part", choices=[*PARTS, "all"], default="all")
    args = p.parse_args(argv)
    if args.command == "export":
        print(export(args.run_dir, args.out, args.checkpoint))
        return 0
    parts = PARTS if args.part == "all" else (args.part,)
    rows = measure(args.lora, args.n, parts)
    if args.out and args.out.is_file():
        old = json.loads(args.out.read_text())
        if old.get("n") == args.n:
            rows = [r for r in old["rows"] if r.get("part") not in parts] + rows
    rows.sort(key=lambda r: (r["expanded"], PARTS.index(r["part"]), r.get("steps", 0)))
    print(table(rows, args.n), flush=True)
    if args.out:
        atomic_write_json({"n": args.n, "size": SIZE, "lora": args.lora, "rows": rows}, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
