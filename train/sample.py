"""Validation images during training: DPM-Solver++ with classifier-free guidance on the model being trained.

Decoded with the run's VAE when it has one built (training from images); a run on a feature cache never
builds the VAE, so its images are cheap latent previews (a fixed linear map of the 4 latent channels to
RGB at latent resolution).
"""

from __future__ import annotations

import torch

from pixsigma.config import DiTConfig
from pixsigma.constants import DEFAULT_GUIDANCE, VAE_SCALE_FACTOR
from pixsigma.sampling import denoise, initial_noise, make_scheduler, micro_conditions

Tensor = torch.Tensor


def micro_kwargs(config: DiTConfig, latents: Tensor) -> dict[str, Tensor]:
    """``pixsigma.sampling.micro_conditions`` (fp32) for the images of latents (B, C, h, w)."""
    h, w = latents.shape[-2:]
    return micro_conditions(config, latents.shape[0], h * VAE_SCALE_FACTOR, w * VAE_SCALE_FACTOR, torch.float32,
                            latents.device)


def pad_tokens(y: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Caption features (B, L, C) and mask (B, L) zero-padded to ``length`` tokens (masked out)."""
    extra = length - y.shape[1]
    if extra <= 0:
        return y, mask
    return (torch.cat([y, y.new_zeros(y.shape[0], extra, y.shape[2])], 1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1))


@torch.no_grad()
def generate_latents(model: torch.nn.Module, y: Tensor, mask: Tensor, y_null: Tensor, mask_null: Tensor,
                     size: tuple[int, int], steps: int, seed: int, guidance: float = DEFAULT_GUIDANCE) -> Tensor:
    """Latents (B, C, h/8, w/8) for prompt features y (B, L, C_text) with CFG against y_null (1, L0, C_text),
    through the engine's own sampling loop. Uses its own generator: the training RNG streams are untouched
    (resume equivalence)."""
    device = next(model.parameters()).device
    sched = make_scheduler("dpm-solver", prediction_type=model.config.prediction_type)
    b, c = y.shape[0], model.config.in_channels
    x, gen = initial_noise((b, c, size[0] // VAE_SCALE_FACTOR, size[1] // VAE_SCALE_FACTOR), seed, device,
                           torch.float32, sched.init_noise_sigma)
    length = max(y.shape[1], y_null.shape[1])
    y, mask = pad_tokens(y, mask, length)
    y_null, mask_null = pad_tokens(y_null, mask_null, length)
    cond = torch.cat([y_null.expand(b, -1, -1), y]).to(device)  # (2B, L, C_text): [uncond; cond]
    cmask = torch.cat([mask_null.expand(b, -1), mask]).to(device)

    def model_fn(xx: Tensor, t: Tensor) -> Tensor:
        return model(xx, t, cond, cmask, **micro_kwargs(model.config, xx)).float()

    return denoise(model_fn, sched, x, steps, guidance, gen, learn_sigma=model.config.learn_sigma)
