"""The command line: ``python -m pixsigma generate|convert|space|app …``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import diffusers
import transformers

from pixsigma.config import KV_OPERATORS, DiTConfig, KVCompress, default_kv, parse_layers
from pixsigma.constants import DEFAULT_GUIDANCE, DTYPE_NAMES, MAX_TOKENS
from pixsigma.control_cli import add_control_args, control_from_args
from pixsigma.edit_cli import add_edit_args, edit_from_args, output_size_warning
from pixsigma.io import numbered_paths, save_png
from pixsigma.lora import SCALE_RANGE, LoraSpec, resolve_lora
from pixsigma.model.dit import PixArtDiT
from pixsigma.pipeline import GenerationRequest, OutOfMemory, PixSigmaPipeline
from pixsigma.sampling import SAMPLERS
from pixsigma.space import add_space_parser, run_space
from pixsigma.speed import MODES as SPEED_MODES
from pixsigma.t5 import T5_PRECISIONS
from pixsigma.weights import CheckpointError, load_weights, read_checkpoint, save_diffusers_transformer, save_dit

log = logging.getLogger("pixsigma")
APP_EXTRA = 'pip install "pixsigma[app]"'
APP_PACKAGES = ("gradio", "gradio_client", "pandas", "yaml")  # what pyproject's [app] extra installs

EPILOG = f"""
models:
  --model takes a diffusers pipeline folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
  scheduler/), a hub id such as PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, or 'demo' / 'demo-alpha' (the shipped
  shapes-world models). --transformer replaces the DiT with a diffusers transformer folder or an original
  checkpoint (.pth/.safetensors, {{'state_dict': …}} or bare); KV compression is read from blocks.N.attn.sr.*.

examples:
  python -m pixsigma generate "a red star above a blue ring" --model demo --out star.png
  python -m pixsigma generate "a cat in a hat" --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --dtype bf16 \\
      --width 1024 --height 768 --out cat.png
  python -m pixsigma generate "a lighthouse" --model PixArt-alpha/PixArt-Sigma-XL-2-2K-MS --kv-compress 2 \\
      --kv-layers 14-27 --width 2048 --height 2048 --dtype bf16 --offload-t5 --out lighthouse.png
  python -m pixsigma convert PixArt-Sigma-XL-2-2K-MS.pth --out sigma-2k-transformer

Prompts longer than {MAX_TOKENS} T5 tokens are truncated with a warning naming how many were dropped.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pixsigma", epilog=EPILOG,
                                description="PixArt-Σ text-to-image up to 4K, with KV token compression.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text -> PNG", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("prompt", help="what to draw")
    g.add_argument("--model", required=True, help="pipeline folder, hub id, or 'demo'")
    g.add_argument("--transformer", help="replacement DiT weights (diffusers folder or original .pth/.safetensors)")
    g.add_argument("--out", required=True, help="output PNG (several images: out-0.png, out-1.png, …)")
    g.add_argument("--negative", default="", help="negative prompt (default: empty, as PixArt was trained)")
    g.add_argument("--seed", type=int, help="random seed (default: random, stored in the PNG)")
    g.add_argument("--steps", type=int, help="sampling steps (default: a --lora's or the model folder's "
                   "sampling.json, else the sampler's: 20 for DPM-Solver++, 4 for lcm)")
    g.add_argument("--guidance", type=float, help=f"classifier-free guidance scale (default: a --lora's or the model "
                   f"folder's sampling.json, else {DEFAULT_GUIDANCE}; 1 = off: one DiT call per step)")
    g.add_argument("--width", type=int, help="image width in px (default: the model's base resolution)")
    g.add_argument("--height", type=int, help="image height in px")
    g.add_argument("--sampler", choices=SAMPLERS, default="default",
                   help="default = a --lora's sampling.json (lcm for a few-step adapter such as demo-lcm), else "
                   "the model folder's scheduler; dpm-solver = DPM-Solver++ multistep; lcm = 1-8 steps of a "
                   "consistency-distilled model")
    g.add_argument("--no-binning", action="store_true", help="generate at exactly --width/--height (multiples "
                   "of 16) instead of the nearest aspect-ratio bucket resized back")
    g.add_argument("--kv-compress", type=int, metavar="R", help="KV token compression ratio (1 = off; default: "
                   "what the checkpoint was trained with)")
    g.add_argument("--kv-layers", default=None, help="layers to compress, e.g. 14-27 (default: the deep half)")
    g.add_argument("--kv-operator", choices=KV_OPERATORS, default="conv")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="default: bf16 on CUDA, fp32 elsewhere")
    g.add_argument("--speed", choices=SPEED_MODES, default="eager", help="how the DiT runs, not what it computes: "
                   "sdpa picks the fastest attention kernel per shape, compile adds torch.compile per bucket, graphs "
                   "adds CUDA graphs")
    g.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="apply guidance only for timesteps in [LOW, HIGH] (faster; changes the image)")
    g.add_argument("--no-expand", action="store_true", help="give the model the prompt as typed, not the rewrite "
                   "its folder names (the demo Σ's: a short prompt as the dense caption it was trained on)")
    add_control_args(g)
    add_edit_args(g)
    g.add_argument("--offload-t5", action="store_true", help="keep T5 on the CPU between encodings (saves ~9 GB "
                   "of GPU memory with T5-XXL; a 1024 px image then fits a 12 GB card)")
    g.add_argument("--t5", choices=T5_PRECISIONS, default=None, help="T5's precision (default: --dtype); int8 "
                   "stores its weights in 8 bits: T5-XXL ~4.9 GB instead of ~9.5 GB (docs/t5.md)")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="apply a LoRA (repeatable; "
                   "they add up): a .safetensors file, a PEFT folder or a shipped name such as demo-tiny-huge; SCALE "
                   f"(default 1, within [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}]) multiplies its alpha/r. LoRA, LoHa "
                   "and LoKr files; layouts: docs/lora.md")
    c = sub.add_parser("convert", help="original checkpoint -> diffusers transformer folder (safetensors)")
    c.add_argument("checkpoint", help="original .pth/.safetensors (or any layout load accepts)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--base-resolution", type=int, help="base resolution if the file name does not say "
                   "(256, 512, 1024, 2048, 4096)")
    add_space_parser(sub)  # pixsigma space OUT: a Hugging Face Space folder (pixsigma.space)
    # main() hands `pixsigma app …` to the app before parsing: listed here for --help only
    sub.add_parser("app", add_help=False, help="serve the web app: pixsigma app [the app's flags] "
                   f"(pixsigma app --help; docs/app.md); needs {APP_EXTRA}")
    return p


