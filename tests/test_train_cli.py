"""The command lines: ``python -m train.extract`` then ``python -m train --set ...`` (bf16, AdamW), in a fresh
process as a user (or the app's Train tab) runs them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml
from fixtures import make_encoders, make_images, write_config
from safetensors.torch import load_file

from train.monitor import read_status

REPO = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_extract_then_train_from_the_command_line(tmp_path):
    enc = make_encoders(tmp_path / "enc")
    data = {"source": str(make_images(tmp_path / "imgs")), "cache": "cache", "text_encoder": str(enc),
            "vae": str(enc)}
    cfg = write_config(tmp_path / "cli.yaml", stage="from_scratch", data=data)
    proc = _run(["-m", "train.extract", str(cfg)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 samples" in proc.stdout and (tmp_path / "cache" / "index.json").is_file()

    proc = _run(["-m", "train", str(cfg), "--set", "mixed_precision=bf16", "--set", "optim.name=adamw",
                 "--set", "optim.betas=[0.9, 0.999]", "--set", "optim.eps=[1e-8]", "--set", "steps=3",
                 "--set", "snr_gamma=0.001", "--set", "timestep_band=[100, 900, 0.5]"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[train] finished at step 3: runs/cli" in proc.stdout
    run = tmp_path / "runs" / "cli"
    assert read_status(run)["state"] == "finished"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    # Min-SNR-γ reached the objective: γ = 0.001 cuts the MSE of every sample but those at t ≥ 826 (SNR < γ)
    assert all(r["loss"] < r["mse"] + r["vb"] - 1e-6 for r in rows)
    weights = load_file(run / "final" / "model.safetensors")
    assert {str(v.dtype) for v in weights.values()} == {"torch.float32"}  # bf16 autocast, fp32 master weights
    saved = (run / "config.yaml").read_text()
    assert "mixed_precision: bf16" in saved and "name: adamw" in saved and "snr_gamma: 0.001" in saved  # re-runnable
    assert yaml.safe_load(saved)["timestep_band"] == [100, 900, 0.5]

    proc = _run(["-m", "train", str(cfg), "--set", "optim.name=sgd"], tmp_path)
    assert proc.returncode != 0 and "optim.name must be one of ('came', 'adamw'), got 'sgd'" in proc.stderr
