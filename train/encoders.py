"""The frozen encoders: T5 (captions -> features + mask) and the VAE (pixels -> posterior mean/std).

Built only when a run has no feature cache, or by ``python -m train.extract``. Everything is read from
local folders (``local_files_only``); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pixsigma.t5 import quiet_torchao
from pixsigma.text import encode_text, token_lengths

Tensor = torch.Tensor


def component_folder(path: str | Path, sub: str) -> Path:
    """``path/sub`` of a diffusers pipeline folder, else ``path`` itself (the component's own folder)."""
    path = Path(path)
    if (path / sub).is_dir():
        return path / sub
    if path.is_dir():
        return path
    raise FileNotFoundError(f"{path} does not exist: give a pipeline folder holding {sub}/ or the {sub} folder")


class TextEncoder:
    """Tokenise (truncating to ``max_tokens``, counting the truncated) and encode with T5's encoder."""

    def __init__(self, tokenizer, model: torch.nn.Module, max_tokens: int):
        self.tokenizer, self.model, self.max_tokens = tokenizer, model.eval().requires_grad_(False), max_tokens
        self.channels = int(model.config.d_model)

    def __call__(self, captions: list[str]) -> tuple[Tensor, Tensor, int]:
        """-> features (B, L, C) fp32, mask (B, L) int64, number of captions cut at ``max_tokens``."""
        truncated = sum(n > self.max_tokens for n in token_lengths(self.tokenizer, captions))
        y, mask = encode_text(self.tokenizer, self.model, captions, self.max_tokens, pad_to_max=False)
        return y.float(), mask.long(), truncated


class ImageEncoder:
    """The VAE: posterior of pixels, and decoding of (scaled) latents for validation images."""

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae.eval().requires_grad_(False)
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.channels = int(vae.config.latent_channels)

    @torch.no_grad()
    def posterior(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, h, w) in [-1, 1] -> unscaled posterior mean and std, each (B, C, h/8, w/8)."""
        p = self.vae.device, self.vae.dtype
        dist = self.vae.encode(pixels.to(*p)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, 8h, 8w) in [-1, 1]."""
        x = latents.to(self.vae.device, self.vae.dtype) / self.scaling + self.shift
        return self.vae.decode(x).sample.float().clamp(-1, 1)


def sample_latents(mean: Tensor, std: Tensor, scaling: float, shift: float) -> Tensor:
    """A draw of the VAE posterior, shifted and scaled into the DiT's latent space."""
    return (mean + std * torch.randn_like(mean) - shift) * scaling


def build_text_encoder(path: str | Path, device: torch.device, max_tokens: int) -> TextEncoder:
    from transformers import AutoTokenizer, T5EncoderModel

    # T5 overflows in fp16; bf16 where the device has it, else fp32.
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    tok = AutoTokenizer.from_pretrained(component_folder(path, "tokenizer"), local_files_only=True)
    model = T5EncoderModel.from_pretrained(component_folder(path, "text_encoder"), local_files_only=True,
                                           dtype=dtype)
    return TextEncoder(tok, model.to(device), max_tokens)


def build_vae(path: str | Path, device: torch.device) -> ImageEncoder:
    with quiet_torchao():  # diffusers imports torchao, when installed, with its models
        from diffusers import AutoencoderKL

    # fp32: the SDXL VAE overflows in fp16, and encoding is a small share of a step.
    vae = AutoencoderKL.from_pretrained(component_folder(path, "vae"), local_files_only=True)
    return ImageEncoder(vae.to(device))
