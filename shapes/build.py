"""Rebuild the whole embedded demo with one command: the paper's weak-to-strong story in miniature.

    python -m shapes.build            # ≈ 1 h on a 2-core CPU; a GPU only makes it faster

1. world data (PNG + short/long captions) at many aspect ratios;
2. the frozen text encoder and the two VAEs (``shapes.build_parts``);
3. PixArt-α: from scratch at 128 px, VAE-α, short captions;
4. PixArt-Σ from α: ``vae_adapt`` (VAE-Σ) -> ``res_up`` (256 px, PE interpolation) -> ``kv_compress``
   (R = 2, conv avg init, layers 4-7), on the 60/40 long/short caption mix, each stage 10% of α's steps;
   optionally (``--polish-steps N``) the finished Σ trained N more steps at 256 px (``finetune``);
5. ShapesBench over checkpoints (the curves) and, in full, over α, Σ and Σ without KV (the table).

Every stage runs the one shared training loop (``python -m train``) with a config from ``configs/``;
finished steps are skipped on a re-run, so an interrupted build picks up where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shapes import DEMO_DIR
from shapes.build_parts import T5_STEPS

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
# Defaults shared with ``shapes.report`` (which re-scores a build): its scratch folder, α's steps, the
# table's prompt count.
WORK, ALPHA_STEPS, BENCH_N = "runs/demo_build", 3000, 200
POLISH_IMAGES = 6400  # world images the optional Σ polish run revisits (each costs ~0.1 s to encode on a CPU)
# (w, h) drawn per training image: square plus the 256 px buckets from 1:4 to 4:1.
TRAIN_SIZES = ((256, 256), (256, 256), (224, 288), (288, 224), (192, 320), (320, 192), (176, 368), (368, 176),
               (128, 512), (512, 128))
PIPELINE_INDEX = {
    "_class_name": "PixArtSigmaPipeline", "_diffusers_version": "0.42.1",
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "text_encoder": ["transformers", "T5EncoderModel"],
    "vae": ["diffusers", "AutoencoderKL"], "transformer": ["diffusers", "PixArtTransformer2DModel"],
    "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
}
# The demo folders' own sampling (their scheduler/ and sampling.json): ancestral Euler, 30 steps, guidance 2.
# Chosen on the shipped Σ over 48 prompts (same seeds): DPM-Solver++ 20 steps at guidance 4.5 scored 63.8 %,
# at guidance 2 70.6 %; ancestral Euler 30 steps at guidance 2 77.3 % (its re-noising washes out part of a
# 5M-parameter model's errors, where an ODE solver carries them to the end); 40 steps gave no more. On the full
# table (n = 200) the gain is smaller: 66.8 -> 69.9 %.
DEMO_STEPS, DEMO_GUIDANCE = 30, 2.0
# Σ's folder rewrites short prompts into the dense captions it learned from (shapes.prompts); α's does
# not, as α only ever read short captions.
DEMO_EXPANDER = {"sigma": "shapes", "alpha": None}


@dataclass(frozen=True)
class StageRun:
    """One training run of the build: its config, where it reads and writes, and its length."""

    name: str  # run folder name
    config: str  # file in configs/
    cache: str  # feature cache name
    steps: int
    pipeline: str  # "alpha" or "sigma": which VAE / pipeline folder it trains against
    resolution: int
    batch_size: int
    images: int | None = None  # first N world images its cache holds (None: all); a short stage sees each once
    short: str = "raw"  # its data's short captions (world.dataset_caption): "raw", or "complete"


def stage_plan(alpha_steps: int, sigma_fraction: float = 0.1, alpha_batch_scale: int = 1,
               sigma_batch_scale: int = 1, polish_steps: int = 0,
               polish_images: int = POLISH_IMAGES, band_steps: int = 0,
               complete_steps: int = 0) -> list[StageRun]:
    """α, then the three Σ stages of ``sigma_fraction`` of α's steps each. ``alpha_batch_scale`` multiplies α's
    batch and ``sigma_batch_scale`` the Σ stages' (a GPU runs 4× the CPU batch of this small model in about the
    same step time); at 1 the Σ stages keep their configs' batches (32 at 128 px, 16 at 256 px), CPU-sized.
    ``polish_steps`` > 0 appends a ``finetune`` run of the finished Σ at 256 px (the same model trained longer,
    on ``polish_images`` images it revisits: its own cache, since the stages' caches hold only what they visit).
    ``band_steps`` > 0 appends one more ``finetune`` run on that cache with a share of its timesteps in the
    mid-noise band (``configs/shapes_sigma_band.yaml``). ``complete_steps`` > 0 appends one more on the same
    images with complete short captions (``configs/shapes_sigma_complete.yaml``: every caption names every
    object)."""
    for name, k in (("alpha_batch_scale", alpha_batch_scale), ("sigma_batch_scale", sigma_batch_scale),
                    ("polish_images", polish_images)):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {k}")
    for name, k in (("polish_steps", polish_steps), ("band_steps", band_steps), ("complete_steps", complete_steps)):
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"{name} must be an integer >= 0 (0: no such run), got {k}")
    s = max(10, int(alpha_steps * sigma_fraction))
    b128, b256 = 32 * sigma_batch_scale, 16 * sigma_batch_scale
    # A Σ stage's cache holds only the images it can visit: more would only cost time (256 px VAE encoding
    # dominates the build otherwise).
    plan = [StageRun("alpha", "shapes_alpha.yaml", "alpha_128", alpha_steps, "alpha", 128, 32 * alpha_batch_scale),
            StageRun("sigma_vae", "shapes_sigma_vae.yaml", "sigma_128", s, "sigma", 128, b128, s * b128),
            StageRun("sigma_resup", "shapes_sigma_resup.yaml", "sigma_256", s, "sigma", 256, b256, s * b256),
            StageRun("sigma_kv", "shapes_sigma_kv.yaml", "sigma_256", s, "sigma", 256, b256, s * b256)]
    if polish_steps:
        plan.append(StageRun("sigma_polish", "shapes_sigma_polish.yaml", "sigma_256_polish", polish_steps, "sigma",
                             256, b256, polish_images))
    if band_steps:
        plan.append(StageRun("sigma_band", "shapes_sigma_band.yaml", "sigma_256_polish", band_steps, "sigma",
                             256, b256, polish_images))
    if complete_steps:
        plan.append(StageRun("sigma_complete", "shapes_sigma_complete.yaml", "sigma_256_complete", complete_steps,
                             "sigma", 256, b256, polish_images, short="complete"))
    return plan


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
    from shapes.world import make_dataset

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
    from pixsigma.io import new_folder
    from pixsigma.sampling import PIXART_BETAS

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
        (folder / "model_index.json").write_text(json.dumps(PIPELINE_INDEX, indent=2))


def default_precision() -> str:
    """``bf16`` where the hardware runs it fast (a CUDA GPU; a CPU with AVX512-BF16 or AMX, where the demo's
    training steps run 2× faster than fp32), else ``no`` (fp32: bf16 is emulated, slower, on other CPUs)."""
    import torch

    if torch.cuda.is_available():
        return "bf16"
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    return "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "no"


def train_stage(st: StageRun, prev: StageRun | None, work: Path, data: Path, out: Path, evals: int,
                threads: int, precision: str = "no") -> Path:
    from train.checkpoint import checkpoint_dirs

    run_dir = work / "runs" / st.name
    if (run_dir / "final").is_dir():
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
        sets.append(f"stage.load_from={work / 'runs' / prev.name}")
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

    alpha = load_dit(work / "runs" / plan[0].name / "final")
    save_diffusers_transformer(alpha, out / "alpha" / "transformer", dtype=torch.float16)
    sigma = load_dit(work / "runs" / plan[-1].name / "final")
    save_dit(sigma, out / "sigma" / "transformer", dtype=torch.float16)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m shapes.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=WORK, help="scratch folder (data, caches, runs, logs)")
    ap.add_argument("--out", default=str(DEMO_DIR), help="where the demo pipelines go (assets/demo)")
    ap.add_argument("--images", type=int, default=12000, help="training images of the world")
    ap.add_argument("--alpha-steps", type=int, default=ALPHA_STEPS, help="PixArt-α steps; each Σ stage gets 10%%")
    # 900: a linear probe then reads every slot's colour/shape/size/cell from T5's features at 100% (at 500
    # steps colour was 85% and size 70%: a ceiling on the DiT's adherence).
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
    # the plan first: a bad --*-scale, --polish-* or --band-steps fails here, not after the parts and data are built
    plan = stage_plan(args.alpha_steps, alpha_batch_scale=args.alpha_batch_scale,
                      sigma_batch_scale=args.sigma_batch_scale, polish_steps=args.polish_steps,
                      polish_images=args.polish_images, band_steps=args.band_steps,
                      complete_steps=args.complete_steps)
    from shapes import report

    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    missing = [p for p in ("tokenizer", "text_encoder", "vae_alpha", "vae_sigma") if not (work / "parts" / p).is_dir()]
    if missing:  # parts already built are kept: a re-run rebuilds only what is absent
        _run([sys.executable, "-m", "shapes.build_parts", "--out", str(work / "parts"), "--parts",
              ",".join(missing), "--seed", str(args.seed), "--t5-steps", str(args.t5_steps)],
             work / "logs" / "parts.log", args.threads)
    from shapes.build_parts import needs_refinement
    from shapes.vae import VAE_SPECS

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
    t = time.perf_counter()
    report.write_report(work, out, plan, args.bench_n, timings,
                        "python -m shapes.build " + " ".join(argv if argv is not None else sys.argv[1:]))
    timings["bench"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    print(json.dumps({"minutes": round(total / 60, 1), **{k: round(v / 60, 1) for k, v in timings.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
