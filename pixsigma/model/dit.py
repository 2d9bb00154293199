"""The PixArt-Σ Diffusion Transformer (PixArtMS XL/2 and smaller siblings).

Parameter names follow the original PixArt checkpoints (``x_embedder``, ``t_block``,
``blocks.N.attn.qkv``, ``blocks.N.cross_attn.kv_linear``, ``final_layer`` …), so an
official ``.pth`` loads with no renaming; ``pixsigma.weights`` converts diffusers folders.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pixsigma.config import DiTConfig, KVCompress
from pixsigma.model.attention import CrossAttention, SelfAttention
from pixsigma.model.embeddings import (
    CaptionEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    layer_norm,
    modulate,
    sincos_pos_embed,
    unpatchify,
)

Tensor = torch.Tensor
# PixArt initialises the timestep, adaLN and caption MLPs with N(0, 0.02), a gain (std * sqrt(fan_in)) set for
# XL: T5-XXL's 4096 channels into width 1152. Other widths keep that gain rather than that std: with fewer caption
# channels a plain 0.02 makes captions quieter than at XL, and a small model then learns to ignore them.
CAPTION_CHANNELS_XL, HIDDEN_XL = 4096, 1152


def _normal_like_xl(weight: Tensor, fan_in_xl: int) -> None:
    """N(0, 0.02) at XL's fan-in; the same gain at any other fan-in (identical init for XL)."""
    nn.init.normal_(weight, std=0.02 * (fan_in_xl / weight.shape[1]) ** 0.5)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PixArtBlock(nn.Module):
    """adaLN-single block: the six modulation vectors are the shared t_block output plus a
    learned per-block ``scale_shift_table`` (PixArt-α Sec. 2.3)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, kv_ratio: int = 1, kv_operator: str = "conv"):
        super().__init__()
        self.attn = SelfAttention(dim, heads, kv_ratio, kv_operator)
        self.cross_attn = CrossAttention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: Tensor, y: Tensor, t6: Tensor, mask: Tensor | None, hw: tuple[int, int]) -> Tensor:
        # x: (B, N, C), y: (B, L, C), t6: (B, 6*C), mask: (B, L)
        mod = self.scale_shift_table[None] + t6.reshape(x.shape[0], 6, -1)  # (B, 6, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unsqueeze(2).unbind(1)  # (B, 1, C)
        x = x + gate_msa * self.attn(modulate(layer_norm(x), shift_msa, scale_msa), hw)
        x = x + self.cross_attn(x, y, mask)
        return x + gate_mlp * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LayerNorm, modulated by the embedded timestep and its own table, then a linear to p·p·C_out."""

    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:  # (B, N, C), (B, C)
        shift, scale = (self.scale_shift_table[None] + t[:, None]).unsqueeze(2).unbind(1)  # (B, 1, C)
        return self.linear(modulate(layer_norm(x), shift, scale))


@torch.no_grad()
def set_blocks_kv(blocks: Iterable[PixArtBlock], kv: KVCompress, ref: Tensor) -> None:
    """Give block i of ``blocks`` the KV compression ``kv`` sets for layer i (new conv weights on ``ref``'s
    device and dtype, from the average init; a ratio switched back to gets its trained weights again)."""
    for i, blk in enumerate(blocks):
        attn, ratio = blk.attn, kv.ratio_for(i)
        stash = getattr(attn, "_stash", {})
        if hasattr(attn, "sr"):
            stash[attn.kv_ratio] = (attn.sr, attn.norm)  # keep trained weights for a switch back
            del attn.sr, attn.norm
        attn.kv_ratio, attn.kv_operator, attn._stash = ratio, kv.operator, stash
        if ratio > 1 and kv.operator == "conv":
            if ratio in stash:
                attn.sr, attn.norm = stash.pop(ratio)
            else:
                attn.sr = nn.Conv2d(ref.shape[1], ref.shape[1], ratio, stride=ratio, groups=ref.shape[1])
                attn.norm = nn.LayerNorm(ref.shape[1])
                attn.reset_kv_compression()
                attn.sr.to(ref.device, ref.dtype)
                attn.norm.to(ref.device, ref.dtype)


class BlockContext(NamedTuple):
    """What every block reads besides the image tokens: embedded captions (B, L, D), the adaLN-single t6
    (B, 6D), the embedded timestep (B, D), the caption mask (B, L) and the token grid (h, w)."""

    y: Tensor
    t6: Tensor
    t_emb: Tensor
    mask: Tensor | None
    hw: tuple[int, int]


class BlockHook(Protocol):
    """Called before block ``i`` of one forward with the tokens (B, N, D) and the block context; returns the tokens
    block ``i`` reads. One hook object serves one forward (it may carry state from block to block)."""

    def __call__(self, i: int, x: Tensor, ctx: BlockContext) -> Tensor: ...