def kv_from_args(args: argparse.Namespace, depth: int | None = None) -> KVCompress | None:
    if args.kv_compress is None:
        if args.kv_layers is not None:
            raise ValueError("--kv-layers needs --kv-compress R")
        return None
    if args.kv_compress < 1:
        raise ValueError(f"--kv-compress must be >= 1 (1 = off, 2 or 3 compress), got {args.kv_compress}")
    if args.kv_compress == 1:
        return KVCompress()
    if not args.kv_layers:  # before the model is loaded its depth is unknown: XL's stands in
        return default_kv(depth or DiTConfig.depth, args.kv_compress, args.kv_operator)
    return KVCompress(ratio=args.kv_compress, layers=parse_layers(args.kv_layers), operator=args.kv_operator)


def run_generate(args: argparse.Namespace) -> list[Path]:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out} must end in .png")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.guidance is not None and not 0 <= args.guidance < float("inf"):
        raise ValueError(f"--guidance must be >= 0 and finite (1 = off), got {args.guidance}")
    kv_arg = kv_from_args(args, depth=None)
    loras = [LoraSpec.parse(t) for t in args.lora]  # bad input refused before the model loads
    for spec in loras:
        resolve_lora(spec.path)
    control = control_from_args(args)  # the image is read (and refused) before any model loads
    edit = edit_from_args(args)  # --init-image, --mask, --strength: likewise (pixsigma.edit_cli)
    if (tiny := output_size_warning(args.width, args.height)) is not None:
        log.warning(tiny)
    pipe = PixSigmaPipeline.from_pretrained(args.model, args.transformer, args.device, args.dtype, args.offload_t5,
                                            speed=args.speed, t5_precision=args.t5, controlnet=args.controlnet)
    pipe.set_loras(loras)
    if kv_arg is not None and args.kv_layers is None and kv_arg.active:
        kv_arg = kv_from_args(args, depth=pipe.transformer.config.depth)
    req = GenerationRequest(args.prompt, args.negative, args.width, args.height, args.steps, args.guidance,
                            args.sampler, args.seed, args.num_images, not args.no_binning, kv_arg,
                            tuple(args.guidance_interval) if args.guidance_interval else None,
                            expand_prompt=not args.no_expand, **control, **edit)
    for word in pipe.unknown_words(args.prompt):
        log.warning("unknown word %r: this model's tokenizer does not know it", word)
    res = pipe.generate(req)
    for w in res.warnings:
        log.warning(w)
    paths = numbered_paths(out, len(res.images))
    for img, path in zip(res.images, paths):
        save_png(img, path, res.params)
    mem = f", peak {res.peak_memory_bytes / 2**30:.1f} GiB" if res.peak_memory_bytes else ""
    print(f"wrote {', '.join(map(str, paths))} ({res.width}x{res.height}, seed {res.seed}, "
          f"{res.seconds:.1f} s{mem})")
    for path, read in zip(paths, res.params.get("expanded_prompts", [])):
        print(f"{path.name} read the expanded prompt (--no-expand: as typed): {read}")
    return paths


def run_convert(args: argparse.Namespace) -> Path:
    config, sd = read_checkpoint(args.checkpoint, args.base_resolution)
    model = PixArtDiT(config)
    load_weights(model, sd, str(args.checkpoint))
    if config.kv_compress.active:
        save_dit(model, args.out)
        raise CheckpointError(
            f"{args.checkpoint} is KV-compressed (R={config.kv_compress.ratio}, layers "
            f"{list(config.kv_compress.layers)}): diffusers' PixArtTransformer2DModel cannot run it. Wrote a "
            f"pixsigma folder instead at {args.out}; use it with `python -m pixsigma generate --transformer "
            f"{args.out}`")
    save_diffusers_transformer(model, args.out)
    print(f"wrote diffusers transformer folder {args.out} ({config.depth} layers, base "
          f"{config.resolution} px, {model.num_params() / 1e6:.0f}M params)")
    return Path(args.out)


def run_app(argv: list[str]) -> int:
    """``pixsigma app [flags]``: the app's own ``main`` (pixsigma_ui/server.py) on ``argv``; 2 without gradio."""
    try:  # the app (and gradio) only when asked for: the engine never imports them
        from pixsigma_ui.server import main as serve
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in APP_PACKAGES:
            raise
        print(f"error: the app needs the [app] extra ({e.name} is not installed): {APP_EXTRA}", file=sys.stderr)
        return 2
    serve(argv, prog="pixsigma app")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["app"]:  # every later word is the app's: its flags are its own parser's
        return run_app(argv[1:])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        if args.command == "generate":
            run_generate(args)
        elif args.command == "space":
            run_space(args)
        else:
            run_convert(args)
    except (ValueError, FileNotFoundError, CheckpointError, OutOfMemory) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
