"""The tests' one set of builders: tiny random models saved in the real on-disk formats (no network, seconds on a
CPU), tiny image folders and run configs for the trainer, a pipeline stand-in that runs out of memory, and the app
served as a subprocess for the browser tests.

Test modules import from here (``from fixtures import …``) and never from one another; pytest fixtures built on
these live in ``conftest.py``.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from pixsigma.config import DiTConfig, KVCompress
from pixsigma.model.dit import PixArtDiT
from pixsigma.sampling import PIXART_BETAS
from pixsigma.space import build_wheel
from pixsigma.weights import save_diffusers_transformer, save_dit

# The words the tests' prompts and make_images' captions use; the app tests rely on others (a style's "plain mint
# background", "zebra") being unknown.
WORDS = ("a red blue green yellow star circle square ring triangle above below left right of the on small large "
         "big cat dog photo an in with and white middle picture tall wide shape").split()
TINY_DIT = DiTConfig(depth=2, hidden_size=32, num_heads=2, caption_channels=16, max_tokens=300, sample_size=32,
                     pe_interpolation=0.5)
CONTROL_DIT = DiTConfig(depth=4, hidden_size=32, num_heads=2, caption_channels=16, max_tokens=16, sample_size=8,
                        pe_interpolation=1.0)  # four blocks: room for a ControlNet's copies
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
# (height, width): three aspect-ratio buckets at 64 px
SIZES = [(48, 48), (48, 48), (48, 48), (48, 48), (64, 32), (64, 32), (32, 64), (32, 64)]


def make_tokenizer(folder: Path | None = None, words: tuple[str, ...] | list[str] = WORDS):
    """The tests' word-level T5-style tokenizer (``pixsigma.text.word_level_tokenizer`` over ``words``)."""
    from pixsigma.text import word_level_tokenizer

    tok = word_level_tokenizer(words)
    if folder is not None:
        tok.save_pretrained(folder)
    return tok


def make_t5(folder: Path, vocab: int, d_model: int = 16, seed: int = 1):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    t5.save_pretrained(folder, safe_serialization=True)
    return t5


def make_vae(folder: Path, seed: int = 2, scaling: float | None = None):
    """A 4-channel, 8x-downsampling VAE; ``scaling`` sets its scaling_factor (default: diffusers')."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=64,
                        **({} if scaling is None else {"scaling_factor": scaling}))
    vae.save_pretrained(folder, safe_serialization=True)
    return vae


def make_encoders(folder: Path, seed: int = 0, scaling: float = 0.5) -> Path:
    """A diffusers-style folder with ``tokenizer/``, ``text_encoder/`` (d_model 16) and ``vae/`` (the trainer's)."""
    folder = Path(folder)
    tok = make_tokenizer(folder / "tokenizer")
    make_t5(folder / "text_encoder", len(tok), seed=seed)
    make_vae(folder / "vae", seed=seed + 1, scaling=scaling)
    return folder


def random_dit(config: DiTConfig = TINY_DIT, seed: int = 0, scale: float = 0.05) -> PixArtDiT:
    """A DiT with every weight random (the default init zeroes outputs, which would hide bugs)."""
    torch.manual_seed(seed)
    model = PixArtDiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)
    return model.eval()


