"""Rebuild the whole embedded demo with one command: the paper's weak-to-strong story in miniature.

    python -m shapes.build            # hours on a CPU; a GPU only makes it faster

1. world data (PNG + short/long captions) at many aspect ratios;
2. the frozen text encoder and the two VAEs (``shapes.build_parts``);
3. PixArt-α: from scratch at 128 px, VAE-α, short captions;
4. PixArt-Σ from α: ``vae_adapt`` (VAE-Σ) -> ``res_up`` (256 px, PE interpolation) -> ``kv_compress``
   (R = 2, conv avg init, the deep half), on the paper's long/short caption mix, each stage a tenth of α's steps;
   optionally (``--polish-steps N``, ``--band-steps N``, ``--complete-steps N``) ``finetune`` runs of the
   finished Σ at 256 px (the plan: ``shapes.plan``);
5. the report (``python -m shapes.report``): ShapesBench over checkpoints (the curves) and, in full, over α,
   Σ and Σ without KV (the table).

Every stage runs in its own process with a config from ``configs/`` (training: ``python -m train``);
finished steps are skipped on a re-run, so an interrupted build picks up where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pixsigma.layout import CHECKOUT

from . import CONFIGS, DEMO_DIR, REPO
from .build_parts import T5_STEPS
from .plan import (
    ALPHA_STEPS,
    BENCH_N,
    POLISH_IMAGES,
    WORK,
    StageRun,
    run_folder,
    stage_plan,
    write_build_record,
)

if CHECKOUT is not None:  # a clone imports train/ by its name; a wheel has it as pixsigma.train (pixsigma.layout)
    from train.runfiles import FINAL
else:
    from pixsigma.train.runfiles import FINAL

# (w, h) drawn per training image: square plus the 256 px buckets from 1:4 to 4:1.
TRAIN_SIZES = ((256, 256), (256, 256), (224, 288), (288, 224), (192, 320), (320, 192), (176, 368), (368, 176),
               (128, 512), (512, 128))
PIPELINE_INDEX = {
    "_class_name": "PixArtSigmaPipeline", "_diffusers_version": "0.42.1",
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "text_encoder": ["transformers", "T5EncoderModel"],
    "vae": ["diffusers", "AutoencoderKL"], "transformer": ["diffusers", "PixArtTransformer2DModel"],
    "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
}
# The demo folders' own sampling: ancestral Euler's re-noising washes out part of a tiny model's errors, where
# an ODE solver carries them to the end (the comparison: docs/demo-history.md).
DEMO_STEPS, DEMO_GUIDANCE = 30, 2.0
# Σ's folder rewrites short prompts into the dense captions it learned from (shapes.prompts); α's does
# not, as α only ever read short captions.
DEMO_EXPANDER = {"sigma": "shapes", "alpha": None}


def _run(cmd: list[str], log: Path, threads: int) -> None:
    """Run a step in its own process (accelerate keeps per-process state), its output in ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    # Small models on a shared CPU: more BLAS threads than free cores makes each step many times slower.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise RuntimeError(f"step failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def make_data(work: Path, n: int, seed: int, short: str = "raw") -> Path:
    """The build's world images (the same for both caption styles; "complete" data has its own folder)."""
    from .world import make_dataset

    data = work / ("data" if short == "raw" else f"data_{short}")
    if not (data / "metadata.jsonl").is_file():
        make_dataset(data, n, seed=seed, sizes=TRAIN_SIZES, short=short)
    return data


