"""Where a run's training tensors come from: the feature cache, or images + captions encoded on the fly.

Both give the loop the same things: a bucketed ``dataset`` and its ``collate``, ``batch_to_training``
(clean latents x0, caption features y, mask), the null caption's encoding (caption dropout), the sample
prompts' encodings, and ``decode`` for validation images.
"""

from __future__ import annotations

from typing import Any

import torch

from pixsigma.config import DiTConfig

from . import encoders
from .cache import FeatureCache, collate_cached
from .config import TrainConfig
from .data import DataStats, ImageCaptionDataset, collate_images, read_records

Tensor = torch.Tensor


class CachedFeatures:
    """Reads ``data.cache``; never builds T5 or the VAE."""

    def __init__(self, cfg: TrainConfig, dit: DiTConfig):
        self.dataset = FeatureCache(cfg.data.cache, cfg.data.long_caption_ratio, cfg.seed)
        self.dataset.check(dit.resolution, dit.caption_channels, dit.in_channels, cfg.data.max_tokens or dit.max_tokens)
        self.collate = collate_cached
        self.decode = None
        if cfg.stage.controlnet is not None:
            self.dataset.check_control(cfg.stage.controlnet.control_type)

    def stats(self) -> dict[str, int]:
        return self.dataset.stats

    def batch_to_training(self, batch: dict[str, Any], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        ds = self.dataset
        x0 = encoders.sample_latents(batch["mean"].to(device), batch["std"].to(device), ds.scaling, ds.shift)
        return x0, batch["y"].to(device), batch["mask"].to(device)

    def control_latents(self, batch: dict[str, Any], device: torch.device) -> Tensor:
        """The batch's control latents (controlnet stage), scaled as x0 is."""
        return ((batch["control"] - self.dataset.shift) * self.dataset.scaling).to(device)

    def null_caption(self) -> tuple[Tensor, Tensor]:
        return self.dataset.null_caption()

    def prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        return self.dataset.prompts(prompts)


class OnlineFeatures:
    """Decodes images and runs T5 and the VAE on the training device at every step."""

    def __init__(self, cfg: TrainConfig, dit: DiTConfig, device: torch.device):
        if not cfg.data.text_encoder or not cfg.data.vae:
            raise ValueError("training from images needs data.text_encoder and data.vae (or a data.cache)")
        self._stats = DataStats()
        records = read_records(cfg.data.source, self._stats)[:cfg.data.max_images]
        self.dataset = ImageCaptionDataset(records, dit.resolution, cfg.data.long_caption_ratio, cfg.seed,
                                           self._stats)
        self.collate = collate_images
        self.text = encoders.build_text_encoder(cfg.data.text_encoder, device, cfg.data.max_tokens or dit.max_tokens)
        self.vae = encoders.build_vae(cfg.data.vae, device)
        if self.text.channels != dit.caption_channels:
            raise ValueError(f"text encoder {cfg.data.text_encoder} gives {self.text.channels}-channel features, "
                             f"the model takes {dit.caption_channels}")
        if self.vae.channels != dit.in_channels:
            raise ValueError(f"VAE {cfg.data.vae} has {self.vae.channels} latent channels, the model takes "
                             f"{dit.in_channels}")
        self.decode = self.vae.decode
        self.control_type = cfg.stage.controlnet.control_type if cfg.stage.controlnet is not None else None

    def stats(self) -> dict[str, int]:
        return self._stats.as_dict()

    def batch_to_training(self, batch: dict[str, Any], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        self._stats.skipped_images += batch["failed"]
        mean, std = self.vae.posterior(batch["pixels"])  # (B, C, h/8, w/8)
        x0 = encoders.sample_latents(mean, std, self.vae.scaling, self.vae.shift)
        y, mask, cut = self.text(batch["captions"])  # (B, L, C_text), (B, L)
        self._stats.truncated_captions += cut
        return x0.to(device), y.to(device), mask.to(device)

    def control_latents(self, batch: dict[str, Any], device: torch.device) -> Tensor:
        from .controlnet import control_from_pixels

        mean = control_from_pixels(self.vae, batch["pixels"], self.control_type)
        return ((mean - self.vae.shift) * self.vae.scaling).to(device)

    def null_caption(self) -> tuple[Tensor, Tensor]:
        y, mask, _ = self.text([""])
        return y.cpu(), mask.cpu()

    def prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        y, mask, _ = self.text(prompts)
        return y.cpu(), mask.cpu()


def open_features(cfg: TrainConfig, dit: DiTConfig, device: torch.device) -> CachedFeatures | OnlineFeatures:
    """The cache when ``data.cache`` is set (it must exist), else the images."""
    return CachedFeatures(cfg, dit) if cfg.data.cache else OnlineFeatures(cfg, dit, device)
