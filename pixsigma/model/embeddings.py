"""Embeddings of PixArt: patches, timesteps (adaLN-single), captions, and 2D sin-cos positions."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

FREQ_DIM = 256  # sinusoidal width fed to the timestep / size MLPs


def timestep_sinusoid(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) -> (N, dim) as [cos, sin] (GLIDE/DiT order, which the released weights expect)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Scalar -> sinusoid -> MLP. Used for t and, in PixArt-α 1024, for image size and aspect ratio."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, hidden)
        return self.mlp(timestep_sinusoid(t).to(self.mlp[0].weight.dtype))


class PatchEmbed(nn.Module):
    """Latent (B, C, H, W) -> tokens (B, H/p * W/p, D) by a stride-p conv."""

    def __init__(self, patch: int, in_channels: int, hidden: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class CaptionEmbedder(nn.Module):
    """T5 features (B, L, C_text) -> (B, L, D) through a tanh-GELU MLP."""

    def __init__(self, caption_channels: int, hidden: int):
        super().__init__()
        self.y_proj = nn.Module()
        self.y_proj.fc1 = nn.Linear(caption_channels, hidden)
        self.y_proj.act = nn.GELU(approximate="tanh")
        self.y_proj.fc2 = nn.Linear(hidden, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj.fc2(self.y_proj.act(self.y_proj.fc1(y)))


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) float64 positions -> (M, dim) as [sin, cos]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


@lru_cache(maxsize=64)
def _pos_embed(dim: int, h: int, w: int, base_size: int, pe_interpolation: float, device: str) -> torch.Tensor:
    # The paper's PE interpolation: positions are rescaled so any grid spans the
    # base grid, then divided by the interpolation factor of the base resolution.
    gh = torch.arange(h, dtype=torch.float64) / (h / base_size) / pe_interpolation  # (h,)
    gw = torch.arange(w, dtype=torch.float64) / (w / base_size) / pe_interpolation  # (w,)
    yy, xx = torch.meshgrid(gh, gw, indexing="ij")  # (h, w) each, row-major token order
    # First half encodes the column (x), second the row (y): the released weights' layout.
    emb = torch.cat([_sincos_1d(dim // 2, xx), _sincos_1d(dim // 2, yy)], dim=1)  # (h*w, dim)
    return emb.float()[None].to(device)  # (1, h*w, dim)


def sincos_pos_embed(dim: int, h: int, w: int, base_size: int, pe_interpolation: float,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """2D sin-cos positions for an h×w token grid: (1, h*w, dim) float32, computed once per shape and device
    (no host-to-device copy per step, and CUDA-graph friendly)."""
    return _pos_embed(dim, h, w, base_size, float(pe_interpolation), str(torch.device(device)))


def unpatchify(x: torch.Tensor, h: int, w: int, patch: int, channels: int) -> torch.Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
    b = x.shape[0]
    x = x.reshape(b, h, w, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, h * patch, w * patch)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x * (1 + scale) + shift."""
    return torch.addcmul(shift, x, 1 + scale)


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine parameters (adaLN supplies them)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)