def assemble_pipelines(parts: Path, out: Path) -> None:
    """alpha/ and sigma/ pipeline folders sharing the T5 and tokenizer, each with its own VAE.

    The build's parts always replace what the folders held (a rebuild with a retrained VAE must not train
    against the old one); each copy is swapped in whole."""
    from diffusers import EulerAncestralDiscreteScheduler

    from pixsigma.config import PRESETS
    from pixsigma.folder_settings import SamplingDefaults
    from pixsigma.io import atomic_write_json, new_folder
    from pixsigma.sampling import PIXART_BETAS
    from pixsigma.weights import MODEL_INDEX

    for name, vae in (("alpha", "vae_alpha"), ("sigma", "vae_sigma")):
        folder = out / name
        for sub, src in (("tokenizer", "tokenizer"), ("text_encoder", "text_encoder"), ("vae", vae)):
            with new_folder(folder / sub) as tmp:
                shutil.copytree(parts / src, tmp, dirs_exist_ok=True)
        # Always rewritten: it must say the demo DiT's prediction type (the α folder's DiT is in diffusers
        # layout, which has no field for it).
        EulerAncestralDiscreteScheduler(**{**PIXART_BETAS, "prediction_type": PRESETS["demo"].prediction_type}
                                        ).save_pretrained(folder / "scheduler")
        SamplingDefaults(DEMO_STEPS, DEMO_GUIDANCE, DEMO_EXPANDER[name]).write(folder)
        atomic_write_json(PIPELINE_INDEX, folder / MODEL_INDEX, indent=2)


def default_precision() -> str:
    """``bf16`` where the hardware runs it fast (a CUDA GPU; a CPU with AVX512-BF16 or AMX), else ``no`` (fp32:
    bf16 is emulated, slower, on other CPUs)."""
    import torch

    if torch.cuda.is_available():
        return "bf16"
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    return "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "no"


