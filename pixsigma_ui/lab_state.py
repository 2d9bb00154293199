"""The Train tab's view model, read from the run folders alone: what every stage of the chain is doing.

Nothing here is held in memory between calls, so a reload, a second browser or a restarted app sees the same
runs. A run folder (``train.runfiles`` names its files) says: ``launch.json`` (how and by which process the app
started it), ``prepare.json`` (inputs being made before training: phase, done/total), ``status.json`` (the
trainer's state, step, loss, validation images, pid), ``metrics.jsonl`` (a row per step, with steps/s),
``bench.json`` (held-out ShapesBench scores as they arrive) and ``final/`` (the export). The chain's
``chain.json`` in the runs folder holds each finished stage's scores.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pixsigma.layout import CHECKOUT, DATA_ROOT

if CHECKOUT is not None:  # a clone imports train/ by its name; a wheel has it as pixsigma.train (pixsigma.layout)
    from train.chain import CHAIN_JSON, CHAIN_PLAN, CHAIN_RUN
    from train.runfiles import (
        BENCH,
        CHECKPOINTS,
        CONFIG,
        FINAL,
        LAUNCH,
        LIVE_STATES,
        LOG,
        METRICS,
        PREPARE,
        STATUS,
        STDOUT,
        STOP,
    )
else:
    from pixsigma.train.chain import CHAIN_JSON, CHAIN_PLAN, CHAIN_RUN
    from pixsigma.train.runfiles import (
        BENCH,
        CHECKPOINTS,
        CONFIG,
        FINAL,
        LAUNCH,
        LIVE_STATES,
        LOG,
        METRICS,
        PREPARE,
        STATUS,
        STDOUT,
        STOP,
    )


LAB_FOLDER = "lab"  # the app's chain lives in RUNS/lab (python -m train.chain's default: runs/lab)
PLOT_ROWS = 5000  # the loss plot's last steps: enough to see a trend, few enough to redraw every poll
SEARCH_DEPTH = 2  # runs/NAME and runs/CHAIN/NAME
# The chain as drawn: (title, trainer stage), in training order.
CHAIN_STAGES = (("α", "from_scratch"), ("VAE", "vae_adapt"), ("res-up", "res_up"), ("KV", "kv_compress"),
                ("finetune", "finetune"))
SCORE_KEYS = ("attribute", "count", "colour", "shape", "position")


def read_json(path: Path) -> dict[str, Any]:
    """{} when missing or caught mid-write (writers replace files atomically, but be lenient)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie (exited, not yet reaped) answers kill(0) but is not running
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def metrics_frame(rows: list[dict[str, float]]) -> pd.DataFrame:
    """Typed even when empty: the plot fixes its axis kinds on the first frame it gets, and an empty object
    column reads as categorical (losses would then be drawn as unordered labels)."""
    return pd.DataFrame(rows, columns=["step", "loss"]).astype({"step": "int64", "loss": "float64"})


def _metric_rows(folder: Path) -> list[dict[str, Any]]:
    """The last ``PLOT_ROWS`` rows of metrics.jsonl (a half-written last line is skipped)."""
    try:
        with open(folder / METRICS, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 400 * PLOT_ROWS))  # rows are ~300 bytes
            lines = f.read().decode("utf-8", "replace").splitlines()[-PLOT_ROWS:]
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        except ValueError:
            continue
    return rows


def read_metrics(folder: Path) -> pd.DataFrame:
    """step/loss of the run's last ``PLOT_ROWS`` steps."""
    rows = []
    for m in _metric_rows(folder):
        try:
            rows.append({"step": int(m["step"]), "loss": float(m["loss"])})
        except (KeyError, TypeError, ValueError):
            continue
    return metrics_frame(rows)