def make_tiny_pipeline(folder: str | Path, kv: KVCompress | None = None, layout: str = "diffusers",
                       config: DiTConfig = TINY_DIT) -> Path:
    """A PixArt-Σ pipeline folder with random weights: diffusers layout, or pixsigma layout for a KV model."""
    from diffusers import DPMSolverMultistepScheduler

    folder = Path(folder)
    tok = make_tokenizer(folder / "tokenizer")
    make_t5(folder / "text_encoder", len(tok), config.caption_channels)
    make_vae(folder / "vae")
    DPMSolverMultistepScheduler(**{**PIXART_BETAS, "prediction_type": config.prediction_type}).save_pretrained(
        folder / "scheduler")
    dit = random_dit(config.with_kv(kv) if kv else config)
    if layout == "diffusers":
        save_diffusers_transformer(dit, folder / "transformer")
    else:
        save_dit(dit, folder / "transformer")
    index = {"_class_name": "PixArtSigmaPipeline", "_diffusers_version": "0.42.1",
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "text_encoder": ["transformers", "T5EncoderModel"],
             "vae": ["diffusers", "AutoencoderKL"], "transformer": ["diffusers", "PixArtTransformer2DModel"],
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def make_images(folder: Path, sizes: list[tuple[int, int]] = SIZES, long: bool = True) -> Path:
    """Coloured squares on white with ``x.txt`` (short) and ``x.long.txt`` (long) captions."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i, (h, w) in enumerate(sizes):
        colour = names[i % len(names)]
        im = Image.new("RGB", (w, h), "white")
        s = min(h, w) // 2
        im.paste(COLOURS[colour], (w // 4, h // 4, w // 4 + s, h // 4 + s))
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {colour} square")
        if long:
            (folder / f"img{i}.long.txt").write_text(f"a small {colour} square in the middle of a white "
                                                      f"picture with a {'tall' if h > w else 'wide'} shape")
    return folder


def write_config(path: Path, **cfg) -> Path:
    """A tiny training run's YAML: the base below with ``cfg`` merged in (dict values merge one level deep)."""
    import yaml

    base = {"model": "tiny", "steps": 2, "batch_size": 2, "mixed_precision": "no", "save_every": 100,
            "log_every": 1, "seed": 0, "optim": {"warmup_steps": 0, "lr": 1e-3}}
    for key, value in cfg.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    base.setdefault("data", {})["num_workers"] = base.get("data", {}).get("num_workers", 0)
    path.write_text(yaml.safe_dump(base))
    return path


class FlakyPipe:
    """The real pipeline behind a device that runs out of memory ``fail`` times, and counts callbacks."""

    def __init__(self, pipe, fail: int = 0, error: Exception | None = None):
        self.pipe, self.fail, self.runs = pipe, fail, []  # runs: the steps each generate call reached
        self.error = error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.transformer, self.device, self.sampling = pipe.transformer, pipe.device, pipe.sampling

    def generate(self, request, callback=None):
        if self.fail:
            self.fail -= 1
            raise self.error

        self.runs.append([])

        def counting(step, total, latents):
            self.runs[-1].append(step)
            if callback:
                callback(step, total, latents)

        return self.pipe.generate(request, counting)

    def unknown_words(self, prompt):
        return self.pipe.unknown_words(prompt)

    def resolve_sampling(self, request):
        return self.pipe.resolve_sampling(request)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")  # Debian's: playwright cannot download its own here
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts"  # the browser tests' screenshots
NEEDS_CHROMIUM = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


@contextmanager
def served_app(args: list[str], tmp: Path, env: dict[str, str] | None = None,
               start_timeout_s: float = 120, command: list[str] | None = None) -> Iterator[str]:
    """``python app.py ARGS`` (or ``command ARGS``, run in ``tmp``) on a free port as a subprocess (its output in
    ``tmp/app.log``); yields its URL once it answers, stops it on exit."""
    port = free_port()
    log_path = tmp / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*(command or [sys.executable, "app.py"]), *args, "--port", str(port)],
                                cwd=tmp if command else REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"app did not start:\n{log_path.read_text()[-3000:]}") from None
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(20)


def stop_pids(records: Iterator[Path]) -> None:
    """SIGTERM the process each JSON record's ``pid`` names (a trainer a test started), if it still runs."""
    for record in records:
        pid = json.loads(record.read_text()).get("pid")
        try:
            os.kill(pid, 15) if pid else None
        except ProcessLookupError:
            pass


@contextmanager
def app_client(engine: Any, outputs: Path) -> Iterator[Any]:
    """The app's Blocks over ``engine`` launched in this process on a free port; yields a gradio_client on it."""
    from gradio_client import Client

    from pixsigma_ui.server import build_demo

    demo = build_demo(engine, outputs=outputs)
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


# -- one non-editable wheel per session, and a throw-away environment it is installed into -------------------------
# The environment reuses the shared interpreter's installed dependencies through a filtered view (symlinks), so
# nothing is downloaded: the clone's editable install (its finder and dist-info) is left out so the wheel's pixsigma
# is the only one, and so are the [train] extra's packages, so the engine and the app are seen to work without them.

