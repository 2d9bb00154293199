"""Atomic tensor files (``pixsigma.io.atomic_write``: readers see the old file or the new one, never half)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from pixsigma.io import atomic_write


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp))
