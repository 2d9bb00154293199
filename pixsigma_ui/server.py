"""The pixsigma web app's server: Generate, Compare (PixArt-α vs Σ, KV compression on/off) and, optionally, Train.

    python app.py [--model demo|FOLDER|HUB_ID] [--alpha-model demo-alpha|...|none] [--enable-training]
                  [--host 0.0.0.0] [--port 7860] [--share] [--devices cuda:0,cuda:1]
                  [--keep-outputs-hours 24] [--keep-outputs-mb 1000] [--data-root DIR] [--max-upload-mb 200] …
    pixsigma app [the same flags]          # an installed wheel (pip install "pixsigma[app]")
    python -m pixsigma_ui [the same flags]

``build_demo(engine)`` makes the Blocks (one builder per tab, in their own modules); ``main`` parses the flags,
loads the models and launches. Importing this module loads no model and starts nothing. Environment:
PIXSIGMA_MODEL, PIXSIGMA_ALPHA_MODEL, PIXSIGMA_ENABLE_TRAINING=1 (same as the flags); GRADIO_SERVER_NAME /
GRADIO_SERVER_PORT as gradio reads them. Docs: docs/app.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import gradio as gr

from pixsigma.constants import DTYPE_NAMES
from pixsigma.pipeline import resolve_model
from pixsigma.t5 import T5_PRECISIONS
from pixsigma_ui import inputs
from pixsigma_ui.compare_tab import build_compare_tab
from pixsigma_ui.control_panel import attach_controlnet
from pixsigma_ui.engine import ALPHA, MAIN, AppEngine
from pixsigma_ui.generate_tab import build_generate_tab
from pixsigma_ui.inputs import log
from pixsigma_ui.model_picker import build_runs_api
from pixsigma_ui.pool import EnginePool
from pixsigma_ui.queue_full import explain_queue_full
from pixsigma_ui.retention import (
    DEFAULT_KEEP_HOURS,
    DEFAULT_KEEP_MB,
    Retention,
    Sweeper,
    exit_on_sigterm,
    prune,
    prune_gradio_cache,
    temp_outputs_folder,
)
from pixsigma_ui.run_models import attach_runs
from pixsigma_ui.train_tab import REPO, RunManager, build_train_tab, find_recipes
from pixsigma_ui.uploads import Uploads, add_upload_args, limits_from_args
from pixsigma_ui.zerogpu import gpu_decorator

QUEUE_SIZE = 16  # waiting requests beyond this are refused ("queue full") instead of waiting for minutes
CACHE_SWEEP_EVERY_S = 3600  # gradio's own age-based sweep of its cache
CSS = "#stats { min-height: 1.5em; } footer { display: none !important; }"


def header(engine: AppEngine) -> str:
    main, lim = engine.info(MAIN), engine.limits
    alpha = f" · PixArt-α: `{engine.info(ALPHA).name}`" if engine.has(ALPHA) else ""
    return (f"## pixsigma · PixArt-Σ\nPixArt-Σ: `{main.name}` ({main.resolution} px base, {main.depth} layers){alpha} "
            f"· device `{', '.join(engine.devices)}` · per request: ≤ {lim.max_steps} steps, "
            f"≤ {lim.max_images} images, ≤ {lim.max_resolution} px base resolution")


def build_demo(engine: AppEngine, *, outputs: str | Path | None = None, runs: RunManager | None = None,
               queue_size: int = QUEUE_SIZE, keep: Retention | None = None) -> gr.Blocks:
    """The app's Blocks with its queue set: one request at a time per device, at most ``queue_size`` waiting.
    ``outputs``: where PNGs are written (default: a temp folder removed at exit); ``runs``: enables the Train tab;
    ``keep``: how long and how much of the PNGs and gradio's cache are kept (swept in the background from now
    on: ``demo.sweeper``)."""
    keep = keep or Retention()
    outputs = Path(outputs) if outputs else temp_outputs_folder()
    gpu = gpu_decorator(engine)  # spaces.GPU with a per-request duration on a Space (zerogpu.py)
    with gr.Blocks(title="pixsigma · PixArt-Σ", delete_cache=(CACHE_SWEEP_EVERY_S, int(keep.max_age_s))) as demo:
        gr.Markdown(header(engine))
        with gr.Tab("Generate"):
            build_generate_tab(engine, outputs, gpu, keep)
        with gr.Tab("Compare"):
            build_compare_tab(engine, gpu)
        if runs is not None:
            with gr.Tab("Train"):
                build_train_tab(demo, runs)
        build_runs_api(engine)  # /runs: the finished training runs a request's `model` may name
    demo.queue(max_size=queue_size, default_concurrency_limit=engine.concurrency)
    explain_queue_full(demo, engine.concurrency)
    tasks = [lambda: prune(outputs, keep), lambda: prune_gradio_cache(demo, keep)]
    if runs is not None and runs.uploads is not None:
        tasks.append(lambda: runs.uploads.prune(keep))  # RUNS/uploads: unused unpacked .zip files
    demo.sweeper = Sweeper(tasks).start()
    return demo


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The app's flags; ``prog``: the command shown in ``--help`` (default: the script's name)."""
    env = os.environ.get
    p = argparse.ArgumentParser(prog=prog, description="pixsigma web app",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=env("PIXSIGMA_MODEL", "demo"), help="PixArt-Σ: demo, a folder or a hub id")
    p.add_argument("--alpha-model", default=env("PIXSIGMA_ALPHA_MODEL", "demo-alpha"),
                   help="PixArt-α for the Compare tab; 'none' to leave it out")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--devices", default=None,
                   help="several devices, e.g. cuda:0,cuda:1: the models loaded on each, requests spread over them")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                   help="default: bf16 on CUDA, fp32 elsewhere (as the CLI)")
    p.add_argument("--offload-t5", action="store_true", help="keep T5 on the CPU between prompts")
    p.add_argument("--t5", default=None, choices=T5_PRECISIONS, help="T5's precision (default: --dtype); int8: "
                   "8-bit weights, half of bf16's memory (docs/t5.md)")
    p.add_argument("--controlnet", default=None, help="ControlNet for the main model (default: the one its folder "
                   "ships, if any): a pixsigma ControlNet folder, an official .pth/.safetensors, a diffusers folder")
    p.add_argument("--host", default=None, help="interface to serve on (0.0.0.0 for all); default 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: GRADIO_SERVER_PORT or the first free from 7860")
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    p.add_argument("--queue-size", type=int, default=QUEUE_SIZE, help="requests allowed to wait")
    p.add_argument("--outputs", default=None, help="folder for generated PNGs (default: a temp folder)")
    p.add_argument("--keep-outputs-hours", type=float, default=DEFAULT_KEEP_HOURS,
                   help="PNGs and gradio's cached copies older than this are removed")
    p.add_argument("--keep-outputs-mb", type=float, default=DEFAULT_KEEP_MB,
                   help="beyond this total (each of the two folders) the oldest files are removed")
    p.add_argument("--enable-training", action="store_true",
                   default=env("PIXSIGMA_ENABLE_TRAINING", "") in ("1", "true", "yes"), help="show the Train tab")
    p.add_argument("--runs-dir", default="runs", help="training runs live here")
    p.add_argument("--train-configs", nargs="*", default=[str(REPO / "configs")],
                   help="folders of training configs (YAML; each names its stage)")
    add_upload_args(p)  # uploads' budgets and --data-root (pixsigma_ui/uploads.py)
    return p.parse_args(argv)


