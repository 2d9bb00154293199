"""The weak-to-strong chain in one command: α → VAE swap → 128 → 256 px res-up → KV compression, each scored.

    python -m train.chain --preset tiny|quick|full [--runs-dir DIR] [--from shipped|scratch] [--ablation kv]

α is the shipped demo α (``--from shipped``, not trained) or trained from random weights (``--from scratch``).
Each later stage is its recipe in ``configs/`` with the preset's steps and batch (the world's plan:
``shapes.plan.lab_plan``), prepared by ``train.prepare`` (data, features, starting weights made on demand) and
trained by the one shared loop (``train.loop``) in this process. Every stage's starting point, its inner
checkpoints and its export are scored on the world's held-out benchmark (ShapesBench: the same ``n`` prompts and
seeds at every point) into ``RUN/bench.json``; the chain writes ``DIR/chain.json``
(``{"preset", "stages": [{"name", "stage", "steps", "seconds", "final_loss", "shapesbench": {...}}, ...]}``, each
stage also carrying ``start_shapesbench``, ``curve`` [[step, attribute], ...] and ``run_dir``) and
``DIR/chain.png`` (score against steps, one curve per stage: the paper's Fig. 8).

Everything is in files, so a rerun skips what is finished (a stage with ``final/`` and its scores), a ``kill -9``
loses at most one checkpoint interval (the loop resumes exactly), and ``chain_status`` tells a second process
(the app) where the chain is. ``DIR/STOP`` (``stop_chain``) stops it at the next checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pixsigma.constants import FEW_STEP_SAMPLING
from pixsigma.layout import CHECKOUT, child_env, companion

from .protocol import (
    PROTOCOL_SAMPLING,
    Protocol,
    boundary,
    conditions,
    format_summary,
    paired,
    recovery,
    with_interval,
)
from .runfiles import BENCH, FINAL, LIVE_STATES, PREPARE, SAMPLES, STOP, read_metrics, read_status
from .runlock import Lease, acquire, exit_if_busy, spawn

PRESETS = ("tiny", "quick", "quick-fast", "full")  # quick-fast and full end with the consistency stage
STARTS = ("shipped", "scratch")
CHAIN_JSON, CHAIN_PLOT, CHAIN_PLAN, CHAIN_RUN, CHAIN_LOG = "chain.json", "chain.png", "chain_plan.json", \
    "chain_run.json", "chain.log"
STAGE_STATES = ("pending", "running", "done", "failed", "stopped")
LOSS_POINTS = 400  # loss points per stage in chain_status (evenly thinned): enough for a curve
SAMPLE_PROMPTS = ["a red square", "a blue circle to the left of a green triangle"]
BENCH_BATCH = 16  # prompts per sampling batch when scoring (batch b drawn from seed b)
# What a stage changes in the model itself at its start (beside the conditions it is scored under).
MODEL_CHANGES = {"vae_adapt": "", "res_up": "PE interpolation", "kv_compress": "KV compression added"}

Event = dict[str, Any]
EventFn = Callable[[Event], None]


def _write_json(obj: Any, path: Path) -> None:
    from pixsigma.io import atomic_write_json

    atomic_write_json(obj, path, indent=1)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie answers kill(0) but is not running
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def intervals(steps: int, evals: int, checkpoint_every: int | None = None) -> tuple[int, int]:
    """(checkpoint interval, scored interval) of a stage: ``evals`` inner points are scored, and a checkpoint is
    saved at least every ``checkpoint_every`` steps (what a ``kill -9`` can lose) on a grid through those points."""
    every = max(1, steps // (evals + 1))
    if not checkpoint_every or checkpoint_every >= every:
        return every, every
    k = -(-every // checkpoint_every)
    save = max(1, every // k)
    return save, save * k


def stage_overrides(step: Any, prev: Any | None, runs_dir: Path, evals: int, images: int | None = None,
                    checkpoint_every: int | None = None) -> list[str]:
    """The ``--set`` pairs that make a plan step's recipe the chain's run (``runs/NAME`` references are resolved
    by ``train.prepare``: the previous run in ``runs_dir``, else the shipped model)."""
    import torch

    save, scored = intervals(step.steps, evals, checkpoint_every)
    keep = step.steps // save + 2 if save < scored else evals + 2  # the scored ones survive until scored
    sets = [f"output_dir={runs_dir / step.name}", f"steps={step.steps}", f"batch_size={step.batch_size}",
            f"save_every={save}", f"keep_last={keep}", f"sample_every={step.steps}",
            f"sample_prompts={json.dumps(SAMPLE_PROMPTS)}", "sample_steps=10", "data.num_workers=0",
            f"mixed_precision={'bf16' if torch.cuda.is_available() else 'no'}",
            f"optim.warmup_steps={min(100, max(0, step.steps // 10))}"]
    n = step.images or images
    if n:
        sets.append(f"data.max_images={n}")
    if prev is not None:
        sets.append(f"stage.load_from=runs/{prev.name}")
    return sets


def _final_loss(run_dir: Path, last: int = 10) -> float | None:
    """Mean loss of the run's last ``last`` steps (one step's loss is noisy)."""
    losses = [r["loss"] for r in read_metrics(run_dir)][-last:]
    return round(sum(losses) / len(losses), 5) if losses else None


class Chain:
    """One chain run: the preset's plan in ``runs_dir``, with events to ``on_event``."""

    def __init__(self, preset: str, runs_dir: str | Path, start_from: str = "shipped",
                 on_event: EventFn | None = None, world: str | None = None):
        from .worlds import DEFAULT_WORLD, load_world

        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        if start_from not in STARTS:
            raise ValueError(f"start_from must be one of {', '.join(STARTS)}, got {start_from!r}")
        self.world = load_world(world or DEFAULT_WORLD)
        self.lab = self.world.preset(preset, start_from)
        self.preset, self.start_from, self.runs_dir = preset, start_from, Path(runs_dir)
        self.on_event = on_event or (lambda e: None)
        self.checkpoint_every = getattr(self.lab, "checkpoint_every", None)
        sampling = self.world.sampling(self.lab.bench_steps, expand=True)
        self.protocol = Protocol(bench=self.world.bench, n=self.lab.bench_n, steps=self.lab.bench_steps,
                                 sampler=sampling["sampler"], guidance=sampling["guidance"], seed=0,
                                 batch_size=min(self.lab.bench_n, BENCH_BATCH), expander=sampling["expander"])

    def emit(self, **event: Any) -> None:
        self.on_event({**event, "time": time.time()})

    def steps(self) -> list[Any]:
        """The plan's runs this chain trains (α left out when it is the shipped one)."""
        return self.lab.plan[1:] if self.start_from == "shipped" else list(self.lab.plan)

    def stopped(self) -> bool:
        return (self.runs_dir / STOP).exists()

    def write_plan(self) -> None:
        rows = [{"name": st.name, "config": st.config, "steps": st.steps, "batch_size": st.batch_size,
                 "resolution": st.resolution, "pipeline": st.pipeline, "run_dir": str(self.runs_dir / st.name),
                 "trained": self.start_from == "scratch" or i > 0} for i, st in enumerate(self.lab.plan)]
        _write_json({"preset": self.preset, "start_from": self.start_from, "world": self.world.name,
                     "bench_n": self.lab.bench_n, "bench_steps": self.lab.bench_steps, "evals": self.lab.evals,
                     "stages": rows}, self.runs_dir / CHAIN_PLAN)

    def score(self, pipeline: str, model: Any, resolution: int, bench: dict[str, Any] | None = None,
              expand: bool = False, few_step: bool = False) -> dict[str, Any]:
        """The protocol's benchmark of ``model`` with the ``conditions`` it was scored under (and each prompt's
        score, ``per_prompt``; ``few_step``: a consistency model, at the steps and guidance it samples with, a
        condition of its own); its seconds are added to ``bench["score_seconds"]``."""
        t0, c0 = time.perf_counter(), time.process_time()
        steps, fast, sampling = self.protocol.steps, {}, PROTOCOL_SAMPLING
        if few_step:
            f = FEW_STEP_SAMPLING
            steps, sampling = f["steps"], f"{f['sampler']} {f['steps']}, guidance {f['guidance']:g}"
            fast = {"sampling": {"sampler": f["sampler"], "guidance": f["guidance"], "expand_prompt": False}}
        s = self.world.score(self.world.pipelines()[pipeline], model, resolution, self.protocol.n, steps,
                             seed=self.protocol.seed, expand=expand, **fast)
        if bench is not None:
            _add_time(bench, "score", t0, c0)
        return {**s, "conditions": conditions(pipeline, resolution, expand, sampling)}

    def shipped_alpha(self) -> dict[str, Any]:
        """α as shipped: scored, not trained."""
        from .prepare import _write_shipped, shipped_start

        st = self.lab.plan[0]
        run_dir = self.runs_dir / st.name
        bench = _read_json(run_dir / BENCH)
        if "final" not in bench:
            weights = shipped_start("alpha", self.runs_dir, self.world.name)
            _write_shipped("alpha", weights, self.world.name)
            self.emit(event="stage", name=st.name, state="scoring")
            timing: dict[str, Any] = {}
            s = self.score(st.pipeline, weights, st.resolution, timing)
            bench = {**timing, "start": s, "final": s, "curve": [self.point(0, s)], "seconds": 0.0, "steps": 0,
                     "stage": "from_scratch", "source": "shipped", "weights": str(weights)}
            _write_json(bench, run_dir / BENCH)
            self.emit(event="score", name=st.name, point="final", step=0, shapesbench=s)
        return bench

    def run_stage(self, st: Any, prev: Any | None, extra: list[str] | tuple[str, ...] = ()) -> dict[str, Any] | None:
        """Prepare, train and score one run (``extra``: more ``--set`` pairs); None when it was stopped."""
        from .checkpoint import build_model, checkpoint_dirs, checkpoint_model, checkpoint_step
        from .loop import train
        from .prepare import prepare_stage

        run_dir = self.runs_dir / st.name
        bench = _read_json(run_dir / BENCH)
        if (run_dir / FINAL).is_dir() and "final" in bench:
            self.emit(event="stage", name=st.name, state="skipped")
            return bench
        self.emit(event="stage", name=st.name, state="preparing")
        sets = [*stage_overrides(st, prev, self.runs_dir, self.lab.evals, self.lab.images, self.checkpoint_every),
                *getattr(st, "sets", ()), *extra]  # the preset's schedule, then the caller's
        t0, c0 = time.perf_counter(), time.process_time()
        prepared = prepare_stage(st, self.runs_dir, sets, world=self.world.name,
                                 progress=lambda p: self.emit(event="progress", name=st.name, **p.as_dict()))
        _add_time(bench, "prepare", t0, c0)
        cfg = prepared.config
        few_step = cfg.stage.name == "consistency"  # its points sample as it was distilled to: 4 steps, no CFG
        if "start" not in bench:  # the starting point, in this stage's model (new resolution, new KV layers)
            import torch

            torch.manual_seed(cfg.seed)
            self.emit(event="stage", name=st.name, state="scoring", point="start")
            net, _ = build_model(cfg)
            bench["start"] = self.score(st.pipeline, net, net.config.resolution, bench, few_step=few_step)
            bench.update(stage=cfg.stage.name, start_source=prepared.start, load_from=str(prepared.load_from))
            _write_json(bench, run_dir / BENCH)
            self.emit(event="score", name=st.name, point="start", step=0, shapesbench=bench["start"])
        if not (run_dir / FINAL).is_dir():
            if self.stopped():
                return None
            self.emit(event="stage", name=st.name, state="running")
            t0, c0 = time.perf_counter(), time.process_time()
            result = train(cfg, resume=prepared.resume)
            _add_time(bench, "train", t0, c0)
            _write_json(bench, run_dir / BENCH)
            if result["state"] != "finished":
                return None
        curve = {int(k): v for k, v in bench.get("curve_points", {}).items() if isinstance(v, dict)}
        scored = intervals(st.steps, self.lab.evals, self.checkpoint_every)[1]
        for ck in checkpoint_dirs(run_dir):  # the inner points of the curve: scored checkpoints before the end
            step = checkpoint_step(ck)
            if step < st.steps and step % scored == 0 and step not in curve:
                self.emit(event="stage", name=st.name, state="scoring", point=step)
                net = checkpoint_model(ck)
                curve[step] = self.score(st.pipeline, net, net.config.resolution, bench, few_step=few_step)
                bench["curve_points"] = {str(k): v for k, v in curve.items()}
                _write_json(bench, run_dir / BENCH)
        _prune(run_dir, scored)
        self.emit(event="stage", name=st.name, state="scoring", point="final")
        bench["final"] = self.score(st.pipeline, run_dir / FINAL, _resolution(run_dir), bench, few_step=few_step)
        bench["curve"] = [self.point(0, bench["start"]), *(self.point(k, curve[k]) for k in sorted(curve)),
                          self.point(st.steps, bench["final"])]
        bench["steps"] = st.steps
        _write_json(bench, run_dir / BENCH)
        self.emit(event="score", name=st.name, point="final", step=st.steps, shapesbench=bench["final"])
        self.emit(event="stage", name=st.name, state="done")
        return bench

    def point(self, step: int, score: dict[str, Any]) -> list[Any]:
        """A curve point: [step, attribute, interval low, interval high] (no interval without per-prompt scores)."""
        lo, hi = with_interval(score, self.protocol).get("interval") or (None, None)
        return [step, score["attribute"], lo, hi]

    def _done(self) -> list[tuple[Any, Path, dict[str, Any]]]:
        """(plan step, run folder, bench.json) of every scored stage, in order."""
        rows = [(st, self.runs_dir / st.name, _read_json(self.runs_dir / st.name / BENCH)) for st in self.lab.plan]
        return [row for row in rows if "final" in row[2]]

    def score_ends(self) -> None:
        """The chain's two ends (α and the last export) scored once more with the prompts through the world's
        expander (``final_expanded`` in their bench.json): the protocol's "expander on" comparison."""
        if not self.protocol.expander or not getattr(self.lab, "expand_ends", True):
            return
        done = self._done()
        for st, run_dir, bench in {id(r): r for r in (done[:1] + done[-1:])}.values():
            if "final_expanded" in bench:
                continue
            shipped = bench.get("source") == "shipped"
            model = Path(bench["weights"]) if shipped else run_dir / FINAL
            self.emit(event="stage", name=st.name, state="scoring", point="expanded")
            bench["final_expanded"] = self.score(st.pipeline, model, st.resolution if shipped else
                                                 _resolution(run_dir), bench, expand=True,
                                                 few_step=bench.get("stage") == "consistency")
            _write_json(bench, run_dir / BENCH)
            self.emit(event="score", name=st.name, point="expanded", step=bench.get("steps", 0),
                      shapesbench=bench["final_expanded"])

    def summary(self) -> dict[str, Any]:
        """``chain.json``'s content from the runs' files: each stage's scores with their intervals and
        conditions, the boundary between it and the stage before (both scores, what changed), and the
        recovery verdict."""
        iv = lambda score: with_interval(score, self.protocol) if score else None  # noqa: E731
        stages, prev, done = [], None, self._done()
        for st, run_dir, bench in done:
            shipped = bench.get("source") == "shipped"
            start, final = bench.get("start") or {}, bench["final"]
            row = {"name": st.name, "stage": bench.get("stage"), "steps": bench.get("steps", st.steps),
                   "seconds": bench.get("seconds"), "score_seconds": bench.get("score_seconds"),
                   "prepare_seconds": bench.get("prepare_seconds"), "cpu_seconds": bench.get("cpu_seconds"),
                   "final_loss": None if shipped else _final_loss(run_dir),
                   "shapesbench": iv(final), "start_shapesbench": iv(start),
                   "conditions": final.get("conditions"), "start_conditions": start.get("conditions"),
                   "curve": bench.get("curve", []), "run_dir": str(run_dir),
                   "start": "shipped" if shipped else bench.get("start_source"),
                   "batch_size": st.batch_size, "resolution": st.resolution, "schedule": list(getattr(st, "sets", ()))}
            if "final_expanded" in bench:
                row["expanded_shapesbench"] = iv(bench["final_expanded"])
            if not shipped and start.get("per_prompt") and final.get("per_prompt"):
                row["training_change"] = paired(start, final, self.protocol)  # what the stage's training did
            if prev is not None and start:
                row["boundary"] = boundary(prev["final"], start, MODEL_CHANGES.get(row["stage"], ""), self.protocol)
            stages.append(row)
            prev = bench
        verdict = recovery(stages)
        benches = [bench for _, _, bench in done]
        if verdict and len(benches) >= 2:  # the final against each α on the same prompts and seeds: the paired test
            alphas = {"final_vs_alpha": benches[0]["final"], "final_vs_alpha_sigma_side": benches[1].get("start")}
            for key, alpha in alphas.items():
                if verdict.get(key) and alpha:
                    verdict[key]["paired"] = paired(alpha, benches[-1]["final"], self.protocol)
        return {"preset": self.preset, "start_from": self.start_from, "world": self.world.name,
                "bench": {"n": self.lab.bench_n, "steps": self.lab.bench_steps},
                "protocol": self.protocol.to_dict(), "stages": stages, "recovery": verdict}

    def finish(self) -> dict[str, Any]:
        self.score_ends()
        summary = self.summary()
        _write_json(summary, self.runs_dir / CHAIN_JSON)
        from .chainplot import plot_chain

        plot_chain(summary, self.runs_dir / CHAIN_PLOT)
        return summary

    def run(self, until: str | None = None) -> dict[str, Any]:
        """Every stage in order (up to and including ``until``); returns ``chain.json``'s content."""
        names = [st.name for st in self.lab.plan]
        if until is not None and until not in names:
            raise ValueError(f"until must be one of the plan's stages {', '.join(names)}, got {until!r}")
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        (self.runs_dir / STOP).unlink(missing_ok=True)
        self.write_plan()
        record = {"pid": os.getpid(), "preset": self.preset, "start_from": self.start_from, "state": "running",
                  "started": time.time(), "current": None, "error": None}
        _write_json(record, self.runs_dir / CHAIN_RUN)
        try:
            if self.start_from == "shipped":
                record["current"] = self.lab.plan[0].name
                self.shipped_alpha()
            prev = self.lab.plan[0] if self.start_from == "shipped" else None
            for st in self.steps() if until != names[0] or self.start_from == "scratch" else []:
                record["current"] = st.name
                _write_json(record, self.runs_dir / CHAIN_RUN)
                if self.run_stage(st, prev) is None:
                    record.update(state="stopped", updated=time.time())
                    _write_json(record, self.runs_dir / CHAIN_RUN)
                    (self.runs_dir / STOP).unlink(missing_ok=True)
                    self.emit(event="chain", state="stopped")
                    return self.summary()
                prev = st
                if st.name == until:
                    break
            summary = self.finish()
        except BaseException as e:
            record.update(state="failed", error=f"{type(e).__name__}: {e}", updated=time.time())
            _write_json(record, self.runs_dir / CHAIN_RUN)
            self.emit(event="chain", state="failed", error=record["error"])
            raise
        record.update(state="done", current=None, updated=time.time())
        _write_json(record, self.runs_dir / CHAIN_RUN)
        self.emit(event="chain", state="done", chain=str(self.runs_dir / CHAIN_JSON))
        return summary


