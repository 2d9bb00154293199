"""Two CPU processes through ``accelerate launch`` (gloo): the data is sharded and the run finishes.

accelerate's ``--cpu`` launch of several processes goes through MPI; without it, ``--multi_gpu`` with
``ACCELERATE_USE_CPU=1`` starts the processes with torchrun and makes them use CPU + gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fixtures import make_encoders, make_images, write_config

from train.cache import FeatureCache
from train.config import load_config
from train.extract import extract
from train.monitor import read_status

REPO = Path(__file__).resolve().parent.parent


def test_two_processes_shard_the_data_and_finish(tmp_path):
    enc = make_encoders(tmp_path / "enc")
    data = {"source": str(make_images(tmp_path / "imgs")), "cache": str(tmp_path / "cache"),
            "text_encoder": str(enc), "vae": str(enc)}
    extract(load_config(write_config(tmp_path / "x.yaml", stage="from_scratch", data=data)))
    cfg = write_config(tmp_path / "run.yaml", stage="from_scratch", data={"cache": str(tmp_path / "cache")},
                       output_dir=str(tmp_path / "run"), steps=4, save_every=2)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "train", str(cfg)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = tmp_path / "run"
    assert read_status(run)["state"] == "finished" and (run / "final" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one log, written by the main process only
    buckets = FeatureCache(tmp_path / "cache").buckets
    epoch0 = []
    for r in rows:
        per_rank = [sum(micro, []) for micro in r["indices"]]
        assert len(per_rank) == 2 and all(per_rank)  # both processes trained on every step
        assert not set(per_rank[0]) & set(per_rank[1])  # on different samples
        assert len({buckets[i] for i in per_rank[0] + per_rank[1]}) == 1  # of the same shape
        if r["epoch"] == 0:
            epoch0 += per_rank[0] + per_rank[1]
    assert sorted(epoch0) == list(range(8))  # the first epoch covers every sample once
    ckpt = run / "checkpoints" / "step_00000004"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
