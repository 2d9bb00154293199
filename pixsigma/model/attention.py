"""Self-attention (full or KV-compressed) and cross-attention, as plain functions plus thin modules.

KV token compression (PixArt-Σ, Sec. 3.2): queries are kept for every token; keys
and values are merged over R×R windows of the 2D token grid, so attention costs
N·N/R² instead of N². With the ``conv`` operator the merge is a depthwise
Conv2d(C, C, kernel=R, stride=R, groups=C) initialised to 1/R² ("Conv Avg Init")
followed by an affine LayerNorm; one conv and one norm serve both k and v, exactly
as the official ``AttentionKVCompress``.

A grid that R does not divide is padded at the bottom/right by repeating its last
row/column up to the next multiple of R, so every token still reaches some key.
(The official code floors instead and silently drops those rows/columns; on the
bucket grids of the released models R = 2 always divides, so both agree there.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pixsigma.config import KV_OPERATORS

Tensor = torch.Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None) -> Tensor:
    """Multi-head attention. q: (B, N, C), k/v: (B, M, C), mask: (B, M) bool keep -> (B, N, C)."""
    b, n, c = q.shape
    m = k.shape[1]
    q = q.view(b, n, heads, c // heads).transpose(1, 2)  # (B, h, N, d)
    k = k.view(b, m, heads, c // heads).transpose(1, 2)  # (B, h, M, d)
    v = v.view(b, m, heads, c // heads).transpose(1, 2)  # (B, h, M, d)
    attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, M)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, d)
    return out.transpose(1, 2).reshape(b, n, c)


def _pad_to_multiple(x: Tensor, ratio: int) -> Tensor:
    """(B, C, H, W) -> (B, C, ceil(H/R)*R, ceil(W/R)*R), repeating the last row/column."""
    ph, pw = -x.shape[2] % ratio, -x.shape[3] % ratio
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x


def compress_kv(x: Tensor, hw: tuple[int, int], ratio: int, operator: str,
                conv: nn.Conv2d | None = None, norm: nn.LayerNorm | None = None) -> Tensor:
    """Merge tokens over R×R windows. x: (B, H*W, C) -> (B, ceil(H/R)*ceil(W/R), C)."""
    if ratio == 1:
        return x
    if operator not in KV_OPERATORS:
        raise ValueError(f"unknown KV operator {operator!r}; accepted: {KV_OPERATORS}")
    b, n, c = x.shape
    h, w = hw
    if h * w != n:
        raise ValueError(f"token grid {h}x{w} does not match {n} tokens")
    grid = _pad_to_multiple(x.transpose(1, 2).reshape(b, c, h, w), ratio)  # (B, C, H', W')
    if operator == "conv":
        if conv is None or norm is None:
            raise ValueError("the 'conv' KV operator needs its conv and norm weights")
        merged = conv(grid)  # (B, C, H'/R, W'/R)
    elif operator == "pool":
        merged = F.avg_pool2d(grid, ratio)
    else:  # discard: keep one token (top-left) of each window
        merged = grid[:, :, ::ratio, ::ratio]
    merged = merged.flatten(2).transpose(1, 2)  # (B, M, C)
    return norm(merged) if operator == "conv" else merged


class SelfAttention(nn.Module):
    """PixArt self-attention: fused qkv, optional KV compression (``sr`` conv + ``norm``), output proj."""

    def __init__(self, dim: int, heads: int, kv_ratio: int = 1, kv_operator: str = "conv"):
        super().__init__()
        self.heads, self.kv_ratio, self.kv_operator = heads, kv_ratio, kv_operator
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        if kv_ratio > 1 and kv_operator == "conv":
            self.sr = nn.Conv2d(dim, dim, kernel_size=kv_ratio, stride=kv_ratio, groups=dim)
            self.norm = nn.LayerNorm(dim)
            self.reset_kv_compression()

    @torch.no_grad()
    def reset_kv_compression(self) -> None:
        """The paper's "Conv Avg Init": each window starts as the plain average of its tokens."""
        self.sr.weight.fill_(1.0 / self.kv_ratio**2)
        self.sr.bias.zero_()
        self.norm.reset_parameters()

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:  # (B, N, C) -> (B, N, C)
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 × (B, N, C)
        if self.kv_ratio > 1:
            conv, norm = getattr(self, "sr", None), getattr(self, "norm", None)
            k = compress_kv(k, hw, self.kv_ratio, self.kv_operator, conv, norm)  # (B, M, C)
            v = compress_kv(v, hw, self.kv_ratio, self.kv_operator, conv, norm)  # (B, M, C)
        return self.proj(attention(q, k, v, self.heads))


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens (with the caption's padding mask)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:  # (B, N, C), (B, L, C), (B, L)
        k, v = self.kv_linear(y).chunk(2, dim=-1)  # 2 × (B, L, C)
        return self.proj(attention(self.q_linear(x), k, v, self.heads, mask))
