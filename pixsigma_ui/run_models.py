"""Finished training runs as models of Generate and Compare: found under the runs folder, loaded on demand per
request, the last few kept loaded (the least recently used dropped first).

A model choice is ``main`` (the shipped Σ), ``alpha`` (the shipped α) or ``run:NAME`` (``NAME``: the run
folder's path under the runs folder, e.g. ``run:vae_adapt-20260101-120000``). A run is finished when its
``final/`` holds a pixsigma DiT; that folder has only the DiT, so the tokenizer, text encoder, VAE and
scheduler come from the pipeline folder the run trained with (its ``config.yaml``'s ``data.vae``, else
``data.text_encoder``), else from the app's main model. Nothing here swaps the model under another request:
each request names its model and the engine looks it up for that request alone.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pixsigma.layout import CHECKOUT, DATA_ROOT
from pixsigma.weights import PIXSIGMA_CONFIG

if CHECKOUT is not None:  # a clone imports train/ by its name; a wheel has it as pixsigma.train (pixsigma.layout)
    from train.runfiles import CONFIG, FINAL
else:
    from pixsigma.train.runfiles import CONFIG, FINAL

RUN_PREFIX = "run:"
KEEP_LOADED = 2  # run pipelines held besides the shipped ones (each is a whole pipeline in memory)
SEARCH_DEPTH = 2  # runs/NAME and runs/CHAIN/NAME (a chain keeps its stages in a folder of their own)
REPO = DATA_ROOT  # where the trainer resolves a config's relative paths
MODEL_INDEX = "model_index.json"


@dataclass(frozen=True)
class FinishedRun:
    """A run whose ``final/`` can be loaded; ``key`` is what the API's ``model`` parameter takes."""

    name: str  # the run folder relative to the runs folder, POSIX separators
    folder: Path
    stage: str
    step: int | None
    finished: float  # final/'s modification time (seconds since the epoch)

    @property
    def key(self) -> str:
        return RUN_PREFIX + self.name

    @property
    def label(self) -> str:
        step = f", step {self.step}" if self.step is not None else ""
        return f"your run: {self.name} ({self.stage}{step})"

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.key, "name": self.name, "stage": self.stage, "step": self.step,
                "folder": str(self.folder), "finished": self.finished}


