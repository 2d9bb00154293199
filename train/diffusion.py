"""PixArt's training objective: 1000-step linear-β DDPM, ε-prediction MSE plus the learned-variance VLB.

``prediction_type="v_prediction"`` (the model's ``DiTConfig.prediction_type``) regresses
v = √ᾱ·ε − √(1−ᾱ)·x₀ instead: same network, same VLB (on the ε that v implies), but the loss no longer
vanishes for the x₀ error at high noise, where ε-MSE weighs it by SNR (≈ 3e-4 at t = 900).

As in improved-DDPM / DiT / PixArt (``LossType.MSE`` with ``learn_sigma``): ``loss = mse(ε) + vb``, where
``vb`` is the variational bound term (KL to the true posterior; the discretised decoder NLL at t = 0) of
the model whose mean comes from the *detached* ε and whose variance interpolates, per element, between
the clipped posterior variance and β_t (``learned_range``). Detaching keeps the mean trained by the MSE
alone, so checkpoints stay compatible with the released ones (their sampler reads both halves).

``snr_gamma`` (off by default, as in PixArt) weighs each sample's MSE by Min-SNR-γ (Hang et al., 2023):
min(SNR, γ)/SNR for ε and min(SNR, γ)/(SNR + 1) for v, i.e. the x₀-MSE weight min(SNR, γ) either way, so
near-clean timesteps stop dominating the gradient. The VLB is left unweighted; ``mse`` is reported unweighted.

``timestep_band`` (off by default: PixArt draws t uniformly) = (low, high, share) draws ``share`` of each
batch's timesteps uniformly from [low, high] and the rest from the whole range: more of a small model's
training where its samples go wrong.
"""

from __future__ import annotations

import math

import torch

from pixsigma.config import PREDICTION_TYPES
from pixsigma.constants import NUM_TRAIN_TIMESTEPS

from .config import check_timestep_band

Tensor = torch.Tensor
BETA_START, BETA_END = 1e-4, 0.02


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) element-wise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) of a Gaussian discretised into 255 bins on [-1, 1] (the t = 0 decoder term)."""
    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """Schedule tables in float64 (as improved-DDPM computes them), gathered per sample in float32."""

    def __init__(self, num_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                 beta_end: float = BETA_END, prediction_type: str = "epsilon", snr_gamma: float | None = None,
                 timestep_band: tuple[int, int, float] | None = None):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if snr_gamma is not None and not snr_gamma > 0:
            raise ValueError(f"snr_gamma must be > 0 (Min-SNR-γ; paper: 5) or None (off), got {snr_gamma!r}")
        self.num_timesteps, self.prediction_type, self.snr_gamma = num_timesteps, prediction_type, snr_gamma
        self.timestep_band = None if timestep_band is None else check_timestep_band(timestep_band, num_timesteps)
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.tables = {
            "sqrt_ac": ac.sqrt(), "sqrt_1m_ac": (1.0 - ac).sqrt(),
            "sqrt_recip_ac": (1.0 / ac).sqrt(), "sqrt_recipm1_ac": (1.0 / ac - 1.0).sqrt(),
            "log_betas": betas.log(),
            # the posterior variance is 0 at t = 0: its log is clipped to the t = 1 value
            "post_logvar": torch.cat([post_var[1:2], post_var[1:]]).log(),
            "post_c1": betas * ac_prev.sqrt() / (1.0 - ac), "post_c2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
            "snr": ac / (1.0 - ac),
        }

    def _at(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        v = self.tables[name].to(t.device)[t].float()  # (B,)
        return v.reshape(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, batch: int, device: torch.device) -> Tensor:
        """(B,) timesteps: uniform, or ``share`` of them (rounded down, per batch) from the band."""
        t = torch.randint(0, self.num_timesteps, (batch,), device=device)
        if self.timestep_band is not None:
            low, high, share = self.timestep_band
            k = int(batch * share)
            t[:k] = torch.randint(low, high + 1, (k,), device=device)
        return t

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self._at("sqrt_ac", t, x0) * x0 + self._at("sqrt_1m_ac", t, x0) * noise

    def target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the model regresses: ε, or v = √ᾱ·ε − √(1−ᾱ)·x₀."""
        if self.prediction_type == "epsilon":
            return noise
        return self._at("sqrt_ac", t, x0) * noise - self._at("sqrt_1m_ac", t, x0) * x0

    def to_eps(self, pred: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """The ε a prediction implies (ε = √ᾱ·v + √(1−ᾱ)·x_t for v)."""
        if self.prediction_type == "epsilon":
            return pred
        return self._at("sqrt_ac", t, xt) * pred + self._at("sqrt_1m_ac", t, xt) * xt

    def mse_weight(self, t: Tensor) -> Tensor:
        """(B,) Min-SNR-γ weight of each sample's MSE at timesteps ``t`` (ones when ``snr_gamma`` is off)."""
        snr = self._at("snr", t, t)  # (B,)
        if self.snr_gamma is None:
            return torch.ones_like(snr)
        clipped = snr.clamp(max=self.snr_gamma)
        return clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1.0)

    def _posterior_mean(self, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        return self._at("post_c1", t, xt) * x0 + self._at("post_c2", t, xt) * xt

    def vb_terms(self, x0: Tensor, xt: Tensor, t: Tensor, eps: Tensor, var_values: Tensor) -> Tensor:
        """Per-sample VLB (bits/dim) of the model with ε ``eps`` and ``learned_range`` values in [-1, 1]."""
        frac = (var_values + 1.0) / 2.0
        model_logvar = frac * self._at("log_betas", t, xt) + (1.0 - frac) * self._at("post_logvar", t, xt)
        pred_x0 = self._at("sqrt_recip_ac", t, xt) * xt - self._at("sqrt_recipm1_ac", t, xt) * eps
        model_mean = self._posterior_mean(pred_x0, xt, t)
        true_mean = self._posterior_mean(x0, xt, t)
        kl = _mean_flat(normal_kl(true_mean, self._at("post_logvar", t, xt), model_mean, model_logvar)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_output: Tensor, x0: Tensor, xt: Tensor, t: Tensor,
                        noise: Tensor) -> dict[str, Tensor]:
        """Per-sample ``mse`` (of ε or v), ``vb`` (0 without learned variance) and ``loss`` for a model output
        at (xt, t)."""
        c = x0.shape[1]
        out = model_output.float()
        pred = out[:, :c]  # (B, C, H, W)
        mse = _mean_flat((self.target(x0, t, noise) - pred) ** 2)
        if out.shape[1] == 2 * c:  # learned variance: the frozen-mean VLB trains only the variance channels
            vb = self.vb_terms(x0, xt, t, self.to_eps(pred.detach(), xt, t), out[:, c:])
        else:
            vb = torch.zeros_like(mse)
        return {"loss": self.mse_weight(t) * mse + vb, "mse": mse, "vb": vb}
