"""The names of the files in a run folder: the one contract between the trainer and whoever watches it.

The trainer (``train.monitor``, ``train.loop``, ``train.checkpoint``) writes them; the app's Train tab and the
shapes build read them. Standard library only, so a reader never loads torch or accelerate to find a file.

- ``status.json``: ``{state, step, total_steps, last_loss, samples, error, pid, updated, ...}``, replaced
  atomically; ``state`` is one of ``STATES``.
- ``metrics.jsonl``: one JSON object per optimizer step (``{step, loss, lr, ...}``).
- ``log.txt``: the run's messages; ``stdout.txt``: what a trainer the app started printed before that.
- ``STOP``: created by anyone to ask the run to checkpoint and exit (removed when honoured).
- ``launch.json``: how the app started the run (its Resume repeats the command with ``--resume``).
- ``config.yaml``: the resolved config; ``samples/``: validation images; ``tensorboard/``: optional.
- ``prepare.json``: what ``train.prepare`` is making before the run starts (phase, done/total, images/s, ETA).
- ``bench.json``: the chain's held-out scores of the run (its starting point, checkpoints and export).
- ``checkpoints/step_NNNNNNNN/``: resumable states; ``final/`` (pixsigma layout) and ``final_diffusers/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STATUS, METRICS, LOG, STDOUT, STOP = "status.json", "metrics.jsonl", "log.txt", "stdout.txt", "STOP"
LAUNCH, CONFIG = "launch.json", "config.yaml"
PREPARE, BENCH = "prepare.json", "bench.json"
SAMPLES, TENSORBOARD = "samples", "tensorboard"
CHECKPOINTS, FINAL, FINAL_DIFFUSERS = "checkpoints", "final", "final_diffusers"
STATES = ("starting", "running", "stopped", "finished", "error")
LIVE_STATES = ("starting", "running")


def step_name(step: int) -> str:
    """A checkpoint folder's (and a validation image's) name stem for ``step``."""
    return f"step_{step:08d}"


def sample_name(step: int, index: int) -> str:
    """The file name of validation image ``index`` at ``step`` (under ``SAMPLES``)."""
    return f"{step_name(step)}_{index}.png"


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``status.json`` (None when it has none yet)."""
    path = Path(run_dir) / STATUS
    return json.loads(path.read_text()) if path.is_file() else None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """step, loss, time and steps/s of each row of a run's metrics log (a half-written row is skipped)."""
    rows: list[dict[str, Any]] = []
    try:
        lines = (Path(run_dir) / METRICS).read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
            rows.append({"step": int(row["step"]), "loss": float(row["loss"]), "time": row.get("time"),
                         "steps_per_s": row.get("steps_per_s")})
        except (ValueError, KeyError, TypeError):
            continue
    return rows
