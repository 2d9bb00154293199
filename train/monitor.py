"""What a run shows and answers while it trains: progress bar, metrics log, status file, stop requests.

The main process writes the run folder's files (``train.runfiles`` names them and says what each holds):
a ``metrics.jsonl`` row per optimizer step, a ``log.txt`` line every ``log_every`` steps, ``status.json``
for other processes (the app's Train tab) to poll, and ``tensorboard/`` when that package is installed; a
``STOP`` file asks the run to checkpoint and exit cleanly.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pixsigma.io import atomic_write_json, atomic_write_text

from .runfiles import LOG, METRICS, STATES, STATUS, STOP, TENSORBOARD

__all__ = ["Monitor", "write_status"]


def write_status(run_dir: Path, status: dict[str, Any]) -> None:
    """Atomically replace ``status.json`` (a reader never sees half a file)."""
    atomic_write_json(status, run_dir / STATUS)


class Monitor:
    """The main process logs and writes files; on other processes every method is a no-op."""

    def __init__(self, run_dir: Path, total_steps: int, active: bool):
        self.run_dir, self.total, self.active = run_dir, total_steps, active
        self.status: dict[str, Any] = {"state": "starting", "step": 0, "total_steps": total_steps,
                                       "last_loss": None, "samples": [], "error": None, "pid": os.getpid()}
        self.bar = self.tb = None
        self._t0, self._step0 = time.monotonic(), 0
        if active:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.update(state="starting")

    def update(self, **fields: Any) -> None:
        bad = fields.get("state")
        if bad is not None and bad not in STATES:
            raise ValueError(f"status state must be one of {STATES}, got {bad!r}")
        self.status.update(fields, updated=time.time())
        if self.active:
            write_status(self.run_dir, self.status)

    def start(self, step: int) -> None:
        """Training begins (or resumes) at ``step``."""
        self._t0, self._step0 = time.monotonic(), step
        if not self.active:
            return
        (self.run_dir / STOP).unlink(missing_ok=True)  # a stale request from a finished run
        metrics = self.run_dir / METRICS
        if metrics.is_file():  # resuming: drop the rows of steps after the checkpoint, they are redone
            rows = metrics.read_text().splitlines(keepends=True)
            atomic_write_text(metrics, "".join(r for r in rows if r.strip() and json.loads(r)["step"] <= step))
        self.bar = tqdm(total=self.total, initial=step, desc=self.run_dir.name, dynamic_ncols=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / TENSORBOARD))
        except ImportError:  # tensorboard is optional
            self.tb = None
        self.update(state="running", step=step)
        self._log_line(f"running from step {step} of {self.total}")

    def stop_requested(self) -> bool:
        return self.active and (self.run_dir / STOP).exists()

    def log(self, step: int, metrics: dict[str, Any], write_status_file: bool = True) -> None:
        if not self.active:
            return
        rate = (step - self._step0) / max(time.monotonic() - self._t0, 1e-9)
        row = {"step": step, **metrics, "steps_per_s": round(rate, 4), "time": time.time()}
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", refresh=False)
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if write_status_file:
            self.update(step=step, last_loss=metrics.get("loss"))
            self._log_line(f"step {step}/{self.total} loss {metrics.get('loss', float('nan')):.4f} "
                           f"lr {metrics.get('lr', 0):.3g} {rate:.3g} steps/s")

    def _log_line(self, line: str) -> None:
        with open(self.run_dir / LOG, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def note(self, message: str) -> None:
        """A line for the console (kept out of the progress bar's way) and ``log.txt``."""
        if self.active:
            (tqdm.write if self.bar is not None else print)(f"[train] {message}")
            self._log_line(message)

    def close(self, state: str, error: str | None = None, **fields: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if state == "stopped" and self.active:
            (self.run_dir / STOP).unlink(missing_ok=True)
        self.update(state=state, error=error, **fields)
        if self.active:
            self._log_line(f"{state} at step {self.status['step']}" + (f": {error}" if error else ""))
