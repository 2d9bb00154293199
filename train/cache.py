"""The feature cache: T5 features and VAE posteriors in sharded safetensors files plus a JSON index.

Layout of a cache folder (written by ``python -m train.extract``)::

    index.json              format, resolution, VAE scaling/shift, text channels, samples, stats
    shard_r0_00000.safetensors   "<key>.mean" / "<key>.std"  (C, h/8, w/8) fp16: the VAE posterior
                                 "<key>.short" / "<key>.long" (n, C_text) fp16: T5 features of the n real
                                 tokens (n <= max tokens; the mask is n ones, padding is re-added per batch)
                                 "<key>.control" (C, h/8, w/8) fp16: VAE posterior mean of the image's control
                                 map (controlnet stage only; ``index.json`` names the map's type)
    extras.safetensors      "null" (the "" caption) and "prompt.<i>" (the config's sample_prompts)

Storing only real tokens is lossless: padded positions are masked out of cross-attention.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from .data import pick_long

INDEX, EXTRAS, FORMAT = "index.json", "extras.safetensors", "pixsigma-features/1"
Tensor = torch.Tensor


def trim(y: Tensor, mask: Tensor) -> Tensor:
    """(L, C) features, (L,) mask -> (n, C) fp16 of the real tokens."""
    return y[: int(mask.sum())].to(torch.float16)


def pad_features(ys: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Variable-length (n_i, C) features -> (B, L, C) zero-padded and (B, L) mask, L = max n_i."""
    length = max(y.shape[0] for y in ys)
    out = ys[0].new_zeros(len(ys), length, ys[0].shape[1])
    mask = torch.zeros(len(ys), length, dtype=torch.long)
    for i, y in enumerate(ys):
        out[i, : y.shape[0]] = y
        mask[i, : y.shape[0]] = 1
    return out.float(), mask


class FeatureCache(Dataset):
    """Reads a cache folder; ``buckets[i]`` is sample i's (h, w) in px, as the bucket sampler wants."""

    def __init__(self, folder: str | Path, long_ratio: float = 0.0, seed: int = 0):
        self.folder = Path(folder)
        index_path = self.folder / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"no feature cache at {self.folder} ({INDEX} missing): run "
                                    "`python -m train.extract CONFIG` first, or unset data.cache")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_path}: format {self.index.get('format')!r}, expected {FORMAT!r}")
        self.samples = self.index["samples"]
        self.buckets = [tuple(s["bucket"]) for s in self.samples]
        self.long_ratio, self.seed, self.epoch = long_ratio, seed, 0
        self._handles: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own file handles
        return {**self.__dict__, "_handles": {}}

    @property
    def resolution(self) -> int:
        return int(self.index["resolution"])

    @property
    def scaling(self) -> float:
        return float(self.index["vae"]["scaling_factor"])

    @property
    def shift(self) -> float:
        return float(self.index["vae"]["shift_factor"])

    @property
    def stats(self) -> dict[str, int]:
        return dict(self.index.get("stats", {}))

    def check(self, resolution: int, caption_channels: int, latent_channels: int, max_tokens: int) -> None:
        """Refuse a cache built for another resolution, text encoder width, VAE or caption length."""
        got = (self.resolution, self.index["text"]["channels"], self.index["vae"]["latent_channels"],
               self.index["text"]["max_tokens"])
        want = (resolution, caption_channels, latent_channels, max_tokens)
        names = ("base resolution", "text feature channels", "latent channels", "max tokens")
        for name, g, w in zip(names, got, want):
            if g != w:
                raise ValueError(f"feature cache {self.folder} has {name} {g}, this run needs {w}: "
                                 "re-run `python -m train.extract` with this config")

    def check_control(self, kind: str) -> None:
        """Refuse a cache without control latents of type ``kind`` (the controlnet stage's)."""
        if self.index.get("control") != kind:
            raise ValueError(f"feature cache {self.folder} holds control latents of type {self.index.get('control')}"
                             f", this run needs {kind!r}: re-run `python -m train.extract` with this config")

    def _tensor(self, shard: str, key: str) -> Tensor:
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._handles[shard].get_tensor(key)

    def extra(self, key: str) -> Tensor:
        return self._tensor(EXTRAS, key)

    def null_caption(self) -> tuple[Tensor, Tensor]:
        return pad_features([self.extra("null")])

    def prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        have = self.index.get("prompts", [])
        missing = [p for p in prompts if p not in have]
        if missing:
            raise ValueError(f"sample prompts {missing} are not in the feature cache {self.folder}: "
                             "re-run `python -m train.extract` with this config's sample_prompts")
        return pad_features([self.extra(f"prompt.{have.index(p)}") for p in prompts])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        long = pick_long(bool(s["long"]), self.long_ratio, self.seed, self.epoch, i)
        key, shard = s["key"], s["shard"]
        item = {"index": i, "mean": self._tensor(shard, f"{key}.mean"), "std": self._tensor(shard, f"{key}.std"),
                "y": self._tensor(shard, f"{key}.{'long' if long else 'short'}")}
        if self.index.get("control"):
            item["control"] = self._tensor(shard, f"{key}.control")
        return item


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    y, mask = pad_features([it["y"] for it in items])
    return {"index": torch.tensor([it["index"] for it in items]), "y": y, "mask": mask,  # (B, L, C), (B, L)
            "mean": torch.stack([it["mean"] for it in items]).float(),  # (B, C, h, w)
            "std": torch.stack([it["std"] for it in items]).float(), "failed": 0,
            **({"control": torch.stack([it["control"] for it in items]).float()} if "control" in items[0] else {})}
