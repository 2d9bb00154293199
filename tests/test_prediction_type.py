"""v-prediction end to end: the DiT config field, the training target, the samplers, the pipeline folder."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from fixtures import TINY_DIT, make_tiny_pipeline

from pixsigma.config import PREDICTION_TYPES, PRESETS, DiTConfig
from pixsigma.sampling import denoise, initial_noise, make_scheduler
from train.diffusion import GaussianDiffusion


def test_config_checks_and_keeps_the_prediction_type():
    with pytest.raises(ValueError, match=r"prediction_type must be one of \('epsilon', 'v_prediction'\), got 'x0'"):
        DiTConfig(prediction_type="x0")
    v = replace(TINY_DIT, prediction_type="v_prediction")
    assert DiTConfig.from_dict(v.to_dict()) == v
    assert PRESETS["demo"].prediction_type == "v_prediction"
    assert PRESETS["XL_2_1024"].prediction_type == "epsilon"  # the released PixArt weights predict ε


def _sched(d: GaussianDiffusion, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return d._at("sqrt_ac", t, like), d._at("sqrt_1m_ac", t, like)


def test_v_target_and_the_eps_it_implies():
    dv, de = GaussianDiffusion(prediction_type="v_prediction"), GaussianDiffusion()
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 4, 4, 4).clamp(-0.9, 0.9), torch.randn(3, 4, 4, 4)
    t = torch.tensor([1, 300, 999])
    xt = dv.q_sample(x0, t, noise)
    sa, s1 = _sched(dv, t, x0)
    v = dv.target(x0, t, noise)
    torch.testing.assert_close(sa * xt - s1 * v, x0)  # x₀ = √ᾱ·x_t − √(1−ᾱ)·v
    torch.testing.assert_close(dv.to_eps(v, xt, t), noise)
    assert de.target(x0, t, noise) is noise and de.to_eps(noise, xt, t) is noise
    var = torch.randn_like(noise).tanh()
    tv = dv.training_losses(torch.cat([v, var], 1), x0, xt, t, noise)
    te = de.training_losses(torch.cat([noise, var], 1), x0, xt, t, noise)
    assert tv["mse"].max() < 1e-10
    torch.testing.assert_close(tv["vb"], te["vb"])  # the same implied ε: the same variance loss
    # Why v: a prediction whose x₀ is off by 0.1 costs ~0.01 in v at any t, but SNR·0.01 in ε (≈ 4e-7 at t = 999).
    x0_bad = x0 + 0.1
    eps_bad = (xt - sa * x0_bad) / s1
    lv = dv.training_losses(sa * eps_bad - s1 * x0_bad, x0, xt, t, noise)["mse"]
    le = de.training_losses(eps_bad, x0, xt, t, noise)["mse"]
    assert 0.009 < lv[2] < 0.011 and le[2] < 1e-5
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        GaussianDiffusion(prediction_type="sample")


def _oracle(x_star: torch.Tensor, prediction_type: str):
    """The exact model of data that is the single point x_star."""
    d = GaussianDiffusion()

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.long()
        sa, s1 = _sched(d, t, x)
        eps = (x - sa * x_star) / s1
        return eps if prediction_type == "epsilon" else sa * eps - s1 * x_star
    return fn


@pytest.mark.parametrize("sampler", ["dpm-solver", "ddim", "euler-a", "default"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_samplers_read_the_prediction_type(sampler, prediction_type):
    x_star = torch.randn(2, 4, 4, 4)
    folder = {"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "epsilon"}  # the DiT's own wins
    sched = make_scheduler(sampler, folder, prediction_type)
    assert sched.config.prediction_type == prediction_type
    # The exact model is sampled exactly with the right reading; the other reading of the same outputs misses
    # by ≥ 100× as much (DDIM's last step, at t = 0 where ε and v nearly agree, repairs most of it).
    for reading, ok in ((prediction_type, True), (wrong_type(prediction_type), False)):
        sched = make_scheduler(sampler, folder, reading)
        x, gen = initial_noise(x_star.shape, 0, torch.device("cpu"), torch.float32, sched.init_noise_sigma)
        err = (denoise(_oracle(x_star, prediction_type), sched, x, 20, 1.0, gen, learn_sigma=False) - x_star).abs()
        assert (err.max() < 2e-5) if ok else (err.max() > 1e-4), (reading, err.max())


def wrong_type(prediction_type: str) -> str:
    return "epsilon" if prediction_type == "v_prediction" else "v_prediction"


@pytest.mark.parametrize("layout", ["diffusers", "pixsigma"])
def test_a_pipeline_samples_with_its_dits_prediction_type(tmp_path, monkeypatch, layout):
    """A pixsigma-layout DiT says what it predicts in pixsigma.json; a diffusers-layout one cannot, so the
    folder's scheduler config says it (as the demo's α folder does)."""
    import json

    import pixsigma.pipeline as pl

    v_dit = replace(TINY_DIT, prediction_type="v_prediction")
    folder = make_tiny_pipeline(tmp_path / layout, layout=layout, config=v_dit)
    sched_file = folder / "scheduler" / "scheduler_config.json"
    assert json.loads(sched_file.read_text())["prediction_type"] == "v_prediction"
    pipe = pl.PixSigmaPipeline.from_pretrained(str(folder), device="cpu")
    assert pipe.transformer.config.prediction_type == "v_prediction"
    seen = []
    real = pl.make_scheduler
    monkeypatch.setattr(pl, "make_scheduler", lambda *a: seen.append(a[2]) or real(*a))
    pipe.generate(pl.GenerationRequest("a red square", seed=0, steps=2, width=256, height=256))
    assert seen == ["v_prediction"]
    if layout == "pixsigma":  # a stale folder scheduler does not override the weights' own metadata
        sched_file.write_text(json.dumps({**json.loads(sched_file.read_text()), "prediction_type": "epsilon"}))
        assert pl.PixSigmaPipeline.from_pretrained(str(folder)).transformer.config.prediction_type == "v_prediction"
