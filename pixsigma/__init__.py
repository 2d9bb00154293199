"""pixsigma: PixArt-Σ, a Diffusion Transformer for 4K text-to-image, with KV token compression."""

from __future__ import annotations

import importlib
from typing import Any

from pixsigma.config import PRESETS, DiTConfig, KVCompress

__all__ = ["PRESETS", "DiTConfig", "GenerationRequest", "KVCompress", "PixSigmaPipeline"]
__version__ = "0.1.0"
_LAZY = {"PixSigmaPipeline": "pixsigma.pipeline", "GenerationRequest": "pixsigma.request"}


def __getattr__(name: str) -> Any:
    """``from pixsigma import PixSigmaPipeline`` imports the pipeline (torch, diffusers' parts) only when asked."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pixsigma' has no attribute {name!r}")
