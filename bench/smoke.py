"""``python -m bench.smoke --device cuda``: every feature (bench/features.py) in every speed mode at XL shapes.

A pipeline folder is written with random weights: the real PixArt-Σ XL/2 DiT at 1024 px (``PRESETS``, as
bench/models.py builds it: nothing is downloaded), a random ControlNet and LoRA for it, and a small random T5 and
VAE (the DiT is what the speed modes change). It is loaded through ``PixSigmaPipeline.from_pretrained`` (again with
``t5_precision="int8"`` for the 8-bit T5 row). Then, speed mode by speed mode (eager first), each feature alone
makes one 1024 px image in 2 steps, and one plain 2048 px and one 4096 px image follow. Each row checks that the
latents are finite and the images have the asked count and size, and compares the final latents with eager's for
the same row (relative L2 error, at most ``SPEED_RTOL`` of the dtype). One table is written, markdown and JSON,
under ``--out``.

Budget on one H100 (estimated; no GPU was lent while this was written): writing and loading the folders ~30 s;
eager and sdpa ~15 s each (15 rows of 2 steps at 1024 px, ~5 s of 4096 px); compile and graphs each compile the
XL block once per input shape (batch 1, 2 and 4, the KV layers, 2048, 4096 px: ~7 shapes × ~20 s) ≈ 150 s each:
~6 min in all. ``--max-seconds`` (default ``DEFAULT_MAX_SECONDS``) starts no row after that many seconds; the
rows left are written as "not run" and the run exits 3. ``--tiny``: the same on tiny random models at 64, 128
and 256 px (the test suite runs ``--device cpu --tiny``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.features import (
    Feature,
    Inputs,
    features_for,
    images_per_prompt,
    pair_id,
    pipeline_needs,
    random_controlnet,
    random_lora,
    request_for,
    unrecorded,
)
from bench.measure import NotMeasured, check_device, environment, free_memory
from bench.models import build_tokenizer, dit_config
from pixsigma.config import DiTConfig, default_kv
from pixsigma.controlnet_weights import save_controlnet
from pixsigma.io import atomic_write_json, atomic_write_text
from pixsigma.model.dit import PixArtDiT
from pixsigma.pipeline import PixSigmaPipeline
from pixsigma.sampling import PIXART_BETAS
from pixsigma.speed import MODES, optimize, speed_mode
from pixsigma.weights import save_dit

RESULTS = Path(__file__).resolve().parent / "results" / "smoke"
# Relative L2 error of the final latents allowed against eager's, per dtype: bf16 keeps 8 bits of mantissa, so
# another kernel's summation order over 28 blocks × 2 steps moves them ~1e-2; fp32 ~1e-7 (measured on a CPU); a
# wrong, skipped or leftover computation (a LoRA still applied) moves them 1e-2 to 1.
SPEED_RTOL = {torch.bfloat16: 0.05, torch.float32: 1e-4}
DEFAULT_MAX_SECONDS = 420  # of the 8-minute budget: a minute left for the row in flight, the table, start-up
STEPS, SEED = 2, 0
PROMPT = "a small red star above a large blue ring"
NOT_RUN = "not run: --max-seconds reached"


@dataclass(frozen=True)
class Scale:
    """The models and sizes of a run: ``arch`` of bench/models.py at ``base`` px, plus plain images at ``big``."""

    arch: str
    base: int
    big: tuple[int, ...]
    dtype: torch.dtype
    vae_tile: int  # px per VAE tile (tiled decoding from 2048 px): few tiles at 4096 px


SCALES = {"xl": Scale("xl", 1024, (2048, 4096), torch.bfloat16, 1024),
          "tiny": Scale("tiny", 64, (128, 256), torch.float32, 64)}


@dataclass(frozen=True)
class Row:
    """One image to make: speed ``mode``, the features turned on, the square size."""

    mode: str
    combo: tuple[Feature, ...]
    size: int

    @property
    def key(self) -> tuple[str, int]:
        """What eager's row for the same image is found by."""
        return pair_id(self.combo), self.size


