"""Analytic FLOPs of one PixArt DiT forward (one sampling step), by part.

Only matrix work is counted (linears, convolutions, the two attention matmuls), as
``2 × multiply-adds`` — the usual convention, and what ``torch.utils.flop_counter``
counts, so achieved TFLOP/s compare directly with a matmul peak. Element-wise work
(norms, modulation, softmax, GELU) is a few per cent of memory traffic, not FLOPs.

Per image, with N image tokens (h×w grid), D hidden, L caption tokens, C_text
caption channels, H = D·mlp_ratio, p patch, and M keys/values of a self-attention
(M = N, or ⌈h/R⌉·⌈w/R⌉ under KV compression with ratio R):

- patch embed      2·N·(C_in·p²)·D
- timestep + adaLN 2·(256·D + D·D) + 2·D·6D        (t_embedder MLP, shared t_block)
- caption embed    2·L·(C_text·D + D·D)            (y_embedder MLP)
- per block:
  self-attn proj   2·N·D·3D (qkv) + 2·N·D·D (out)
  KV compression   2·M·D·R² for k and for v        (depthwise R×R conv, compressed layers only)
  self-attn matmul 4·N·M·D                          (QKᵀ and AV; N·N/R² pairs when compressed)
  cross-attn       2·N·D·D (q) + 2·L·D·2D (kv) + 4·N·L·D (matmuls) + 2·N·D·D (out)
  MLP              2·N·D·H·2
- final layer      2·N·D·(p²·C_out)

The cross-attention runs over all L tokens (padding is masked, not skipped), as executed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from pixsigma.config import DiTConfig
from pixsigma.constants import VAE_SCALE_FACTOR

FREQ_DIM = 256  # sinusoid width fed to the timestep MLP (pixsigma.model.embeddings.FREQ_DIM)
PARTS = ("patch_embed", "adaln", "caption_embed", "self_attn_proj", "kv_compress", "self_attn_matmul",
         "cross_attn", "mlp", "final_layer")


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one DiT forward at a given latent size and batch, split by part."""

    parts: dict[str, int]
    tokens: int  # image tokens N per image
    batch: int

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def to_dict(self) -> dict:
        return {"total": self.total, "tokens": self.tokens, "batch": self.batch, "parts": dict(self.parts)}


def token_grid(config: DiTConfig, height_px: int, width_px: int) -> tuple[int, int]:
    """(h, w) token grid of an image size: pixels / VAE factor / patch size."""
    step = VAE_SCALE_FACTOR * config.patch_size
    if height_px % step or width_px % step:
        raise ValueError(f"image size {height_px}x{width_px} is not a multiple of {step} px "
                         f"(VAE factor {VAE_SCALE_FACTOR} × patch {config.patch_size})")
    return height_px // step, width_px // step


def dit_step_flops(config: DiTConfig, height_px: int, width_px: int, batch: int = 2) -> StepFlops:
    """FLOPs of one forward of ``config`` on a batch of ``batch`` latents of an image ``height_px × width_px``.

    ``batch`` is 2 for one image with classifier-free guidance; text is the model's ``max_tokens`` (the
    pipeline always pads to it). KV compression is read from ``config.kv_compress``.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    h, w = token_grid(config, height_px, width_px)
    n, d, p = h * w, config.hidden_size, config.patch_size
    lt = config.max_tokens
    hidden = int(d * config.mlp_ratio)  # as PixArtBlock builds its Mlp
    parts: Counter[str] = Counter()
    parts["patch_embed"] = 2 * n * config.in_channels * p * p * d
    parts["adaln"] = 2 * (FREQ_DIM * d + d * d) + 2 * d * 6 * d
    parts["caption_embed"] = 2 * lt * (config.caption_channels * d + d * d)
    if config.micro_condition:  # size and aspect-ratio embedders: 3 scalars through D/3-wide MLPs
        third = d // 3
        parts["adaln"] += 3 * 2 * (FREQ_DIM * third + third * third)
    for layer in range(config.depth):
        r = config.kv_compress.ratio_for(layer)
        m = n if r == 1 else -(-h // r) * -(-w // r)  # keys/values after R×R merging (grid padded up)
        parts["self_attn_proj"] += 2 * n * d * 3 * d + 2 * n * d * d
        if r > 1 and config.kv_compress.operator == "conv":
            parts["kv_compress"] += 2 * (2 * m * d * r * r)  # depthwise conv on k and on v
        parts["self_attn_matmul"] += 4 * n * m * d
        parts["cross_attn"] += 2 * n * d * d + 2 * lt * d * 2 * d + 4 * n * lt * d + 2 * n * d * d
        parts["mlp"] += 2 * 2 * n * d * hidden
    parts["final_layer"] = 2 * n * d * p * p * config.out_channels
    return StepFlops({k: parts[k] * batch for k in PARTS}, n, batch)


def format_flops(flops: float) -> str:
    """1.23e15 -> '1.23 PFLOP'."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} FLOP"
