"""The objective: PixArt's DDPM schedule, ε MSE + frozen-mean learned-variance VLB, caption dropout."""

from __future__ import annotations

import math

import pytest
import torch

from train.diffusion import GaussianDiffusion
from train.loop import drop_captions


@pytest.fixture(scope="module")
def diff():
    return GaussianDiffusion()


def test_schedule_matches_diffusers_linear_ddpm(diff):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    torch.testing.assert_close(diff.tables["sqrt_ac"].float() ** 2, ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    t = torch.arange(1, 1000)
    post_var = torch.stack([ref._get_variance(int(i)) for i in t])  # diffusers' posterior variance
    # diffusers computes in fp32
    torch.testing.assert_close(diff.tables["post_logvar"][t].exp().float(), post_var, rtol=1e-3, atol=1e-10)
    assert diff.tables["post_logvar"][0] == diff.tables["post_logvar"][1]  # clipped at t = 0


def test_q_sample(diff):
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 500, 999])
    xt = diff.q_sample(x0, t, noise)
    ac = diff.tables["sqrt_ac"][t].float() ** 2
    for i in range(3):
        torch.testing.assert_close(xt[i], ac[i].sqrt() * x0[i] + (1 - ac[i]).sqrt() * noise[i])


def test_the_true_model_has_zero_loss(diff):
    # ε = the true noise and the posterior's own variance (var value -1): MSE 0 and KL 0 for t > 0
    x0, noise = torch.randn(4, 4, 8, 8).clamp(-0.9, 0.9), torch.randn(4, 4, 8, 8)
    t = torch.tensor([1, 10, 400, 999])
    xt = diff.q_sample(x0, t, noise)
    out = torch.cat([noise, -torch.ones_like(noise)], 1)
    terms = diff.training_losses(out, x0, xt, t, noise)
    assert terms["mse"].abs().max() < 1e-10 and terms["vb"].abs().max() < 1e-4
    worse = diff.training_losses(torch.cat([noise, torch.ones_like(noise)], 1), x0, xt, t, noise)
    assert (worse["vb"][:2] > 1e-3).all() and (worse["vb"] >= 0).all()  # β_t instead of the posterior
    # variance costs bits where they differ (small t; for large t the two are nearly equal)
    at0 = diff.training_losses(out, x0, xt, torch.zeros(4, dtype=torch.long), noise)["vb"]
    assert torch.isfinite(at0).all() and (at0 > 0).all()  # the discretised decoder NLL at t = 0


def test_vb_trains_only_the_variance_channels(diff):
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([5, 700])
    xt = diff.q_sample(x0, t, noise)
    out = torch.randn(2, 8, 4, 4, requires_grad=True)
    terms = diff.training_losses(out, x0, xt, t, noise)
    terms["loss"].sum().backward()
    mse_grad = 2 * (out[:, :4] - noise).detach() / (4 * 4 * 4)
    torch.testing.assert_close(out.grad[:, :4], mse_grad)  # the VLB does not move the mean
    assert out.grad[:, 4:].abs().sum() > 0
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    eps_only = diff.training_losses(out[:, :4].detach(), x0, xt, t, noise)  # no learned variance: MSE alone
    assert (eps_only["vb"] == 0).all() and math.isclose(eps_only["loss"].sum().item(), terms["mse"].sum().item(),
                                                        rel_tol=1e-6)


def test_caption_dropout_uses_the_null_caption():
    y, mask = torch.randn(6, 5, 3), torch.ones(6, 5, dtype=torch.long)
    y_null, m_null = torch.randn(1, 1, 3), torch.ones(1, 1, dtype=torch.long)
    yd, md = drop_captions(y, mask, y_null, m_null, 1.0)
    assert torch.equal(yd[:, :1], y_null.expand(6, 1, 3)) and (yd[:, 1:] == 0).all()
    assert md.tolist() == [[1, 0, 0, 0, 0]] * 6
    yk, mk = drop_captions(y, mask, y_null, m_null, 0.0)
    assert yk is y and mk is mask
    torch.manual_seed(0)
    drops = sum((drop_captions(y, mask, y_null, m_null, 0.1)[1].sum(1) == 1).sum().item() for _ in range(500))
    assert 0.07 < drops / 3000 < 0.13


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighs_each_samples_mse_and_leaves_the_vlb(prediction_type):
    """Min-SNR-γ: the x₀-MSE weight becomes min(SNR, γ), i.e. min(SNR, γ)/SNR on ε and /(SNR + 1) on v."""
    plain = GaussianDiffusion(prediction_type=prediction_type)
    snr5 = GaussianDiffusion(prediction_type=prediction_type, snr_gamma=5.0)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 20, 300, 999])
    xt = plain.q_sample(x0, t, noise)
    out = torch.randn(4, 8, 8, 8)
    a, b = plain.training_losses(out, x0, xt, t, noise), snr5.training_losses(out, x0, xt, t, noise)
    ac = plain.tables["sqrt_ac"][t] ** 2
    snr = ac / (1 - ac)  # float64: t = 0 has SNR 1e4, t = 999 about 4e-5
    want = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr if prediction_type == "epsilon"
                                                                         else snr + 1)
    torch.testing.assert_close(snr5.mse_weight(t), want.float())
    torch.testing.assert_close(b["mse"], a["mse"])  # reported unweighted
    torch.testing.assert_close(b["vb"], a["vb"])
    torch.testing.assert_close(b["loss"], want.float() * a["mse"] + a["vb"])
    assert (plain.mse_weight(t) == 1).all() and torch.equal(a["loss"], a["mse"] + a["vb"])
    if prediction_type == "epsilon":  # noisy samples (SNR < γ) keep weight 1, near-clean ones are cut
        assert b["loss"][3] == a["loss"][3] and snr5.mse_weight(t)[0] < 1e-3
    with pytest.raises(ValueError, match="snr_gamma must be > 0"):
        GaussianDiffusion(snr_gamma=0.0)


def test_timestep_band_draws_its_share_of_each_batch_in_the_band():
    """[200, 700, 0.5]: half of each batch in the band, the rest uniform over all 1000; off = uniform."""
    torch.manual_seed(0)
    band = GaussianDiffusion(timestep_band=(200, 700, 0.5))
    t = torch.stack([band.sample_timesteps(16, torch.device("cpu")) for _ in range(500)])  # (500, 16)
    assert ((t[:, :8] >= 200) & (t[:, :8] <= 700)).all()
    assert t[:, :8].min() == 200 and t[:, :8].max() == 700  # both ends reachable
    inside = ((t[:, 8:] >= 200) & (t[:, 8:] <= 700)).float().mean()
    assert 0.45 < inside < 0.55 and t[:, 8:].min() < 20 and t[:, 8:].max() > 980  # the rest: the whole range
    plain = torch.cat([GaussianDiffusion().sample_timesteps(16, torch.device("cpu")) for _ in range(500)])
    assert 0.45 < ((plain >= 200) & (plain <= 700)).float().mean() < 0.55
    with pytest.raises(ValueError, match=r"timestep_band must be \[low, high, share\]"):
        GaussianDiffusion(timestep_band=(0, 999, 1.5))