WHEEL_ROOT = Path(__file__).resolve().parent.parent
TRAIN_ONLY = ("came_pytorch", "came-pytorch", "matplotlib")  # pyproject's [train] extra (accelerate comes with peft)
HIDDEN = ("pixsigma", "__editable__", "_pixsigma", *TRAIN_ONLY)


def offline_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the clone must not be on the path
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


@functools.cache
def session_dir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="pixsigma-wheel-"))
    atexit.register(shutil.rmtree, folder, True)  # the wheel and its venv: ~70 MB per session
    return folder


@functools.cache
def wheel() -> Path:
    """The wheel ``pip wheel`` builds from this checkout (built once per session)."""
    return build_wheel(WHEEL_ROOT, session_dir() / "dist")


def _dependency_view(folder: Path) -> Path:
    site = Path(sysconfig.get_path("purelib"))
    folder.mkdir(parents=True)
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(HIDDEN) or name.endswith(".pth"):
            continue
        (folder / entry.name).symlink_to(entry)
    return folder


@functools.cache
def wheel_env() -> Path:
    """A venv (no pip of its own) holding the wheel, installed by pip --python; deps through a .pth line."""
    env = session_dir() / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "dependencies.pth").write_text(f"{_dependency_view(session_dir() / 'deps')}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel())], check=True, capture_output=True, text=True)
    return env


# -- a fake trainer for the Train tab's tests: the real trainer's command line and run files, in milliseconds --------
FAKE_TRAINER = '''
import argparse, json, os, sys, time
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("config")
ap.add_argument("--resume", action="store_true")
ap.add_argument("--runs-dir")
ap.add_argument("--set", dest="overrides", action="append", default=[])
args = ap.parse_args()
o = dict(x.split("=", 1) for x in args.overrides)
run, total = Path(o["output_dir"]), int(o["steps"])
delay = float(os.environ.get("FAKE_TRAIN_DELAY", "0.01"))
print("[train] argv", sys.argv[1:], flush=True)
ckpt = run / "ckpt.json"
start = json.loads(ckpt.read_text())["step"] if args.resume and ckpt.exists() else 0


def status(**kw):
    tmp = run / ".status.tmp"
    tmp.write_text(json.dumps({"total_steps": total, "samples": ["samples/latest.png"], "error": None,
                               "pid": os.getpid(), "updated": time.time(), **kw}))
    os.replace(tmp, run / "status.json")


(run / "samples").mkdir(exist_ok=True)
status(state="running", step=start, last_loss=None)
for step in range(start + 1, total + 1):
    time.sleep(delay)
    loss = 1.0 / step
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "loss": loss, "lr": float(o["optim.lr"])}) + "\\n")
    status(state="running", step=step, last_loss=loss)
    if (run / "STOP").exists():
        ckpt.write_text(json.dumps({"step": step}))
        (run / "STOP").unlink()
        status(state="stopped", step=step, last_loss=loss)
        sys.exit(0)
status(state="finished", step=total, last_loss=loss)
'''


def wait_for(manager: Any, name: str, cond, timeout: float = 30.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = manager.state(name)
        if cond(s):
            return s
        time.sleep(0.05)
    raise AssertionError(f"run {name} never reached the condition; last state {manager.state(name)}")


def fake_manager(tmp_path: Path, monkeypatch: Any) -> Any:
    """A Train tab RunManager over ``tmp_path / "runs"`` whose trainer is ``FAKE_TRAINER`` (a ``python -m`` module on
    the children's PYTHONPATH) and whose recipes are one empty config per stage."""
    from pixsigma_ui.train_tab import STAGES, RunManager, find_recipes

    pkg = tmp_path / "modules" / "fake_trainer"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(textwrap.dedent(FAKE_TRAINER))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "modules"))
    configs = tmp_path / "configs"
    configs.mkdir()
    for stage in STAGES:
        (configs / f"shapes_{stage}.yaml").write_text(f"stage: {stage}\n")
    return RunManager(tmp_path / "runs", find_recipes([configs]), module="fake_trainer", precheck=False)