def log_tail(folder: Path, lines: int = 40) -> str:
    """The last lines of log.txt (else stdout.txt), as a terminal would show a progress bar's rewrites."""
    for name in (LOG, STDOUT):
        try:
            with open(folder / name, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        shown = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
        shown = [line for line in shown if line.strip()]
        if shown:
            return "\n".join(shown[-lines:])
    return ""


def format_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def config_stage(path: Path, _depth: int = 0) -> str | None:
    """The stage a training config names (``stage: NAME`` or ``stage: {name: NAME}``), through its ``base:``."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(raw, dict):
        return None
    stage = raw.get("stage")
    stage = stage.get("name") if isinstance(stage, dict) else stage
    if isinstance(stage, str):
        return stage
    if isinstance(raw.get("base"), str) and _depth < 8:
        return config_stage(path.parent / raw["base"], _depth + 1)
    return None


def _plan_stage(folder: Path) -> str | None:
    """The stage of a chain's run from the chain's plan (before the run has written anything of its own)."""
    for row in read_json(folder.parent / CHAIN_PLAN).get("stages") or []:
        if isinstance(row, dict) and row.get("name") == folder.name and isinstance(row.get("config"), str):
            return config_stage(DATA_ROOT / "configs" / row["config"])  # a plan names its configs by file
    return None


def _latest_score(bench: dict[str, Any]) -> dict[str, Any] | None:
    """The newest ShapesBench point of a ``bench.json`` (its export's, else its last checkpoint's)."""
    if any(k in bench for k in SCORE_KEYS):
        return bench
    for key in ("final", "export", "start"):  # the chain scores a stage's start before it trains
        if isinstance(bench.get(key), dict):
            return bench[key]
    points = [p for p in (bench.get("points") or []) if isinstance(p, dict)]
    return points[-1] if points else None


@dataclass(frozen=True)
class RunView:
    """One run folder as the tab shows it."""

    name: str  # relative to the runs folder (POSIX)
    folder: Path
    stage: str | None
    state: str  # not started | preparing | starting | running | stopped | finished | error | died
    alive: bool
    stopping: bool
    step: int
    total: int | None
    steps_per_s: float | None
    eta_s: float | None
    last_loss: float | None
    error: str | None
    samples: tuple[str, ...]
    prepare: dict[str, Any]  # prepare.json as written (phase, done, total, ...), {} when none
    score: dict[str, Any] | None  # the newest ShapesBench point
    resumable: bool  # a checkpoint to resume from, and a launch.json saying how
    finished: bool  # final/ exported
    updated: float

    @property
    def progress(self) -> str:
        """'step 12/50 · 3.1 steps/s · ETA 12s', or the preparation's 'extracting 40/128 · 5.2 images/s …'."""
        if self.state == "preparing" and self.prepare:
            p = self.prepare
            done, total = p.get("done"), p.get("total")
            rate = p.get("rate") or p.get("per_s") or p.get("images_per_s")
            parts = [str(p.get("phase") or "preparing")]
            if isinstance(done, int) and isinstance(total, int) and total:
                parts.append(f"{done}/{total}")
            if isinstance(rate, int | float) and rate > 0:
                unit = p.get("unit") or ("images" if p.get("phase") in ("data", "features") else "items")
                parts.append(f"{rate:.3g} {unit}/s")
            eta = p.get("eta_s")
            if isinstance(eta, int | float):
                parts.append(f"ETA {format_seconds(eta)}")
            return " · ".join(parts)
        parts = [f"step {self.step}/{self.total if self.total is not None else '?'}"]
        if self.steps_per_s:
            parts.append(f"{self.steps_per_s:.3g} steps/s")
        if self.eta_s is not None and self.alive:
            parts.append(f"ETA {format_seconds(self.eta_s)}")
        return " · ".join(parts)


def read_run(runs_dir: Path, folder: Path) -> RunView:
    """The view of the run in ``folder`` (under ``runs_dir``), liveness checked against the process table."""
    status, launch, prepare = read_json(folder / STATUS), read_json(folder / LAUNCH), read_json(folder / PREPARE)
    chain = read_json(folder.parent / CHAIN_RUN)  # a chain's stage: the chain's process runs it
    in_chain = chain.get("current") == folder.name and chain.get("state") == "running" and pid_alive(chain.get("pid"))
    alive = in_chain or pid_alive(status.get("pid")) or pid_alive(launch.get("pid"))
    state = status.get("state")
    if in_chain and (not state or state not in LIVE_STATES) and not prepare:
        state = "scoring"  # the chain scores the stage's start, checkpoints and export on ShapesBench
    elif not state or (prepare and alive and state not in LIVE_STATES):
        state = "preparing" if prepare and alive else "starting" if alive else "not started"
    elif state in LIVE_STATES and not alive:
        state = "died"
    elif state not in LIVE_STATES and alive and launch.get("started", 0) > status.get("updated", 0):
        state = "starting"  # resumed: the old status is still there until the trainer writes its own
    if prepare.get("error") and not status:
        state, alive = "error", False
    rows = _metric_rows(folder)[-1:]
    step = status.get("step") if isinstance(status.get("step"), int) else 0
    total = status.get("total_steps") if isinstance(status.get("total_steps"), int) else launch.get("steps")
    rate = rows[-1].get("steps_per_s") if rows else None
    rate = float(rate) if isinstance(rate, int | float) and rate > 0 else None
    eta = (total - step) / rate if rate and isinstance(total, int) and state == "running" else None
    loss = status.get("last_loss")
    samples = []
    for p in status.get("samples") or []:
        path = Path(p) if Path(p).is_absolute() else folder / p
        if path.is_file():
            samples.append(str(path))
    return RunView(
        name=folder.relative_to(runs_dir).as_posix(), folder=folder,
        stage=status.get("stage") or launch.get("stage") or prepare.get("stage") or config_stage(folder / CONFIG)
        or _plan_stage(folder),
        state=state, alive=alive, stopping=alive and (folder / STOP).exists(), step=step,
        total=total if isinstance(total, int) else None, steps_per_s=rate, eta_s=eta,
        last_loss=float(loss) if isinstance(loss, int | float) else None,
        error=status.get("error") or prepare.get("error") or launch.get("error"), samples=tuple(samples),
        prepare=prepare, score=_latest_score(read_json(folder / BENCH)),
        resumable=bool(launch.get("cmd")) and (folder / CHECKPOINTS).is_dir(),
        finished=(folder / FINAL).is_dir(),
        updated=max([status.get("updated") or 0, launch.get("started") or 0, _mtime(folder)]))


def _mtime(folder: Path) -> float:
    try:
        return folder.stat().st_mtime
    except OSError:
        return 0.0


def is_run_folder(folder: Path) -> bool:
    return any((folder / f).is_file() for f in (STATUS, LAUNCH, PREPARE))


def scan_runs(runs_dir: str | Path) -> list[RunView]:
    """Every run under ``runs_dir`` (up to ``SEARCH_DEPTH`` folders deep), most recently active first."""
    runs_dir = Path(runs_dir)
    found: list[RunView] = []
    level = [runs_dir] if runs_dir.is_dir() else []
    for _ in range(SEARCH_DEPTH):
        below = []
        for parent in level:
            for child in sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
                if is_run_folder(child):
                    found.append(read_run(runs_dir, child))
                elif child.name not in (FINAL, CHECKPOINTS):
                    below.append(child)
        level = below
    return sorted(found, key=lambda r: r.updated, reverse=True)


@dataclass(frozen=True)
class StageView:
    """One box of the chain: its latest run (None: never started) and its score."""

    title: str
    stage: str
    run: RunView | None
    score: dict[str, Any] | None  # chain.json's ShapesBench of the stage, else the run's newest bench point
    shipped: bool = False  # the chain's α is the shipped one: scored, not trained

    @property
    def state(self) -> str:
        return self.run.state if self.run else "shipped" if self.shipped else "not started"


@dataclass(frozen=True)
class LabView:
    stages: tuple[StageView, ...]
    runs: tuple[RunView, ...]  # newest first
    chain: dict[str, Any] = field(default_factory=dict)  # chain.json as written ({} when none)

    @property
    def live(self) -> RunView | None:
        return next((r for r in self.runs if r.alive), None)

    def run(self, name: str | None) -> RunView | None:
        return next((r for r in self.runs if r.name == name), None)


def _chain_scores(chain: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """stage and run name -> its ShapesBench dict from chain.json."""
    out: dict[str, dict[str, Any]] = {}
    for row in chain.get("stages") or []:
        if isinstance(row, dict) and isinstance(row.get("shapesbench"), dict):
            for key in (row.get("stage"), row.get("name")):
                if isinstance(key, str):
                    out.setdefault(key, row["shapesbench"])
    return out


def _shipped_alpha(lab_dir: Path) -> dict[str, Any] | None:
    """The chain's score of the shipped α (its ``alpha/bench.json``), None when the chain trained α or never ran."""
    bench = read_json(lab_dir / "alpha" / BENCH)
    return bench.get("final") if bench.get("source") == "shipped" else None


def lab_view(runs_dir: str | Path, lab_dir: str | Path | None = None) -> LabView:
    """The chain's stages and every run, from the files under ``runs_dir`` (the chain's: ``lab_dir``, default
    ``RUNS/lab``)."""
    runs_dir = Path(runs_dir)
    lab_dir = Path(lab_dir) if lab_dir is not None else runs_dir / LAB_FOLDER
    runs = scan_runs(runs_dir)
    chain = read_json(lab_dir / CHAIN_JSON)
    scores = _chain_scores(chain)
    stages = []
    for title, stage in CHAIN_STAGES:
        run = next((r for r in runs if r.stage == stage), None)
        own = run.score if run else None  # the run's bench.json: live while the chain scores it
        score = own or (scores.get(run.folder.name) if run else None) or scores.get(stage)
        shipped = _shipped_alpha(lab_dir) if stage == "from_scratch" and run is None else None
        stages.append(StageView(title, stage, run, score or shipped, shipped is not None))
    return LabView(tuple(stages), tuple(runs), chain)


def score_text(score: dict[str, Any] | None) -> str:
    """'ShapesBench 0.41 (n=48)': the attribute score, or '—' before one arrives."""
    if not score:
        return "ShapesBench —"
    value = score.get("attribute")
    n = score.get("n")
    shown = f"{value:.3f}" if isinstance(value, int | float) else "?"
    return f"ShapesBench {shown}" + (f" (n={n})" if isinstance(n, int) else "")


