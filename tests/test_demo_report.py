"""The build: its stage plan, its pipeline folders, each Σ curve's step-0 model and the plateau measure."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from fixtures import TINY_DIT, random_dit

from pixsigma.config import KVCompress
from pixsigma.demo.report import _stage_start, plateau_step
from pixsigma.weights import save_dit


def test_stage_start_is_the_previous_export_in_the_next_stages_model(tmp_path):
    prev = random_dit(TINY_DIT)
    save_dit(prev, tmp_path / "final")
    nxt = replace(TINY_DIT.at_resolution(2 * TINY_DIT.resolution), kv_compress=KVCompress(2, (1,)))
    net = _stage_start(tmp_path / "final", nxt)
    assert net.config == nxt
    sd, ref = net.state_dict(), prev.state_dict()
    new = sorted(set(sd) - set(ref))
    assert new and all(".attn.sr." in k or ".attn.norm." in k for k in new)  # only the KV layer's merge is new
    for k, v in ref.items():
        torch.testing.assert_close(sd[k], v, msg=k)
    w = sd["blocks.1.attn.sr.weight"]  # depthwise R×R conv at the average init
    torch.testing.assert_close(w, torch.full_like(w, 0.25))


def test_stage_start_refuses_weights_that_do_not_fit(tmp_path):
    save_dit(random_dit(TINY_DIT), tmp_path / "final")
    with pytest.raises(ValueError, match="does not fit the next stage"):
        _stage_start(tmp_path / "final", replace(TINY_DIT, depth=3))


def test_plateau_step_is_the_first_checkpoint_near_the_best():
    pts = [(3000, 0.20), (3100, 0.50), (3200, 0.61), (3300, 0.62), (3400, 0.60)]
    assert plateau_step(pts, 3000) == 200  # 0.61 is within 0.02 of the best 0.62
    assert plateau_step(pts, 3000, tol=0.0) == 300
    assert plateau_step([], 0) is None


def test_stage_plan_scales_batches_and_each_sigma_cache_to_what_its_stage_visits():
    from pixsigma.demo.build import stage_plan

    plan = stage_plan(1000, alpha_batch_scale=4)
    assert [(st.name, st.steps, st.batch_size, st.images) for st in plan] == [
        ("alpha", 1000, 128, None), ("sigma_vae", 100, 32, 3200), ("sigma_resup", 100, 16, 1600),
        ("sigma_kv", 100, 16, 1600)]
    assert [st.batch_size for st in stage_plan(1000)] == [32, 32, 16, 16]
    with pytest.raises(ValueError, match="alpha_batch_scale must be an integer >= 1, got 0"):
        stage_plan(1000, alpha_batch_scale=0)


def test_assemble_pipelines_replaces_stale_parts_with_the_builds(tmp_path):
    from pixsigma.demo.build import assemble_pipelines

    parts, out = tmp_path / "parts", tmp_path / "demo"
    for p in ("tokenizer", "text_encoder", "vae_alpha", "vae_sigma"):
        (parts / p).mkdir(parents=True)
        (parts / p / "weights").write_text(f"new {p}")
    (out / "sigma" / "vae").mkdir(parents=True)
    (out / "sigma" / "vae" / "stale.safetensors").write_text("an older VAE-Σ")
    assemble_pipelines(parts, out)
    assert sorted(f.name for f in (out / "sigma" / "vae").iterdir()) == ["weights"]
    assert (out / "sigma" / "vae" / "weights").read_text() == "new vae_sigma"
    assert (out / "alpha" / "vae" / "weights").read_text() == "new vae_alpha"
    assert (out / "alpha" / "text_encoder" / "weights").read_text() == "new text_encoder"
    assert json.loads((out / "sigma" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] \
        == "v_prediction"
    assert not [p for p in out.rglob(".*")]  # no temp or old folders left behind