def _add_time(bench: dict[str, Any], part: str, t0: float, c0: float) -> None:
    """Add the wall seconds since ``t0`` to ``bench``'s ``{part}_seconds`` (training's: ``seconds``) and this
    process's CPU seconds since ``c0`` to ``cpu_seconds[part]``: on a shared machine the wall time says how
    busy it was, the CPU time what the part costs."""
    key = "seconds" if part == "train" else f"{part}_seconds"
    bench[key] = round(bench.get(key, 0.0) + time.perf_counter() - t0, 2)
    cpu = bench.setdefault("cpu_seconds", {})
    cpu[part] = round(cpu.get(part, 0.0) + time.process_time() - c0, 2)


def _prune(run_dir: Path, scored: int) -> None:
    """Drop a finished run's resume-only checkpoints (the scored ones and the last stay)."""
    import shutil

    from .checkpoint import checkpoint_dirs, checkpoint_step

    for ck in checkpoint_dirs(run_dir)[:-1]:
        if checkpoint_step(ck) % scored:
            shutil.rmtree(ck, ignore_errors=True)


def _resolution(run_dir: Path) -> int:
    """The base resolution of a run's export."""
    from pixsigma.config import DiTConfig

    return DiTConfig.from_dict(_read_json(run_dir / FINAL / "pixsigma.json")["dit"]).resolution