class PixArtDiT(nn.Module):
    """ε-and-variance predictor: (latent x_t, timestep t, T5 tokens y, their mask) -> (B, C_out, H, W)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        d = c.hidden_size
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.y_embedder = CaptionEmbedder(c.caption_channels, d)
        if c.micro_condition:  # PixArt-α 1024: image size and aspect ratio, d/3 each
            self.csize_embedder = TimestepEmbedder(d // 3)
            self.ar_embedder = TimestepEmbedder(d // 3)
        kv = c.kv_compress
        self.blocks = nn.ModuleList(
            PixArtBlock(d, c.num_heads, c.mlp_ratio, kv.ratio_for(i), kv.operator) for i in range(c.depth)
        )
        self.final_layer = FinalLayer(d, c.patch_size, c.out_channels)
        self.gradient_checkpointing = False
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT/PixArt init: xavier linears, zeroed adaLN output and final projection (a fresh model predicts 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for emb in (self.t_embedder, getattr(self, "csize_embedder", None), getattr(self, "ar_embedder", None)):
            if emb is not None:
                nn.init.normal_(emb.mlp[0].weight, std=0.02)  # its input is FREQ_DIM wide in every model
                nn.init.normal_(emb.mlp[2].weight, std=0.02)
        _normal_like_xl(self.t_embedder.mlp[2].weight, HIDDEN_XL)
        _normal_like_xl(self.t_block[1].weight, HIDDEN_XL)
        _normal_like_xl(self.y_embedder.y_proj.fc1.weight, CAPTION_CHANNELS_XL)
        _normal_like_xl(self.y_embedder.y_proj.fc2.weight, HIDDEN_XL)
        for blk in self.blocks:
            nn.init.zeros_(blk.cross_attn.proj.weight)
            nn.init.zeros_(blk.cross_attn.proj.bias)
            if hasattr(blk.attn, "sr"):
                blk.attn.reset_kv_compression()
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, mask: Tensor | None = None,
                resolution: Tensor | None = None, aspect_ratio: Tensor | None = None,
                block_hook: BlockHook | None = None) -> Tensor:
        """x: (B, C_in, H, W) latent; t: (B,) timesteps; y: (B, L, C_text); mask: (B, L) 1 = real token;
        resolution: (B, 2) image (h, w) and aspect_ratio: (B, 1), only for micro-conditioned models.
        ``block_hook(i, x, ctx)`` gives the tokens block i reads (a ControlNet's residuals); it runs inside this
        forward, so whatever wraps the forward (``pixsigma.speed``) wraps it too."""
        x, ctx = self.embed(x, t, y, mask, resolution, aspect_ratio)
        for i in range(len(self.blocks)):
            if block_hook is not None:
                x = block_hook(i, x, ctx)
            x = self.run_block(i, x, ctx)
        return self.head(x, ctx)

    def patch_tokens(self, latent: Tensor) -> Tensor:
        """(B, C_in, H, W) latent -> (B, N, D) patch tokens plus their positions (x, or a ControlNet's c)."""
        c = self.config
        p = c.patch_size
        if latent.shape[-2] % p or latent.shape[-1] % p:
            raise ValueError(f"latent {tuple(latent.shape[-2:])} is not divisible by the patch size {p}")
        h, w = latent.shape[-2] // p, latent.shape[-1] // p
        pos = sincos_pos_embed(c.hidden_size, h, w, c.base_size, c.pe_interpolation, latent.device)
        return self.x_embedder(latent) + pos.to(latent.dtype)  # (B, N, D)

    def embed(self, x: Tensor, t: Tensor, y: Tensor, mask: Tensor | None = None,
              resolution: Tensor | None = None, aspect_ratio: Tensor | None = None) -> tuple[Tensor, BlockContext]:
        """Everything before the blocks: patch tokens (B, N, D) and what every block reads besides them."""
        c = self.config
        p = c.patch_size
        hw = (x.shape[-2] // p, x.shape[-1] // p)
        x = self.patch_tokens(x)  # (B, N, D)
        b = x.shape[0]
        t = t.expand(b) if t.ndim == 0 or t.shape[0] == 1 else t
        t_emb = self.t_embedder(t.to(x.device))  # (B, D)
        if c.micro_condition:
            if resolution is None or aspect_ratio is None:
                raise ValueError("this model is micro-conditioned: pass resolution (B, 2) and aspect_ratio (B, 1)")
            cs = self.csize_embedder(resolution.flatten()).reshape(b, -1)  # (B, 2D/3)
            ar = self.ar_embedder(aspect_ratio.flatten()).reshape(b, -1)  # (B, D/3)
            t_emb = t_emb + torch.cat([cs, ar], dim=1)
        t6 = self.t_block(t_emb)  # (B, 6D)
        y = self.y_embedder(y.to(x.dtype))  # (B, L, D)
        if mask is not None:
            mask = mask.to(torch.bool)
        return x, BlockContext(y, t6, t_emb, mask, hw)

    def run_block(self, i: int, x: Tensor, ctx: BlockContext, block: nn.Module | None = None) -> Tensor:
        """Block ``i`` (or ``block``, a copy of it) on tokens x (B, N, D), checkpointed when training asks."""
        block = self.blocks[i] if block is None else block
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, ctx.y, ctx.t6, ctx.mask, ctx.hw, use_reentrant=False)
        return block(x, ctx.y, ctx.t6, ctx.mask, ctx.hw)

    def head(self, x: Tensor, ctx: BlockContext) -> Tensor:
        """The final layer and unpatchify: tokens (B, N, D) -> (B, C_out, H, W)."""
        x = self.final_layer(x, ctx.t_emb)  # (B, N, p*p*C_out)
        return unpatchify(x, *ctx.hw, self.config.patch_size, self.config.out_channels)

    @torch.no_grad()
    def set_kv_compress(self, kv: KVCompress) -> None:
        """Switch KV compression at inference without reloading: layers keep trained ``sr``/``norm`` weights
        when their ratio is unchanged; newly compressed conv layers start from the average init."""
        if any(i >= self.config.depth for i in kv.layers):
            raise ValueError(f"KV layers {list(kv.layers)} out of range 0-{self.config.depth - 1}")
        set_blocks_kv(self.blocks, kv, self.final_layer.linear.weight)
        self.config = self.config.with_kv(kv)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
