"""Resuming, stopping, checkpoint atomicity/retention and the status file, on a cached-feature tiny run."""

from __future__ import annotations

import json
import os

import pytest
import torch
from fixtures import make_encoders, make_images, write_config
from safetensors.torch import load_file

from train.checkpoint import checkpoint_dirs, checkpoint_model
from train.config import load_config
from train.extract import extract
from train.loop import Trainer, train
from train.monitor import STOP, read_status


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    enc = make_encoders(root / "enc")
    data = {"source": str(make_images(root / "imgs")), "cache": str(root / "cache"), "text_encoder": str(enc),
            "vae": str(enc)}
    extract(load_config(write_config(root / "x.yaml", stage="from_scratch", data=data)))
    return root / "cache"


def _cfg(tmp_path, cache, name, **over):
    # 8 samples in buckets of 4/2/2 -> 4 batches of 2 an epoch; 2 per step: 6 steps cross 3 epochs
    base = dict(stage="from_scratch", output_dir=str(tmp_path / name), steps=6, grad_accum=2, save_every=3,
                keep_last=5, caption_dropout=0.5, data={"cache": str(cache), "long_caption_ratio": 0.6},
                optim={"ema_decay": 0.9, "warmup_steps": 2, "lr": 1e-3})
    return load_config(write_config(tmp_path / f"{name}.yaml", **{**base, **over}))


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_a_kill_equals_a_straight_run(tmp_path, cache, monkeypatch):
    straight = train(_cfg(tmp_path, cache, "straight"))
    cfg = _cfg(tmp_path, cache, "killed")
    real_step = Trainer.optimizer_step

    def dies_in_step_5(self):  # after step 4 was logged; the last checkpoint is step 3's
        if self.state.step == 4:
            raise RuntimeError("killed")
        return real_step(self)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "optimizer_step", dies_in_step_5)
        with pytest.raises(RuntimeError, match="killed"):
            train(cfg)
    assert read_status(cfg.run_dir)["state"] == "error" and "killed" in read_status(cfg.run_dir)["error"]
    assert [p.name for p in checkpoint_dirs(cfg.run_dir)] == ["step_00000003"]
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(cfg)  # a fresh start would mix two runs' checkpoints
    resumed = train(cfg, resume=True)
    assert straight["step"] == resumed["step"] == 6

    a, b = _metrics(tmp_path / "straight"), _metrics(cfg.run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # step 4 redone, logged once
    assert [r["lr"] for r in a] == [5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]  # 2 warm-up steps
    assert [r["indices"] for r in a] == [r["indices"] for r in b]  # the same data order, epochs crossed
    assert {r["epoch"] for r in a} == {0, 1, 2}
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)  # same noise, dropout
    wa = load_file(tmp_path / "straight" / "final" / "model.safetensors")  # EMA weights
    wb = load_file(cfg.run_dir / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    raw_a = load_file(tmp_path / "straight" / "checkpoints" / "step_00000006" / "model.safetensors")
    raw_b = load_file(cfg.run_dir / "checkpoints" / "step_00000006" / "model.safetensors")
    assert any(not torch.equal(raw_a[k], wa[k]) for k in wa)  # final/ really is the EMA, not the raw weights
    for k in raw_a:
        torch.testing.assert_close(raw_a[k], raw_b[k], rtol=1e-5, atol=1e-6)
    # a checkpoint's model (the curves' input) is its EMA, as final/ ships; ema=False gives the raw weights
    last = tmp_path / "straight" / "checkpoints" / "step_00000006"
    ema_sd, raw_sd = checkpoint_model(last).state_dict(), checkpoint_model(last, ema=False).state_dict()
    for k in wa:
        torch.testing.assert_close(ema_sd[k], wa[k].float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(raw_sd[k], raw_a[k].float(), rtol=1e-5, atol=1e-6)


def test_stop_file_checkpoints_and_exits_cleanly(tmp_path, cache, monkeypatch):
    cfg = _cfg(tmp_path, cache, "stopped", save_every=100)
    seen = []
    real_step = Trainer.optimizer_step

    def stop_after_2(self):
        seen.append(read_status(cfg.run_dir))
        if self.state.step == 1:
            (cfg.run_dir / STOP).touch()
        return real_step(self)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "optimizer_step", stop_after_2)
        result = train(cfg)
    assert result == {"state": "stopped", "step": 2, "run_dir": str(cfg.run_dir), "exports": {}}
    assert seen[1]["state"] == "running" and seen[1]["step"] == 1 and seen[1]["pid"] == os.getpid()
    status = read_status(cfg.run_dir)
    assert (status["state"], status["step"], status["total_steps"], status["error"]) == ("stopped", 2, 6, None)
    assert status["last_loss"] == pytest.approx(_metrics(cfg.run_dir)[-1]["loss"])
    assert [p.name for p in checkpoint_dirs(cfg.run_dir)] == ["step_00000002"]
    assert not (cfg.run_dir / STOP).exists() and not (cfg.run_dir / "final").exists()
    log = (cfg.run_dir / "log.txt").read_text()
    assert "running from step 0 of 6" in log and log.rstrip().endswith("stopped at step 2")
    result = train(cfg, resume=True)
    assert result["state"] == "finished" and result["step"] == 6 and (cfg.run_dir / "final").is_dir()
    assert read_status(cfg.run_dir)["state"] == "finished"


def test_checkpoints_are_atomic_and_only_the_last_k_kept(tmp_path, cache, monkeypatch):
    cfg = _cfg(tmp_path, cache, "ckpt", steps=4, save_every=1, keep_last=2, grad_accum=1)
    from accelerate import Accelerator

    real_save = Accelerator.save_state

    def crash_in_save_3(self, output_dir, **kw):
        if output_dir.endswith("step_00000003"):
            with open(os.path.join(output_dir, "model.safetensors"), "wb") as f:
                f.write(b"half a file")
            raise OSError("disk full")
        return real_save(self, output_dir, **kw)

    with monkeypatch.context() as m:
        m.setattr(Accelerator, "save_state", crash_in_save_3)
        with pytest.raises(OSError, match="disk full"):
            train(cfg)
    ckdir = cfg.run_dir / "checkpoints"
    assert [p.name for p in checkpoint_dirs(cfg.run_dir)] == ["step_00000001", "step_00000002"]
    assert (ckdir / ".tmp-step_00000003").is_dir()  # the partial one never got a checkpoint name
    result = train(cfg, resume=True)  # resumes from step 2, cleans the partial folder
    assert result["step"] == 4
    assert sorted(p.name for p in ckdir.iterdir()) == ["step_00000003", "step_00000004"]
    for p in checkpoint_dirs(cfg.run_dir):
        assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "pixsigma.json"} <= set(os.listdir(p))


def test_steps_are_logged_a_window_at_a_time_each_with_its_own_row(tmp_path, cache, monkeypatch):
    """The device is read (losses, grad norms) once per log_every window, at checkpoints and at the end, not
    once a step; metrics.jsonl still gets one row per step, equal to a run that flushes every step."""
    flushes = []
    real_flush = Trainer.flush

    def counting_flush(self, pending):
        flushes.append([p["step"] for p in pending])
        return real_flush(self, pending)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "flush", counting_flush)
        train(_cfg(tmp_path, cache, "windowed", log_every=4, save_every=100))
        every = train(_cfg(tmp_path, cache, "every", log_every=1, save_every=100))
    assert flushes[:2] == [[1, 2, 3, 4], [5, 6]]  # a window of 4, then the end
    assert len(flushes) == 2 + 6
    a, b = _metrics(tmp_path / "windowed"), _metrics(tmp_path / "every")
    assert every["step"] == 6 and [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-6)
    assert all(isinstance(r["loss"], float) and isinstance(r["grad_norm"], float) for r in a)
    assert [r["indices"] for r in a] == [r["indices"] for r in b]
