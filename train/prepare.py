"""Everything a stage needs, resolved before it launches: a run never dies at step 0 for a missing input.

``check_stage`` (fast, no files written) reads the config and decides where each input comes from;
``prepare_stage`` then makes what is missing, reporting progress:

- **data**: the config's ``data.source``; a source a registered world makes (``train.worlds``: the shapes
  world's ``data/shapes``) is generated once into ``RUNS/data/`` and reused; a user's folder, JSONL or zip is
  checked image by image (``train.userdata``) and listed clean; a path that does not exist is refused.
- **features**: T5 features and VAE latents (``train.extract``) into ``RUNS/cache/<name>-<digest>``, the digest
  of everything the cache depends on, so two stages needing the same features share one cache and a stage
  never reads a cache made for another resolution or VAE. Progress: images/s and ETA.
- **starting weights**: ``stage.load_from`` as given when it exists; a ``runs/NAME`` the recipes name is looked
  up as ``RUNS/NAME`` (the previous stage's run) and, when that run does not exist, replaced by the shipped
  demo α (for ``vae_adapt``, ``res_up``) or Σ (``kv_compress``, ``finetune``); any other missing path is refused.
- **text encoder and VAE**: ``data.text_encoder`` / ``data.vae`` relative to the working folder or the checkout.

What cannot be made (an unreadable config, a user's path that does not exist, data with no captions) raises a
ValueError naming it, before anything is written. ``python -m train.prepare CONFIG [--runs-dir DIR] [--set k=v]``
prepares and then trains, which is how the app launches a stage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pixsigma.layout import DATA_ROOT

from .config import TrainConfig, build_config, read_config_file
from .runfiles import CHECKPOINTS, FINAL, PREPARE
from .runlock import acquire, exit_if_busy, is_main_rank

REPO = DATA_ROOT  # the checkout (or a wheel's copy of its assets and configs): configs name assets relative to it
RUNS_PREFIX = "runs"  # the recipes name earlier stages' runs as runs/NAME
SHIPPED_FOR_STAGE = {"vae_adapt": "alpha", "res_up": "alpha", "kv_compress": "sigma", "finetune": "sigma"}
WORLD_IMAGES = 2000  # world images made for a stage whose config sets no data.max_images
PHASES = ("data", "features", "weights")


@dataclass(frozen=True)
class Progress:
    """One progress report: ``done`` of ``total`` items of ``phase`` at ``rate`` items/s, ``eta_s`` to go."""

    phase: str
    done: int
    total: int
    rate: float | None
    eta_s: float | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "done": self.done, "total": self.total, "rate": self.rate, "eta_s": self.eta_s,
                "message": self.message}


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class PreparedStage:
    """A stage with every input resolved. ``overrides`` + ``config_path`` rebuild ``config`` exactly
    (``python -m train CONFIG --set …``); ``start`` says where its weights come from."""

    config: TrainConfig
    config_path: Path
    overrides: tuple[str, ...]
    run_dir: Path
    start: str  # "scratch", "previous run", "given", "shipped alpha" or "shipped sigma"
    load_from: Path | None
    data: Path | None  # the source the run reads (a world's generated folder, a user's cleaned list)
    cache: Path | None  # the feature cache (None: features computed while training)
    to_make: tuple[str, ...]  # what prepare_stage still has to make: of PHASES
    finished: bool  # the run folder already holds final/
    resume: bool  # the run folder holds a checkpoint to continue from
    data_report: dict[str, Any] = field(default_factory=dict)


class _Meter:
    """Rate and ETA of a phase from the time its first item was reported."""

    def __init__(self, phase: str, progress: ProgressFn | None, run_dir: Path | None):
        self.phase, self.progress, self.run_dir, self.t0 = phase, progress, run_dir, time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int, message: str = "") -> None:
        now = time.monotonic()
        if done < total and now - self.last < 0.5:
            return  # a report at most twice a second, and always the last one
        self.last = now
        elapsed = now - self.t0
        rate = done / elapsed if done and elapsed > 0 else None
        eta = (total - done) / rate if rate else None
        p = Progress(self.phase, done, total, round(rate, 3) if rate else None, round(eta, 1) if eta else None,
                     message or f"{self.phase}: {done}/{total}")
        if self.run_dir is not None:
            from pixsigma.io import atomic_write_json

            atomic_write_json({**p.as_dict(), "updated": time.time()}, self.run_dir / PREPARE)
        if self.progress is not None:
            self.progress(p)


def _existing(path: str | Path) -> Path | None:
    """``path`` (made absolute) as given, else relative to the checkout; None when neither exists."""
    p = Path(path).expanduser()
    if p.exists():
        return p.absolute()  # the run may be launched from another working folder
    if not p.is_absolute() and (REPO / p).exists():
        return REPO / p
    return None


def _runs_ref(path: str | Path) -> str | None:
    """``NAME`` of a recipe's ``runs/NAME`` reference to an earlier stage's run, else None."""
    parts = Path(path).parts
    return parts[1] if len(parts) == 2 and parts[0] == RUNS_PREFIX else None


def _has_weights(run: Path) -> bool:
    from .checkpoint import latest_checkpoint

    return (run / FINAL).is_dir() or latest_checkpoint(run) is not None


def shipped_start(role: str, runs_dir: Path, world: str | None = None) -> Path:
    """Where the shipped ``role`` (``alpha``/``sigma``) model is as a stage's starting weights: its transformer
    folder when that is in the pixsigma layout, else a pixsigma-layout copy under ``RUNS/shipped/`` (a diffusers
    folder cannot say its prediction type or token budget: they are taken from its pipeline folder)."""
    from .worlds import DEFAULT_WORLD, load_world

    folder = load_world(world or DEFAULT_WORLD).pipelines()[role]
    if (folder / "transformer" / "pixsigma.json").is_file():
        return folder / "transformer"
    return runs_dir / "shipped" / role


def _shipped_model(role: str, world: str | None):
    """The shipped ``role`` transformer with the prediction type and token budget of its pipeline folder."""
    from pixsigma.model.dit import PixArtDiT
    from pixsigma.weights import load_dit

    from .worlds import DEFAULT_WORLD, load_world

    folder = load_world(world or DEFAULT_WORLD).pipelines()[role]
    net = load_dit(folder / "transformer")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    tok = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    config = replace(net.config, prediction_type=sched.get("prediction_type", net.config.prediction_type),
                     max_tokens=int(tok.get("model_max_length", net.config.max_tokens)))
    out = PixArtDiT(config)
    out.load_state_dict(net.state_dict())
    return out, folder


def _write_shipped(role: str, dest: Path, world: str | None) -> None:
    from pixsigma.weights import PIXSIGMA_CONFIG, save_dit

    if not (dest / PIXSIGMA_CONFIG).is_file():
        net, folder = _shipped_model(role, world)
        save_dit(net, dest, extra={"source": str(folder)})


def _start_config(start: str, load_from: Path | None, world: str | None):
    """The DiTConfig of the starting weights (of the shipped model to be converted, when it is not yet)."""
    from pixsigma.config import DiTConfig
    from pixsigma.weights import PIXSIGMA_CONFIG, read_checkpoint

    from .checkpoint import resolve_load_from

    if load_from is None:
        return None
    if start.startswith("shipped") and not (load_from / PIXSIGMA_CONFIG).is_file():
        return _shipped_model(start.split()[-1], world)[0].config
    src = resolve_load_from(load_from)
    meta = src / PIXSIGMA_CONFIG
    return DiTConfig.from_dict(json.loads(meta.read_text())["dit"]) if meta.is_file() else read_checkpoint(src)[0]


def _read(stage_or_config: Any, overrides: list[str]) -> tuple[Path, dict[str, Any], TrainConfig]:
    path = Path(getattr(stage_or_config, "config", stage_or_config))
    if not path.is_absolute() and not path.exists() and (REPO / "configs" / path).is_file():
        path = REPO / "configs" / path  # a plan's config is named by its file in configs/
    try:
        raw = read_config_file(path)
    except FileNotFoundError:
        raise ValueError(f"config {path} does not exist") from None
    except Exception as e:  # a YAML syntax error, a .py that fails
        raise ValueError(f"config {path} cannot be read: {type(e).__name__}: {e}") from None
    return path, raw, build_config(raw, overrides)


def _digest(*parts: Any) -> str:
    return hashlib.sha1(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:10]


def check_stage(stage_or_config: Any, runs_dir: str | Path, overrides: list[str] | tuple[str, ...] = (),
                world: str | None = None) -> PreparedStage:
    """Resolve a stage's inputs without making any (see the module docstring); ValueError for what cannot be made.

    ``stage_or_config``: a config file (or anything with a ``config`` attribute naming one, as a plan step does;
    a bare file name is looked up in ``configs/``). ``overrides``: ``--set`` pairs applied on top."""
    from .checkpoint import latest_checkpoint
    from .worlds import DEFAULT_WORLD, load_world

    runs_dir = Path(runs_dir)
    sets = list(overrides)
    path, raw, cfg = _read(stage_or_config, sets)
    world_name = world or DEFAULT_WORLD

    # where the run goes: a recipe's runs/NAME lands in the runs folder
    out = Path(cfg.output_dir)
    if not out.is_absolute() and (out.parts[:1] == (RUNS_PREFIX,) or out == Path("runs") / cfg.name):
        out = runs_dir / out.name
    sets.append(f"output_dir={out}")

    # text encoder and VAE
    encoders: dict[str, Path] = {}
    for key in ("text_encoder", "vae"):
        value = getattr(cfg.data, key)
        if value is None:
            continue
        found = _existing(value)
        if found is None:
            raise ValueError(f"data.{key} {value} does not exist: give a pipeline folder holding "
                             f"{'tokenizer/ and text_encoder/' if key == 'text_encoder' else 'vae/'}")
        sets.append(f"data.{key}={found}")
        encoders[key] = found.resolve()

    # starting weights
    start, load_from = "scratch", None
    if cfg.stage.name != "from_scratch":
        given = cfg.stage.load_from
        ref = _runs_ref(given)
        if ref is not None and _has_weights(runs_dir / ref):
            start, load_from = "previous run", runs_dir / ref
        elif ref is None and _existing(given) is not None:
            start, load_from = "given", _existing(given)
        elif ref is None and (runs_dir / Path(given).name).is_dir() and _has_weights(runs_dir / Path(given).name):
            start, load_from = "previous run", runs_dir / Path(given).name
        elif ref is not None:
            role = SHIPPED_FOR_STAGE[cfg.stage.name]
            try:
                start, load_from = f"shipped {role}", shipped_start(role, runs_dir, world_name)
            except ValueError as e:
                raise ValueError(f"stage.load_from {given}: no such run in {runs_dir}, and no shipped model to "
                                 f"start from instead ({e})") from None
        else:
            raise ValueError(f"stage.load_from {given} does not exist: give a run folder, an exported model "
                             "folder or a weights file")
        sets.append(f"stage.load_from={load_from}")

    # data
    to_make: list[str] = []
    data_report: dict[str, Any] = {}
    source = _existing(cfg.data.source) if cfg.data.source else None
    n = cfg.data.max_images
    data_path: Path | None = source
    made_by_world = False
    if cfg.data.source and source is None:
        w = load_world(world_name) if world_name in _worlds() else None
        if w is None or not w.can_make(cfg.data.source):
            raise ValueError(f"data.source {cfg.data.source} does not exist: give an image folder with .txt "
                             "captions, a .jsonl or a .zip")
        n = n or WORLD_IMAGES
        data_path = runs_dir / "data" / Path(cfg.data.source).name  # one folder, grown when a stage needs more
        made_by_world = True
        if world_images(data_path) < n:
            to_make.append("data")
        sets += [f"data.source={data_path}", f"data.max_images={n}"]
    elif source is not None:
        from .userdata import read_user_data

        user = read_user_data(source, runs_dir / "userdata")  # refuses no captions, counts unreadable images
        data_report = user.as_dict()
        data_path = runs_dir / "userdata" / f"{user.source.name}-{_digest(user.source.resolve())}.jsonl"
        sets.append(f"data.source={data_path}")
        data_report["list"] = str(data_path)

    # features
    cache: Path | None = None
    # features are always extracted once (with progress) when the encoders are known: faster than per step
    if cfg.data.cache or (data_path is not None and len(encoders) == 2):
        given_cache = _existing(cfg.data.cache) if cfg.data.cache else None
        if given_cache is not None and (given_cache / "index.json").is_file() and not made_by_world:
            cache = given_cache
        else:
            from .stages import model_config

            dit = model_config(cfg, _start_config(start, load_from, world_name))
            digest = _digest(data_path, n, dit.resolution, cfg.data.max_tokens or dit.max_tokens,
                             encoders.get("text_encoder"), encoders.get("vae"), list(cfg.sample_prompts),
                             data_report.get("images"), data_report.get("skipped_images"))
            name = Path(cfg.data.cache).name if cfg.data.cache else Path(str(data_path)).stem
            cache = runs_dir / "cache" / f"{name}-{digest}"
        sets.append(f"data.cache={cache}")
        if not (cache / "index.json").is_file():
            to_make.append("features")
    if start.startswith("shipped") and load_from is not None and not (load_from / "pixsigma.json").is_file():
        to_make.append("weights")

    final_cfg = build_config(raw, sets)
    finished = (out / FINAL).is_dir()
    resume = (out / CHECKPOINTS).is_dir() and latest_checkpoint(out) is not None
    return PreparedStage(final_cfg, path, tuple(sets), out, start, load_from, data_path, cache,
                         tuple(p for p in PHASES if p in to_make), finished, resume, data_report)


def world_images(folder: Path) -> int:
    """Records in a world-made data folder (0 when it is not complete)."""
    meta = folder / "metadata.jsonl"
    return sum(1 for line in meta.read_text().splitlines() if line.strip()) if meta.is_file() else 0


def _worlds() -> dict[str, str]:
    from .worlds import installed_worlds

    return installed_worlds()


def prepare_stage(stage_or_config: Any, runs_dir: str | Path, overrides: list[str] | tuple[str, ...] = (),
                  progress: ProgressFn | None = None, world: str | None = None) -> PreparedStage:
    """``check_stage``, then make what it found missing: world images, the shipped starting weights, user-data
    lists and the feature cache. ``progress`` gets a ``Progress`` per report (also written to ``RUN/prepare.json``).
    Idempotent: what exists is reused."""
    st = check_stage(stage_or_config, runs_dir, overrides, world)
    with acquire(st.run_dir, doing="preparing"):  # refused at once while another trainer holds the run folder
        return make_inputs(st, runs_dir, progress, world)


def make_inputs(st: PreparedStage, runs_dir: str | Path, progress: ProgressFn | None = None,
                world: str | None = None) -> PreparedStage:
    """Make what ``check_stage`` found missing (the caller holds the run folder's lock, ``train.runlock``)."""
    from .worlds import DEFAULT_WORLD, load_world

    cfg, runs_dir = st.config, Path(runs_dir)
    st.run_dir.mkdir(parents=True, exist_ok=True)
    if "data" in st.to_make:
        meter = _Meter("data", progress, st.run_dir)
        # the folder is named after the source in effect (a --set data.source included), not the config file's
        load_world(world or DEFAULT_WORLD).make_data(st.data, cfg.data.max_images, st.data.name, progress=meter)
    if st.data_report.get("list"):
        from .userdata import read_user_data, write_clean_jsonl

        write_clean_jsonl(read_user_data(st.data_report["source"], runs_dir / "userdata"), st.data)
    if "weights" in st.to_make:
        _Meter("weights", progress, st.run_dir)(0, 1, f"converting the shipped {st.start.split()[-1]} model")
        _write_shipped(st.start.split()[-1], st.load_from, world)
        _Meter("weights", progress, st.run_dir)(1, 1, "starting weights ready")
    if "features" in st.to_make:
        from .extract import extract

        meter = _Meter("features", progress, st.run_dir)
        extract(cfg, overwrite=True, progress=lambda done, total: meter(done, total, f"features: {done}/{total}"))
    (st.run_dir / PREPARE).unlink(missing_ok=True)
    return replace(st, to_make=())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.prepare",
                                 description="Make a stage's inputs (data, features, starting weights), then train it.")
    ap.add_argument("config", help="a training config (.yaml, or .py defining `config`)")
    ap.add_argument("--runs-dir", default="runs", help="where runs, generated data and caches go")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    ap.add_argument("--check", action="store_true", help="only check: print what would be made")
    ap.add_argument("--no-train", action="store_true", help="make the inputs and stop")
    args = ap.parse_args(argv)

    def show(p: Progress) -> None:
        rate = f" {p.rate:.1f}/s" if p.rate else ""
        eta = f" ETA {p.eta_s:.0f} s" if p.eta_s else ""
        print(f"[prepare] {p.message}{rate}{eta}", flush=True)

    if args.check:
        st = check_stage(args.config, args.runs_dir, args.overrides)
        print(json.dumps({"run_dir": str(st.run_dir), "start": st.start, "load_from": str(st.load_from),
                          "data": str(st.data), "cache": str(st.cache), "to_make": list(st.to_make),
                          "finished": st.finished, "resume": st.resume, "data_report": st.data_report}, indent=1))
        return
    st = check_stage(args.config, args.runs_dir, args.overrides)
    if is_main_rank():  # the run folder is this process's until it exits; a second trainer there exits at once
        exit_if_busy(st.run_dir, doing="training")
    st = make_inputs(st, args.runs_dir, progress=show)
    print(f"[prepare] {st.run_dir}: starts from {st.start} ({st.load_from}); data {st.data}; features {st.cache}")
    if args.no_train or st.finished:
        return
    from .loop import train

    result = train(st.config, resume=args.resume or st.resume)
    print(f"[train] {result['state']} at step {result['step']}: {result['run_dir']}")


if __name__ == "__main__":
    main()
