"""Atomic file writes (temp file in the same folder + ``os.replace``): readers see old or new, never half."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pixsigma.io import atomic_write


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp))


def atomic_write_json(obj: Any, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))