def run_chain(preset: str = "quick", runs_dir: str | Path = "runs/lab", start_from: str = "shipped",
              on_event: EventFn | None = None, world: str | None = None, until: str | None = None) -> dict[str, Any]:
    """Run (or continue) the chain of ``preset`` in ``runs_dir`` in this process; returns ``chain.json``'s content.
    ``on_event`` gets dicts: ``{"event": "stage", "name", "state"}`` (preparing, running, scoring, done, skipped),
    ``{"event": "progress", "name", "phase", "done", "total", "rate", "eta_s", "message"}``, ``{"event": "score",
    "name", "point", "step", "shapesbench"}`` and ``{"event": "chain", "state"}`` (done, stopped, failed)."""
    with acquire(runs_dir, doing="chain"):  # one chain per folder: refused at once while another holds it
        return Chain(preset, runs_dir, start_from, on_event, world).run(until)


def launch_chain(preset: str, runs_dir: str | Path, start_from: str = "shipped", ablation: str | None = None,
                 python: str = sys.executable, until: str | None = None, held: Sequence[Lease] = ()) -> int:
    """Start ``python -m train.chain`` detached (its own session, output in ``DIR/chain.log``); returns its pid.
    ``until``: stop after that stage (a plan step's name). Refused while the folder's chain is running.
    The chain inherits the folder's lock and ``held``'s (``train.runlock.spawn``)."""
    runs_dir = Path(runs_dir)
    if chain_status(runs_dir)["state"] == "running":
        raise ValueError(f"the chain in {runs_dir} is still running: stop it first")
    if preset not in PRESETS or start_from not in STARTS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)} and start_from one of {', '.join(STARTS)}, "
                         f"got {preset!r}, {start_from!r}")
    runs_dir.mkdir(parents=True, exist_ok=True)
    lease = acquire(runs_dir, doing="chain")  # atomic with the start: a second launch is refused here
    cmd = [python, "-m", companion("train.chain"), "--preset", preset, "--runs-dir", str(runs_dir),
           "--from", start_from]
    if ablation:
        cmd += ["--ablation", ablation]
    if until:
        cmd += ["--until", until]
    # an installed child runs in the runs folder, not site-packages
    with lease, open(runs_dir / CHAIN_LOG, "ab") as out:
        proc = spawn(cmd, [lease, *held], cwd=CHECKOUT or runs_dir, env=child_env(dict(os.environ)),
                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _write_json({"pid": proc.pid, "preset": preset, "start_from": start_from, "state": "running",
                 "started": time.time(), "current": None, "error": None}, runs_dir / CHAIN_RUN)
    return proc.pid


def stop_chain(runs_dir: str | Path) -> None:
    """Ask the chain to stop: the running stage checkpoints and exits, and no later stage starts."""
    runs_dir = Path(runs_dir)
    (runs_dir / STOP).touch()
    current = _read_json(runs_dir / CHAIN_RUN).get("current")
    if current and (runs_dir / current).is_dir():
        (runs_dir / current / STOP).touch()


def _thin(points: list[list[float]], n: int) -> list[list[float]]:
    if len(points) <= n:
        return points
    step = len(points) / n
    return [points[int(i * step)] for i in range(n)] + [points[-1]]


def stage_status(run_dir: Path, planned_steps: int, chain_alive: bool, current: bool) -> dict[str, Any]:
    """One stage of ``chain_status`` from its run folder's files."""
    status = read_status(run_dir) or {}
    bench = _read_json(run_dir / BENCH)
    rows = read_metrics(run_dir)
    step = int(status.get("step") or (rows[-1]["step"] if rows else 0))
    total = int(status.get("total_steps") or planned_steps)
    rate = rows[-1]["steps_per_s"] if rows else None
    shipped = bench.get("source") == "shipped"
    if "final" in bench:
        state = "done"
    elif status.get("state") == "error" or (current and not chain_alive and status.get("state") in LIVE_STATES):
        state = "failed"
    elif current and chain_alive:
        state = "running"
    elif status.get("state") == "stopped":
        state = "stopped"
    else:
        state = "pending"
    phase = None
    prepare = _read_json(run_dir / PREPARE)
    if state == "running":
        phase = "training" if status.get("state") in LIVE_STATES else ("preparing" if prepare else "scoring")
    samples = sorted(str(p) for p in (run_dir / SAMPLES).glob("*.png")) if (run_dir / SAMPLES).is_dir() else []
    last = samples[-1].rsplit("_", 1)[0] if samples else None
    return {"state": state, "phase": phase, "step": 0 if shipped else step, "total_steps": 0 if shipped else total,
            "steps_per_s": rate, "eta_s": round((total - step) / rate, 1) if rate and state == "running" else None,
            "loss": _thin([[r["step"], r["loss"]] for r in rows], LOSS_POINTS),
            "samples": [s for s in samples if s.rsplit("_", 1)[0] == last], "prepare": prepare or None,
            "score": bench.get("final"), "start_score": bench.get("start"), "curve": bench.get("curve"),
            "seconds": bench.get("seconds"), "error": status.get("error"), "run_dir": str(run_dir),
            "shipped": shipped}


def chain_status(runs_dir: str | Path) -> dict[str, Any]:
    """Where the chain in ``runs_dir`` is, read from files only (any process, any time):
    ``{state, preset, start_from, pid, current, error, chain_json, plot, stages: [{name, state, phase, step,
    total_steps, steps_per_s, eta_s, loss: [[step, loss]], samples: [png paths], prepare, score, start_score,
    curve, seconds, error, run_dir, shipped}]}``; ``state`` is ``none`` before any chain ran there."""
    runs_dir = Path(runs_dir)
    plan = _read_json(runs_dir / CHAIN_PLAN)
    record = _read_json(runs_dir / CHAIN_RUN)
    alive = _pid_alive(record.get("pid")) and record.get("state") == "running"
    state = record.get("state", "none")
    if state == "running" and not alive:
        state = "failed"  # killed: a rerun continues from the last checkpoint
    stages = []
    for row in plan.get("stages", []):
        s = stage_status(runs_dir / row["name"], row["steps"], alive, record.get("current") == row["name"])
        stages.append({"name": row["name"], "config": row["config"], "resolution": row["resolution"], **s})
    return {"state": state, "preset": plan.get("preset") or record.get("preset"),
            "start_from": plan.get("start_from") or record.get("start_from"), "pid": record.get("pid"),
            "current": record.get("current"), "error": record.get("error"),
            "chain_json": str(runs_dir / CHAIN_JSON) if (runs_dir / CHAIN_JSON).is_file() else None,
            "plot": str(runs_dir / CHAIN_PLOT) if (runs_dir / CHAIN_PLOT).is_file() else None, "stages": stages}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.chain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="quick")
    ap.add_argument("--runs-dir", default="runs/lab", help="where the chain's runs, data, caches and results go")
    ap.add_argument("--from", dest="start_from", choices=STARTS, default="shipped",
                    help="α: the shipped demo α, or trained from random weights")
    ap.add_argument("--ablation", choices=("kv",), default=None,
                    help="kv: after the res-up stage, train the KV stage with each operator and layer placement")
    ap.add_argument("--until", default=None, help="stop after this stage (alpha, sigma_vae, sigma_resup, ...): "
                    "the stages before it run first unless they are done")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    def show(e: Event) -> None:
        if e["event"] == "progress":
            rate = f" {e['rate']:.1f}/s" if e.get("rate") else ""
            eta = f" ETA {e['eta_s']:.0f} s" if e.get("eta_s") else ""
            print(f"[chain] {e['name']}: {e['message']}{rate}{eta}", flush=True)
        elif e["event"] == "score":
            shown = {k: v for k, v in e["shapesbench"].items() if k != "per_prompt"}
            print(f"[chain] {e['name']} {e['point']}: {json.dumps(shown)}", flush=True)
        else:
            print(f"[chain] {json.dumps({k: v for k, v in e.items() if k != 'time'})}", flush=True)

    exit_if_busy(args.runs_dir, doing="chain")  # the folder is this chain's until it exits
    if args.ablation == "kv":
        from .ablation import format_table, run_kv_ablation

        result = run_kv_ablation(Chain(args.preset, args.runs_dir, args.start_from, on_event=show))
        print(format_table(result))
        return 0
    summary = run_chain(args.preset, args.runs_dir, args.start_from, on_event=show, until=args.until)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