# -- the pipeline folder ------------------------------------------------------------------------------------------
@torch.no_grad()
def write_pipeline(folder: Path, config: DiTConfig, scale: Scale, device: torch.device) -> tuple[Path, Path]:
    """(a pipeline folder with random weights: ``config``'s DiT and a ControlNet for it in ``scale.dtype``, a
    small T5 and VAE; a random LoRA file for the DiT)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
    from transformers import T5Config, T5EncoderModel

    tok = build_tokenizer()
    tok.save_pretrained(folder / "tokenizer")
    torch.manual_seed(1)
    T5EncoderModel(T5Config(vocab_size=len(tok), d_model=config.caption_channels, d_kv=8, d_ff=32, num_layers=1,
                            num_heads=2)).save_pretrained(folder / "text_encoder")
    torch.manual_seed(2)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=4, sample_size=scale.vae_tile).save_pretrained(folder / "vae")
    DPMSolverMultistepScheduler(**PIXART_BETAS).save_pretrained(folder / "scheduler")
    with torch.device(device):
        dit = PixArtDiT(config)
    gen = torch.Generator(device=device).manual_seed(0)
    for p in dit.parameters():
        p.normal_(0.0, 0.02, generator=gen)  # a trained DiT's scale; the default init zeroes the output
    save_dit(dit, folder / "transformer", dtype=scale.dtype)
    save_controlnet(random_controlnet(dit, seed=3, scale=0.02), folder / "controlnet", dtype=scale.dtype)
    lora = random_lora(dit, folder.parent / "lora.safetensors", seed=4)
    index = {"_class_name": "PixArtSigmaPipeline", "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "text_encoder": ["transformers", "T5EncoderModel"], "vae": ["diffusers", "AutoencoderKL"],
             "transformer": ["diffusers", "PixArtTransformer2DModel"],
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}
    atomic_write_json(index, folder / "model_index.json", indent=2)
    return folder, lora


class Pipelines:
    """The run's pipelines, one per T5 precision (loaded when first asked), in the current speed mode."""

    def __init__(self, folder: Path, device: torch.device, scale: Scale):
        self.folder, self.device, self.scale = folder, device, scale
        self.loaded: dict[str | None, PixSigmaPipeline] = {}

    def get(self, t5: str | None, mode: str) -> PixSigmaPipeline:
        if t5 not in self.loaded:
            dtype = "bf16" if self.scale.dtype == torch.bfloat16 else "fp32"
            self.loaded[t5] = PixSigmaPipeline.from_pretrained(str(self.folder), device=str(self.device),
                                                               dtype=dtype, t5_precision=t5)
        pipe = self.loaded[t5]
        if speed_mode(pipe.transformer) != mode:
            optimize(pipe.transformer, mode)
        return pipe


# -- the rows -----------------------------------------------------------------------------------------------------
def plan(scale: Scale, device: torch.device, modes: tuple[str, ...]) -> list[Row]:
    """Eager first (the reference), then each mode: each feature alone at the base size, then the big ones."""
    features = [f for f in features_for(device) if f.group != "speed"]
    order = ["eager", *(m for m in modes if m != "eager")]
    rows = []
    for mode in order:
        rows += [Row(mode, (), scale.base)] + [Row(mode, (f,), scale.base) for f in features]
        rows += [Row(mode, (), size) for size in scale.big]
    return rows


def run_row(pipes: Pipelines, row: Row, inputs: Inputs) -> tuple[dict[str, Any], torch.Tensor]:
    """(the row's result fields, its final latents on the CPU)."""
    _, t5 = pipeline_needs(row.combo)
    pipe = pipes.get(t5, row.mode)
    seen: list[torch.Tensor] = []

    def last(step: int, total: int, latents: torch.Tensor) -> None:
        seen[:] = [latents.detach().float().cpu()]  # copied out at once: a CUDA-graph replay may reuse the memory

    start = time.perf_counter()
    res = pipe.generate(request_for(row.combo, inputs, prompt=PROMPT, steps=STEPS, seed=SEED, width=row.size,
                                    height=row.size, binning=False), callback=last)
    seconds = time.perf_counter() - start
    latents = seen[-1]
    problems = []
    if not torch.isfinite(latents).all():
        problems.append("latents not finite")
    if len(res.images) != images_per_prompt(row.combo):
        problems.append(f"{len(res.images)} images, asked {images_per_prompt(row.combo)}")
    if any(im.size != (row.size, row.size) for im in res.images):
        problems.append(f"images {res.images[0].size}, asked {row.size}x{row.size}")
    missing = unrecorded(row.combo, res.params, inputs)
    if missing:
        problems.append(f"parameters do not record {', '.join(missing)}")
    fields = {"status": "FAILED: " + "; ".join(problems) if problems else "ok", "seconds": round(seconds, 3),
              "peak_memory_bytes": res.peak_memory_bytes}
    return fields, latents


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over every element."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def run_smoke(device: torch.device, scale: Scale, modes: tuple[str, ...], max_seconds: float,
              log=print) -> dict[str, Any]:
    """Every row of ``plan``; returns the table (rows, settings, environment)."""
    start = time.perf_counter()
    config = dit_config(scale.arch, scale.base)
    rows_out: list[dict[str, Any]] = []
    eager: dict[tuple[str, int], torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="pixsigma-smoke-") as tmp:
        folder, lora = write_pipeline(Path(tmp) / "pipeline", config, scale, device)
        inputs = Inputs(scale.base, scale.base, str(lora), default_kv(config.depth))
        pipes = Pipelines(folder, device, scale)
        log(f"pipeline written in {time.perf_counter() - start:.0f} s")
        for row in plan(scale, device, modes):
            out = {"mode": row.mode, "features": pair_id(row.combo), "size": row.size}
            if time.perf_counter() - start >= max_seconds:
                rows_out.append({**out, "status": NOT_RUN})
                continue
            try:
                fields, latents = run_row(pipes, row, inputs)
            except Exception as e:  # a row's failure is its result; the next rows still run
                first = (str(e).strip().splitlines() or [""])[0][:300]
                fields, latents = {"status": f"FAILED: {type(e).__name__}: {first}"}, None
                log(traceback.format_exc(limit=-3))
                free_memory(device)
            if latents is not None:
                if row.mode == "eager":
                    eager[row.key] = latents
                elif row.key in eager:
                    err = relative_error(latents, eager[row.key])
                    fields["error_vs_eager"] = err
                    if not err <= SPEED_RTOL[scale.dtype] and fields["status"] == "ok":
                        fields["status"] = f"FAILED: {err:.3g} from eager (tolerance {SPEED_RTOL[scale.dtype]})"
            rows_out.append({**out, **fields})
            log(f"{row.mode:8s} {out['features']:22s} {row.size:5d} px  {fields['status']}")
        for pipe in pipes.loaded.values():
            optimize(pipe.transformer, "eager")
    return {"command": "", "device": str(device), "scale": scale.arch,
            "dit": f"{scale.arch} ({config.depth} blocks, width {config.hidden_size})", "steps": STEPS,
            "tolerance": SPEED_RTOL[scale.dtype], "max_seconds": max_seconds,
            "seconds": round(time.perf_counter() - start, 1), "partial": any(r["status"] == NOT_RUN for r in rows_out),
            "failed": sum(r["status"].startswith("FAILED") for r in rows_out), "environment": environment(device),
            "rows": rows_out}


