"""pixsigma: PixArt-Σ, a Diffusion Transformer for 4K text-to-image, with KV token compression."""

from pixsigma.config import PRESETS, DiTConfig, KVCompress

__all__ = ["PRESETS", "DiTConfig", "KVCompress"]
__version__ = "0.1.0"