def train_stage(st: StageRun, prev: StageRun | None, work: Path, data: Path, out: Path, evals: int,
                threads: int, precision: str) -> Path:
    """Train one run of the plan after ``prev`` (skipped once it has ``final``; resumed from its last checkpoint)."""
    if CHECKOUT is not None:
        from train.checkpoint import checkpoint_dirs
    else:
        from pixsigma.train.checkpoint import checkpoint_dirs

    run_dir = run_folder(work, st.name)
    if (run_dir / FINAL).is_dir():
        return run_dir
    every = max(1, st.steps // evals)
    sets = [f"output_dir={run_dir}", f"data.source={data}", f"data.cache={work / 'cache' / st.cache}",
            f"data.text_encoder={out / st.pipeline}", f"data.vae={out / st.pipeline}", f"steps={st.steps}",
            f"batch_size={st.batch_size}",
            f"save_every={every}", f"keep_last={evals + 2}", "sample_every=0",
            f"mixed_precision={precision}"]
    if st.images is not None:
        sets.append(f"data.max_images={st.images}")
    if prev is not None:
        sets.append(f"stage.load_from={run_folder(work, prev.name)}")
    args = [x for s in sets for x in ("--set", s)]
    log = work / "logs" / f"{st.name}.log"
    if not (work / "cache" / st.cache / "index.json").is_file():
        _run([sys.executable, "-m", "train.extract", str(CONFIGS / st.config), *args], log, threads)
    resume = ["--resume"] if checkpoint_dirs(run_dir) else []
    _run([sys.executable, "-m", "train", str(CONFIGS / st.config), *args, *resume], log, threads)
    return run_dir


def export(work: Path, out: Path, plan: list[StageRun]) -> None:
    """α in diffusers layout (diffusers can run it), Σ (KV-compressed) in the pixsigma layout; fp16 on disk."""
    import torch

    from pixsigma.weights import load_dit, save_diffusers_transformer, save_dit

    alpha = load_dit(run_folder(work, plan[0].name) / FINAL)
    save_diffusers_transformer(alpha, out / "alpha" / "transformer", dtype=torch.float16)
    sigma = load_dit(run_folder(work, plan[-1].name) / FINAL)
    save_dit(sigma, out / "sigma" / "transformer", dtype=torch.float16)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m shapes.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=WORK, help="scratch folder (data, caches, runs, logs)")
    ap.add_argument("--out", default=str(DEMO_DIR), help="where the demo pipelines go (assets/demo)")
    ap.add_argument("--images", type=int, default=12000, help="training images of the world")
    ap.add_argument("--alpha-steps", type=int, default=ALPHA_STEPS, help="PixArt-α steps; each Σ stage gets a tenth")
    ap.add_argument("--t5-steps", type=int, default=T5_STEPS, help="steps of the frozen text encoder's training")
    ap.add_argument("--alpha-batch-scale", type=int, default=1,
                    help="multiplies α's batch of 32 (on a GPU, 4 costs about the same time per step)")
    ap.add_argument("--sigma-batch-scale", type=int, default=1,
                    help="multiplies the Σ stages' batches (32 at 128 px, 16 at 256 px) and their caches")
    ap.add_argument("--polish-steps", type=int, default=0,
                    help="after the three Σ stages, train the finished Σ this many more steps at 256 px (0: none)")
    ap.add_argument("--polish-images", type=int, default=POLISH_IMAGES, help="world images the polish run revisits")
    ap.add_argument("--band-steps", type=int, default=0,
                    help="then this many more with a share of the timesteps in the mid-noise band (0: none)")
    ap.add_argument("--complete-steps", type=int, default=0,
                    help="then this many more on complete short captions (every caption names every object; 0: none)")
    ap.add_argument("--evals", type=int, default=4, help="checkpoints per stage scored for the curves")
    ap.add_argument("--bench-n", type=int, default=BENCH_N, help="ShapesBench prompts in the final table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=("auto", "bf16", "no"), default="auto",
                    help="training precision (auto: bf16 where the hardware runs it fast, else fp32)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="BLAS threads per step")
    args = ap.parse_args(argv)
    # the plan first: a bad --*-scale or run length fails here, not after the parts and data are built
    plan = stage_plan(args.alpha_steps, alpha_batch_scale=args.alpha_batch_scale,
                      sigma_batch_scale=args.sigma_batch_scale, polish_steps=args.polish_steps,
                      polish_images=args.polish_images, band_steps=args.band_steps,
                      complete_steps=args.complete_steps)
    command = "python -m shapes.build " + " ".join(argv if argv is not None else sys.argv[1:])
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    timings: dict[str, float] = {}

    def record() -> None:
        write_build_record(work, plan, command, {k: round(v / 60, 2) for k, v in timings.items()})

    record()
    t0 = time.perf_counter()
    missing = [p for p in ("tokenizer", "text_encoder", "vae_alpha", "vae_sigma") if not (work / "parts" / p).is_dir()]
    if missing:  # parts already built are kept: a re-run rebuilds only what is absent
        _run([sys.executable, "-m", "shapes.build_parts", "--out", str(work / "parts"), "--parts",
              ",".join(missing), "--seed", str(args.seed), "--t5-steps", str(args.t5_steps)],
             work / "logs" / "parts.log", args.threads)
    from .build_parts import needs_refinement
    from .vae import VAE_SPECS

    for name, spec in VAE_SPECS.items():  # parts built before a spec gained its decoder phase get just that
        if needs_refinement(work / "parts" / f"vae_{name}", spec):
            _run([sys.executable, "-m", "shapes.build_parts", "--refine-decoder",
                  str(work / "parts" / f"vae_{name}"), "--spec", name, "--seed", str(args.seed)],
                 work / "logs" / "parts.log", args.threads)
    timings["parts"] = time.perf_counter() - t0
    assemble_pipelines(work / "parts", out)
    data = {st.short: make_data(work, args.images, args.seed, st.short) for st in plan}
    timings["data"] = time.perf_counter() - t0 - sum(timings.values())
    precision = default_precision() if args.precision == "auto" else args.precision
    prev = None
    for st in plan:
        t = time.perf_counter()
        train_stage(st, prev, work, data[st.short], out, args.evals, args.threads, precision)
        timings[st.name] = time.perf_counter() - t
        prev = st
    export(work, out, plan)
    record()  # the report reads the plan and these times from the work folder
    t = time.perf_counter()
    _run([sys.executable, "-m", "shapes.report", "--work", str(work), "--out", str(out), "--bench-n",
          str(args.bench_n)], work / "logs" / "report.log", args.threads)
    timings["bench"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    print(json.dumps({"minutes": round(total / 60, 1), **{k: round(v / 60, 1) for k, v in timings.items()}}))
    return 0

if __name__ == "__main__":
    sys.exit(main())