def _meta(final: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((final / PIXSIGMA_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("dit"), dict) else None


def read_finished(runs_dir: Path, folder: Path) -> FinishedRun | None:
    """The run in ``folder`` if its ``final/`` is a complete pixsigma DiT (its ``pixsigma.json`` is written last)."""
    final = folder / FINAL
    meta = _meta(final)
    if meta is None:
        return None
    step = meta.get("step")
    return FinishedRun(name=folder.relative_to(runs_dir).as_posix(), folder=folder,
                       stage=str(meta.get("stage") or "run"), step=step if isinstance(step, int) else None,
                       finished=(final / PIXSIGMA_CONFIG).stat().st_mtime)


def finished_runs(runs_dir: str | Path) -> list[FinishedRun]:
    """Every finished run under ``runs_dir`` (up to ``SEARCH_DEPTH`` folders deep), newest first."""
    runs_dir = Path(runs_dir)
    found: list[FinishedRun] = []
    level = [runs_dir] if runs_dir.is_dir() else []
    for _ in range(SEARCH_DEPTH):
        below = []
        for parent in level:
            for child in sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if child.name == FINAL:
                    continue
                run = read_finished(runs_dir, child)
                if run is not None:
                    found.append(run)
                else:
                    below.append(child)
        level = below
    return sorted(found, key=lambda r: r.finished, reverse=True)


def _pipeline_folder(path: Any) -> Path | None:
    """A diffusers pipeline folder from a config's ``data.vae``/``data.text_encoder`` (the folder, or a
    component folder inside one); relative paths are the trainer's, which runs from the repository."""
    if not isinstance(path, str) or not path:
        return None
    p = Path(path).expanduser()
    p = p if p.is_absolute() else REPO / p
    for cand in (p, p.parent):
        if (cand / MODEL_INDEX).is_file():
            return cand
    return None


def components_folder(run_folder: Path) -> Path | None:
    """The pipeline folder whose tokenizer, text encoder, VAE and scheduler the run trained with (None: unknown)."""
    try:
        cfg = yaml.safe_load((run_folder / CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if not isinstance(data, dict):
        return None
    return _pipeline_folder(data.get("vae")) or _pipeline_folder(data.get("text_encoder"))


Loader = Callable[..., Any]  # PixSigmaPipeline.from_pretrained's signature


class RunModels:
    """The finished runs under ``runs_dir`` as pipelines on one device, loaded when a request names one.

    ``fallback``: the pipeline folder (or model name) lending the components when a run's config names none;
    ``load``: ``PixSigmaPipeline.from_pretrained`` (tests may count calls)."""

    def __init__(self, runs_dir: str | Path, fallback: str, device: str = "cpu", dtype: str | None = None,
                 offload_t5: bool = False, keep: int = KEEP_LOADED, load: Loader | None = None,
                 t5_precision: str | None = None) -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1 (run pipelines kept loaded), got {keep!r}")
        if load is None:
            from pixsigma.pipeline import PixSigmaPipeline

            load = PixSigmaPipeline.from_pretrained
        self.runs_dir, self.fallback, self.device, self.dtype = Path(runs_dir), fallback, device, dtype
        self.offload_t5, self.t5_precision, self.keep, self._load = offload_t5, t5_precision, keep, load
        self._loaded: OrderedDict[str, Any] = OrderedDict()  # key -> pipeline, least recently used first
        self._lock = threading.Lock()  # one load at a time; the cache is shared by every request

    def choices(self) -> list[FinishedRun]:
        return finished_runs(self.runs_dir)

    def find(self, key: str) -> FinishedRun:
        """The finished run ``key`` names, or a ValueError listing the finished runs."""
        name = key[len(RUN_PREFIX):] if isinstance(key, str) and key.startswith(RUN_PREFIX) else None
        folder = (self.runs_dir / name).resolve() if name else None
        root = self.runs_dir.resolve()
        run = None
        if folder is not None and folder != root and root in folder.parents:
            run = read_finished(self.runs_dir, self.runs_dir / name)
        if run is None:
            have = ", ".join(r.key for r in self.choices()[:10]) or "none yet (a run is finished when it has final/)"
            raise ValueError(f"model {key!r} is not a finished run under {self.runs_dir}; finished runs: {have}")
        return run

    def pipeline(self, key: str) -> tuple[Any, FinishedRun]:
        """The run's pipeline (loaded now, or kept from an earlier request) and the run."""
        run = self.find(key)
        with self._lock:
            stamp = (key, run.finished)  # a run trained again (same folder, newer final/) is loaded anew
            cached = self._loaded.get(key)
            if cached is not None and cached[0] == stamp[1]:
                self._loaded.move_to_end(key)
                return cached[1], run
            components = components_folder(run.folder)
            pipe = self._load(str(components) if components else self.fallback, transformer=str(run.folder / FINAL),
                              device=self.device, dtype=self.dtype, offload_t5=self.offload_t5,
                              t5_precision=self.t5_precision)
            self._loaded[key] = (run.finished, pipe)
            self._loaded.move_to_end(key)
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
            return pipe, run

    def loaded(self) -> list[str]:
        """Keys of the run pipelines held now, least recently used first."""
        return list(self._loaded)

    def attach(self, engine: Any, key: str) -> None:
        """Make ``key`` usable by ``engine`` for this request: the run's pipeline in its tables, and the run
        pipelines this cache dropped taken out of them (a request holding one keeps its own reference)."""
        if not (isinstance(key, str) and key.startswith(RUN_PREFIX)):
            return
        pipe, run = self.pipeline(key)
        engine.add_model(key, pipe, run.label)
        for old in [k for k in engine.pipes if k.startswith(RUN_PREFIX) and k not in self._loaded]:
            engine.drop_model(old)


def dtype_name(pipe: Any) -> str | None:
    """The ``from_pretrained`` dtype name of a loaded pipeline (None: the device's default)."""
    from pixsigma.pipeline import DTYPES

    names = {v: k for k, v in DTYPES.items()}
    return names.get(getattr(pipe, "dtype", None))


def attach_runs(engine: Any, runs_dir: str | Path, keep: int = KEEP_LOADED) -> None:
    """Offer ``runs_dir``'s finished runs as models of ``engine`` (each engine of a pool on its own device)."""
    from pixsigma_ui.engine import MAIN

    for e in getattr(engine, "engines", None) or [engine]:
        main = e.pipes[MAIN]
        e.runs = RunModels(runs_dir, getattr(main, "name", "") or e.names[MAIN], device=str(main.device),
                           dtype=dtype_name(main), offload_t5=bool(getattr(main, "offload_t5", False)), keep=keep,
                           t5_precision=getattr(main, "t5_precision", None))  # the main model's --t5
    if getattr(engine, "engines", None):
        engine.runs = engine.engines[0].runs  # the pool answers choices() and checks names with the first