def load_engine(opts: argparse.Namespace, alpha: str | None) -> AppEngine:
    """One engine on ``--device``, or a pool of one per ``--devices`` entry."""
    load = dict(dtype=opts.dtype, offload_t5=opts.offload_t5, t5_precision=opts.t5)
    if opts.devices:
        devices = [d.strip() for d in opts.devices.split(",") if d.strip()]
        return EnginePool.load_on(devices, opts.model, alpha, **load)
    return AppEngine.load(opts.model, alpha, device=opts.device, **load)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Parse the flags (``argv``, default ``sys.argv[1:]``), load the models and serve until stopped."""
    opts = parse_args(argv, prog)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    alpha = None if opts.alpha_model.lower() in ("", "none") else opts.alpha_model
    try:
        keep = Retention(opts.keep_outputs_hours, opts.keep_outputs_mb)
        limits = limits_from_args(opts)
        engine = load_engine(opts, alpha)
    except ValueError as e:
        sys.exit(f"error: {e}")
    except FileNotFoundError as e:
        if alpha != "demo-alpha" or "demo-alpha" not in str(e):
            sys.exit(f"error: {e}")
        print(f"warning: {e}; serving without PixArt-α", file=sys.stderr)  # only the default α may be absent
        engine = load_engine(opts, None)
    if opts.controlnet:
        try:
            attach_controlnet(engine, opts.controlnet)  # control_panel.py
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
    attach_runs(engine, Path(opts.runs_dir).resolve())  # finished runs as models of Generate and Compare
    runs = None
    if opts.enable_training:
        try:  # the loaded model's folder: what "finetune" starts from when no config says otherwise
            model_dir = str(resolve_model(opts.model))
        except FileNotFoundError:
            model_dir = None
        recipes = find_recipes([Path(c) for c in opts.train_configs], model_dir, opts.model)
        runs = RunManager(Path(opts.runs_dir).resolve(), recipes, uploads=Uploads(Path(opts.runs_dir), limits))
    inputs.upload_pixels = limits.image_pixels  # Generate's input images
    exit_on_sigterm()  # kill -TERM runs the atexit clean-up (the temp outputs folder)
    demo = build_demo(engine, outputs=opts.outputs, runs=runs, queue_size=opts.queue_size, keep=keep)
    demo.launch(server_name=opts.host, server_port=opts.port, share=opts.share, css=CSS,
                max_file_size=int(limits.upload_mb * 2**20))  # gradio refuses a bigger upload (HTTP 413)