# -- the table ----------------------------------------------------------------------------------------------------
def to_markdown(table: dict[str, Any]) -> str:
    env = table["environment"]
    lines = ["# pixsigma smoke run: every feature × speed mode", "",
             f"`{table['command']}` on {env.get('device_name', table['device'])} (torch {env['torch']}): "
             f"{table['dit']} DiT, {table['steps']} steps, {table['seconds']:.0f} s"
             f"{' (stopped at --max-seconds: partial)' if table['partial'] else ''}. "
             f"A speed mode passes within {table['tolerance']} relative L2 error of eager's final latents.", "",
             "| mode | features | size | status | seconds | error vs eager |", "|---|---|---|---|---|---|"]
    for r in table["rows"]:
        err = f"{r['error_vs_eager']:.2e}" if "error_vs_eager" in r else "–"
        secs = f"{r['seconds']:.2f}" if "seconds" in r else "–"
        lines.append(f"| {r['mode']} | {r['features']} | {r['size']} | {r['status']} | {secs} | {err} |")
    lines += ["", f"{table['failed']} failed of {len(table['rows'])} rows."]
    return "\n".join(lines) + "\n"


def save(table: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_json(table, out / "smoke.json", indent=1)
    md_path = atomic_write_text(out / "smoke.md", to_markdown(table))
    return json_path, md_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.smoke", description="every feature in every speed mode, "
                                "XL shapes with random weights, checked against eager")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny random models at 64-256 px (the test suite's run)")
    p.add_argument("--modes", help=f"speed modes, from {','.join(MODES)} (default: all; graphs only on CUDA)")
    p.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                   help="start no row after this many seconds; the rest are written as not run")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"folder of smoke.md and smoke.json (default {RESULTS})")
    return p


def main(argv: list[str] | None = None) -> int:
    """0: every row ran and passed; 1: a row failed; 2: bad arguments or device; 3: stopped at --max-seconds."""
    args = build_parser().parse_args(argv)
    try:
        device = check_device(args.device)
    except NotMeasured as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    modes = tuple(m for m in (args.modes or "").split(",") if m) or tuple(m for m in MODES if cuda or m != "graphs")
    bad = [m for m in modes if m not in MODES or (m == "graphs" and not cuda)]
    if bad:
        print(f"error: --modes {','.join(bad)}: accepted {', '.join(MODES)} (graphs only on CUDA)", file=sys.stderr)
        return 2
    if not args.max_seconds > 0:
        print(f"error: --max-seconds must be > 0, got {args.max_seconds}", file=sys.stderr)
        return 2
    table = run_smoke(device, SCALES["tiny" if args.tiny else "xl"], modes, args.max_seconds)
    table["command"] = shlex.join(["python", "-m", "bench.smoke", *(sys.argv[1:] if argv is None else argv)])
    json_path, md_path = save(table, args.out)
    print(f"wrote {md_path} and {json_path}: {table['failed']} failed of {len(table['rows'])} rows"
          f"{', partial' if table['partial'] else ''}")
    print(json.dumps({"failed": table["failed"], "partial": table["partial"], "seconds": table["seconds"]}))
    return 1 if table["failed"] else 3 if table["partial"] else 0


if __name__ == "__main__":
    sys.exit(main())
