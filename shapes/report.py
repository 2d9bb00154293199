"""The demo's measurements: ShapesBench over checkpoints (curves) and over the final models (the table).

``python -m shapes.report --work runs/demo_build`` scores a build without retraining: the runs its work
folder's record names (``shapes.plan``), not a plan re-derived from flags. The build runs it as its last step.
Writes into ``assets/demo``: ``shapesbench.json`` (with the plan), ``shapesbench.md``, ``curves_loss.png``,
``curves_shapesbench.png`` (the paper's Fig. 8 in miniature: each Σ stage starts near where the last ended
and plateaus within a small share of α's steps).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pixsigma.config import DiTConfig, KVCompress
from pixsigma.layout import CHECKOUT
from pixsigma.model.dit import PixArtDiT

from . import DEMO_DIR, shapesbench
from .plan import BENCH_N, WORK, StageRun, plan_to_json, read_build_record, run_folder

if CHECKOUT is not None:  # a clone imports train/ by its name; a wheel has it as pixsigma.train (pixsigma.layout)
    from train.runfiles import FINAL, METRICS, read_status
else:
    from pixsigma.train.runfiles import FINAL, METRICS, read_status

CURVE_N = 32  # prompts per checkpoint score (the curves); the table uses the full set
# The curves' fixed sampling (every point of every stage alike, whatever the folders' own sampling becomes):
# 14 DPM-Solver++ steps at guidance 4.5, prompts as written. The table samples as a user does: each folder's
# own (sampling.json), with Σ's rows both as typed and with its folder's prompt expansion.
CURVE_SAMPLING = {"sampler": "dpm-solver", "steps": 14, "guidance": 4.5, "expand_prompt": False}


def generate_fn(pipe, size: int, kv: KVCompress | None = None, **sampling: Any) -> Callable[[list[str], int], list]:
    """``sampling``: the request's sampler / steps / guidance / expand_prompt (unset: the pipeline folder's own)."""
    from pixsigma.pipeline import GenerationRequest

    def fn(prompts: list[str], seed: int) -> list:
        return pipe.generate(GenerationRequest(prompts, seed=seed, width=size, height=size, kv=kv,
                                               **sampling)).images
    return fn


def _pipe(folder: Path, transformer: Path | None = None):
    from pixsigma.pipeline import PixSigmaPipeline

    # device "auto" (the pipeline's resolve_device): the GPU when one is present, else the CPU
    return PixSigmaPipeline.from_pretrained(str(folder), str(transformer) if transformer else None, device="auto")


def _losses(run_dir: Path, offset: int) -> list[tuple[int, float]]:
    path = run_dir / METRICS
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(offset + int(r["step"]), float(r["loss"])) for r in rows if "loss" in r]


def stage_curves(work: Path, out: Path, plan: list[StageRun]) -> dict[str, Any]:
    """Loss per step and ShapesBench per checkpoint for each stage, on one step axis."""
    if CHECKOUT is not None:
        from train.checkpoint import checkpoint_dirs, checkpoint_model, checkpoint_step
    else:
        from pixsigma.train.checkpoint import checkpoint_dirs, checkpoint_model, checkpoint_step

    curves: dict[str, Any] = {}
    offset = 0
    pipes: dict[str, Any] = {}  # one pipeline per VAE (T5 and its prompt cache shared); checkpoints swap the DiT
    prev = None
    for st in plan:
        run_dir = run_folder(work, st.name)
        models = [(checkpoint_step(ck), checkpoint_model(ck)) for ck in checkpoint_dirs(run_dir)]
        if prev is not None and models:  # step 0: the previous stage's export in this stage's setting
            models.insert(0, (0, _stage_start(run_folder(work, prev.name) / FINAL, models[0][1].config)))
        if models and st.pipeline not in pipes:
            pipes[st.pipeline] = _pipe(out / st.pipeline, run_dir / FINAL)
        scores = [(offset + step, _curve_point(pipes[st.pipeline], net, st.resolution)) for step, net in models]
        prev = st
        curves[st.name] = {"start": offset, "steps": st.steps, "loss": _losses(run_dir, offset), "bench": scores}
        offset += st.steps
    return curves


def _curve_point(pipe, net: PixArtDiT, resolution: int) -> float:
    """One checkpoint's point on a curve: ShapesBench attribute accuracy on the first ``CURVE_N`` prompts."""
    pipe.transformer = net.to(pipe.device, pipe.dtype).eval()
    r = shapesbench.evaluate(generate_fn(pipe, resolution, **CURVE_SAMPLING), n=CURVE_N, width=resolution,
                             height=resolution, batch_size=CURVE_N // 2)
    return r["attribute"]


def extend_curves(out: Path, name: str, runs: list[Path], command: str) -> dict[str, Any]:
    """Append to the report's curves a ``finetune`` continuation of its last stage: ``runs`` are the
    consecutive runs it took (each loading the one before), each checkpoint scored as the build's stages are.
    Its step 0 is the weights the first run loaded (``status.json``'s load report), scored now: with today's
    pipeline (a refined decoder, say), not copied from the last stage's curve. Plateaus and the PNGs are redone;
    the table is left as it was (``--table-only`` re-scores it)."""
    from pixsigma.weights import load_dit
    if CHECKOUT is not None:
        from train.checkpoint import checkpoint_dirs, checkpoint_model, checkpoint_step
    else:
        from pixsigma.train.checkpoint import checkpoint_dirs, checkpoint_model, checkpoint_step

    summary = _read_summary(out, "--extend")
    curves = summary["curves"]
    if name in curves:
        raise ValueError(f"the report already has a stage {name!r} (stages: {', '.join(curves)}); pick a new name")
    if not runs:
        raise ValueError("--extend needs the run folders of the continuation, in order")
    last = curves[list(curves)[-1]]
    start = last["start"] + last["steps"]
    entry: dict[str, Any] = {"start": start, "steps": 0, "loss": [], "bench": [], "runs": [str(r) for r in runs],
                             "command": command}  # each continuation keeps its own command
    statuses = [read_status(r) or {} for r in runs]
    for run, status in zip(runs, statuses):
        if status.get("stage") != "finetune" or status.get("state") != "finished":
            raise ValueError(f"{run} is not a finished finetune run (stage {status.get('stage')!r}, state "
                             f"{status.get('state')!r}): only more training of the last stage's model extends it")
    source = Path(statuses[0].get("load_report", {}).get("source") or "")
    if not source.is_dir():
        raise ValueError(f"the weights {runs[0]} started from ({source}) are gone: step 0 of the curve needs them")
    pipe = _pipe(out / "sigma")
    first_net = load_dit(source)
    entry["bench"].append((start, _curve_point(pipe, first_net, first_net.config.resolution)))
    for run, status in zip(runs, statuses):
        offset = start + entry["steps"]
        for ck in checkpoint_dirs(run):
            net = checkpoint_model(ck)
            entry["bench"].append((offset + checkpoint_step(ck), _curve_point(pipe, net, net.config.resolution)))
        entry["loss"] += _losses(run, offset)
        entry["steps"] += int(status["total_steps"])
    curves[name] = entry
    summary.update(_plateaus(curves, summary["alpha_steps"]))
    plot_curves(curves, out)
    _write_summary(out, summary, summary["table"])
    return summary


def _stage_start(prev_final: Path, config: DiTConfig) -> PixArtDiT:
    """The previous stage's weights in this stage's model (its resolution/PE; new KV layers at avg init)."""
    from pixsigma.weights import KV_KEYS, load_dit

    net = PixArtDiT(config)
    missing, unexpected = net.load_state_dict(load_dit(prev_final).state_dict(), strict=False)
    if unexpected or any(not KV_KEYS.match(k) for k in missing):
        raise ValueError(f"{prev_final} does not fit the next stage: missing {missing}, unexpected {unexpected}")
    return net


def plateau_step(points: list[tuple[int, float]], start: int, tol: float = 0.02) -> int | None:
    """Steps into a stage until its score is within ``tol`` of the stage's best."""
    if not points:
        return None
    best = max(v for _, v in points)
    return next(s - start for s, v in points if v >= best - tol)


def _plateaus(curves: dict[str, Any], alpha_steps: int) -> dict[str, dict]:
    """Each stage's plateau step, and each Σ stage's as a share of α's steps (α is the first stage)."""
    plateaus = {k: plateau_step(c["bench"], c["start"]) for k, c in curves.items()}
    first = next(iter(curves), None)
    return {"plateau_steps": plateaus,
            "plateau_fraction_of_alpha": {k: (v / alpha_steps if v is not None else None)
                                          for k, v in plateaus.items() if k != first}}


def plot_curves(curves: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, ylabel, name in (("loss", "training loss (smoothed)", "curves_loss.png"),
                              ("bench", "ShapesBench attribute accuracy", "curves_shapesbench.png")):
        fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
        for stage, c in curves.items():
            pts = np.array(c[key], dtype=np.float64).reshape(-1, 2)
            if key == "loss" and len(pts) > 20:  # moving average: single-batch losses are noisy
                k = max(5, len(pts) // 40)
                pts = np.stack([pts[k - 1:, 0], np.convolve(pts[:, 1], np.ones(k) / k, mode="valid")], 1)
            if len(pts):
                ax.plot(pts[:, 0], pts[:, 1], marker="o" if key == "bench" else None, ms=3, label=stage)
            ax.axvline(c["start"], color="grey", lw=0.5, ls=":")
        ax.set_xlabel("training step (α, then each Σ stage)")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:  # a report of runs without checkpoints has no bench points
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)


def vae_round_trip_fn(vae_folder: Path, size: int) -> Callable[[list[str], int], list]:
    """Each prompt's real scene (the oracle) encoded and decoded by a VAE: the score a DiT would reach if it
    produced that VAE's exact latents, i.e. the ceiling its decoder sets."""
    import torch
    from diffusers import AutoencoderKL

    from pixsigma.sampling import from_pil, to_pil

    vae = AutoencoderKL.from_pretrained(vae_folder).float().eval()
    oracle = shapesbench.oracle_generate_fn(size, size)

    @torch.no_grad()
    def fn(prompts: list[str], seed: int) -> list:
        x = from_pil(oracle(prompts, seed))  # (B, 3, size, size)
        return to_pil(vae.decode(vae.encode(x).latent_dist.mode()).sample)
    return fn


def final_table(out: Path, n: int) -> dict[str, dict]:
    """The oracle, each VAE's round trip (its decoder's ceiling), then α, Σ and Σ without KV with the prompts
    as typed (the models alone), and Σ as its folder runs by default: short prompts expanded to dense captions."""
    alpha, sigma = _pipe(out / "alpha"), _pipe(out / "sigma")
    rows = {"real images (ceiling)": (shapesbench.oracle_generate_fn(256, 256), 256),
            "real images through VAE-α (128 px)": (vae_round_trip_fn(out / "alpha" / "vae", 128), 128),
            "real images through VAE-Σ (256 px)": (vae_round_trip_fn(out / "sigma" / "vae", 256), 256),
            "PixArt-α (128 px)": (generate_fn(alpha, 128), 128),
            "PixArt-Σ (256 px, KV R=2)": (generate_fn(sigma, 256, expand_prompt=False), 256),
            "PixArt-Σ without KV": (generate_fn(sigma, 256, KVCompress(), expand_prompt=False), 256),
            "PixArt-Σ, prompts expanded": (generate_fn(sigma, 256), 256)}
    return {name: shapesbench.evaluate(fn, n=n, width=size, height=size, batch_size=25)
            for name, (fn, size) in rows.items()}


def _summary_table(table: dict[str, dict]) -> dict[str, dict]:
    return {k: {m: v for m, v in r.items() if m != "per_prompt"} for k, r in table.items()}


def write_report(work: Path, out: Path, n: int) -> dict[str, Any]:
    """Score the build in ``work`` (the plan, command and stage times its record holds) into ``out``: a new
    report, so continuations that ``--extend`` added to an older one are not carried over."""
    build = read_build_record(work)
    plan = build["plan"]
    curves = stage_curves(work, out, plan)
    plot_curves(curves, out)
    table = final_table(out, n)
    summary = {"table": _summary_table(table), **_plateaus(curves, plan[0].steps), "alpha_steps": plan[0].steps,
               "vae_psnr": _vae_psnr(out), "build_minutes": build["build_minutes"], "curves": curves,
               "command": build["command"], "plan": plan_to_json(plan)}
    _write_summary(out, summary, table)
    return summary


def rescore_table(out: Path, n: int, command: str) -> dict[str, Any]:
    """Re-score only the final table of an existing report (the curves, plateaus and build times stay as the
    build measured them): for a change that leaves the DiTs' training untouched, such as a refined decoder."""
    summary = _read_summary(out, "--table-only")
    table = final_table(out, n)
    summary.update(table=_summary_table(table), vae_psnr=_vae_psnr(out), table_command=command)
    _write_summary(out, summary, table)
    return summary


def _read_summary(out: Path, flag: str) -> dict[str, Any]:
    path = out / "shapesbench.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: {flag} works on an existing report; run the build (or the "
                         f"report without {flag}) first")
    return json.loads(path.read_text())


def _vae_psnr(out: Path) -> dict[str, float]:
    return {v: json.loads((out / v / "vae" / "metrics.json").read_text()).get("psnr_db")
            for v in ("alpha", "sigma") if (out / v / "vae" / "metrics.json").is_file()}


def _write_summary(out: Path, summary: dict, table: dict[str, dict]) -> None:
    from pixsigma.io import atomic_write_json, atomic_write_text

    atomic_write_json(summary, out / "shapesbench.json")
    atomic_write_text(out / "shapesbench.md", shapesbench.format_table(table) + "\n")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m shapes.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=WORK, help="the build's work folder (its record, runs and checkpoints)")
    ap.add_argument("--out", default=str(DEMO_DIR), help="the demo pipelines scored, where the report goes")
    ap.add_argument("--bench-n", type=int, default=BENCH_N, help="ShapesBench prompts in the final table")
    ap.add_argument("--table-only", action="store_true",
                    help="re-score only the final table of the existing shapesbench.json (no checkpoints needed)")
    ap.add_argument("--extend", nargs="+", metavar="NAME RUN",
                    help="append a finetune continuation of the last stage (NAME, then its run folders in order) "
                         "to the existing report's curves; the table is kept")
    args = ap.parse_args(argv)
    command = "python -m shapes.report " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out).resolve()
    if args.extend:
        if len(args.extend) < 2:
            ap.error("--extend takes a stage name and at least one run folder")
        s = extend_curves(out, args.extend[0], [Path(r) for r in args.extend[1:]], command)
    elif args.table_only:
        s = rescore_table(out, args.bench_n, command)
    else:
        s = write_report(Path(args.work).resolve(), out, args.bench_n)
    print(json.dumps(s["table"], indent=1))
    return 0

if __name__ == "__main__":
    sys.exit(main())
