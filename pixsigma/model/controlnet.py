"""The ControlNet-Transformer of PixArt (PixArt-δ; ``ControlPixArtHalf`` in the PixArt-alpha repository).

The base DiT is frozen. Its first N blocks are copied as trainable blocks. The control image's latent goes
through the base model's own patch embedder and positions, giving c. Base block 0 runs first on x; then for
i = 1 … N copy i−1 computes c ← copy(x + before_proj(c)) (first copy) or c ← copy(c) (the others) and emits
c_skip = after_proj(c), and base block i runs on x + scale · c_skip; the remaining base blocks run as usual.
``before_proj`` and every ``after_proj`` start at zero, so an untrained ControlNet leaves the image unchanged.

Parameter names are the official ones (``controlnet.{i}.copied_block.*``, ``controlnet.0.before_proj``,
``controlnet.{i}.after_proj``), so an official ``ControlPixArtHalf`` checkpoint loads without renaming.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from pixsigma.config import DiTConfig, KVCompress, check_fields
from pixsigma.model.dit import BlockContext, PixArtBlock, PixArtDiT, set_blocks_kv

Tensor = torch.Tensor


class ControlNetMismatch(ValueError):
    """A ControlNet built for another base model (width or depth)."""


def default_copies(depth: int) -> int:
    """Half the base depth (at least 1, and at most depth − 1: block 0 always runs before the first copy)."""
    return max(1, min(depth // 2, depth - 1))


@dataclass(frozen=True)
class ControlNetConfig:
    """What a ControlNet is: the base width and depth it was made for, and how many blocks it copies."""

    base_hidden_size: int
    base_depth: int
    num_copies: int

    def __post_init__(self) -> None:
        for name in ("base_hidden_size", "base_depth", "num_copies"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ControlNetConfig.{name} must be a positive integer, got {v!r}")
        if self.num_copies > self.base_depth - 1:
            raise ValueError(f"ControlNetConfig.num_copies must be in 1-{self.base_depth - 1} for a "
                             f"{self.base_depth}-block base (block 0 runs before the first copy), got "
                             f"{self.num_copies}")

    @classmethod
    def for_base(cls, base: DiTConfig, num_copies: int | None = None) -> ControlNetConfig:
        return cls(base.hidden_size, base.depth, default_copies(base.depth) if num_copies is None else num_copies)

    def check_base(self, base: DiTConfig, source: str = "ControlNet") -> None:
        """Refuse a base model of another width or depth, naming both."""
        if base.hidden_size != self.base_hidden_size:
            raise ControlNetMismatch(f"{source} was made for a base of width {self.base_hidden_size}; this model "
                                     f"has width {base.hidden_size}")
        if base.depth != self.base_depth:
            raise ControlNetMismatch(f"{source} was made for a base of depth {self.base_depth}; this model has "
                                     f"depth {base.depth}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ControlNetConfig:
        check_fields(cls, d, "ControlNetConfig fields")
        return cls(**d)


class ControlBlock(nn.Module):
    """Copy i of base block i, its zero-initialised ``after_proj`` and, for copy 0, ``before_proj``."""

    def __init__(self, block: PixArtBlock, index: int, dim: int):
        super().__init__()
        self.index = index
        self.copied_block = block
        if index == 0:
            self.before_proj = nn.Linear(dim, dim)
            nn.init.zeros_(self.before_proj.weight)
            nn.init.zeros_(self.before_proj.bias)
        self.after_proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.after_proj.weight)
        nn.init.zeros_(self.after_proj.bias)


class ControlNet(nn.Module):
    """The trainable part: N copied blocks with their projections (the base model is not held here)."""

    def __init__(self, config: ControlNetConfig, base: DiTConfig):
        super().__init__()
        config.check_base(base)
        self.config, self.kv = config, base.kv_compress
        self.control_type: str | None = None  # the map it was trained on, where its folder says (pixsigma.control)
        d, kv = base.hidden_size, base.kv_compress
        self.controlnet = nn.ModuleList(
            ControlBlock(PixArtBlock(d, base.num_heads, base.mlp_ratio, kv.ratio_for(i), kv.operator), i, d)
            for i in range(config.num_copies))

    @classmethod
    def from_base(cls, base: PixArtDiT, num_copies: int | None = None) -> ControlNet:
        """A fresh ControlNet: copy i starts as base block i (with its KV weights); projections at zero."""
        net = cls(ControlNetConfig.for_base(base.config, num_copies), base.config)
        for i, blk in enumerate(net.controlnet):
            blk.copied_block.load_state_dict(base.blocks[i].state_dict())
        ref = base.final_layer.linear.weight
        return net.to(device=ref.device, dtype=ref.dtype)

    @torch.no_grad()
    def set_kv_compress(self, kv: KVCompress) -> None:
        """Copy i compresses as base layer i does (called whenever the base switches)."""
        set_blocks_kv([b.copied_block for b in self.controlnet], kv, self.controlnet[0].after_proj.weight)
        self.kv = kv

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class ControlResiduals:
    """The ControlNet as a block hook of one base forward (``PixArtDiT.forward(block_hook=…)``): before base block
    i = 1 … N it runs copy i−1 and adds ``scale · after_proj(c)`` to the tokens block i reads. control: (B or 1,
    C_in, H, W) latent of the control image (B = 1 is broadcast over the batch, e.g. both guidance halves)."""

    def __init__(self, base: PixArtDiT, net: ControlNet, control: Tensor, scale: float = 1.0):
        net.config.check_base(base.config)
        if net.kv != base.config.kv_compress:  # honour the base's KV compression (a request may switch it)
            net.set_kv_compress(base.config.kv_compress)
        self.base, self.net, self.control, self.scale = base, net, control, scale
        self.c: Tensor | None = None

    def __call__(self, i: int, x: Tensor, ctx: BlockContext) -> Tensor:
        if not 1 <= i <= self.net.config.num_copies:
            return x
        base, p = self.base, self.base.config.patch_size
        if i == 1:
            if self.control.shape[-2:] != (ctx.hw[0] * p, ctx.hw[1] * p):
                raise ValueError(f"control latent {tuple(self.control.shape[-2:])} does not match the image latent "
                                 f"{tuple(d * p for d in ctx.hw)}")
            if self.control.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"control latent batch {self.control.shape[0]} is neither 1 nor the image batch "
                                 f"{x.shape[0]}")
            self.c = base.patch_tokens(self.control.to(x.dtype)).expand(x.shape[0], -1, -1)  # (B, N, D)
        blk = self.net.controlnet[i - 1]
        c = self.c if blk.index else x + blk.before_proj(self.c)
        self.c = base.run_block(blk.index, c, ctx, block=blk.copied_block)
        return x + self.scale * blk.after_proj(self.c)


def controlled_forward(base: PixArtDiT, net: ControlNet, x: Tensor, t: Tensor, y: Tensor,
                       mask: Tensor | None = None, control: Tensor | None = None, scale: float = 1.0,
                       **extra: Tensor) -> Tensor:
    """The base DiT's forward with the ControlNet's residuals (``ControlResiduals``); None or scale 0 runs the
    base alone."""
    net.config.check_base(base.config)
    if control is None or scale == 0:
        return base(x, t, y, mask, **extra)
    return base(x, t, y, mask, **extra, block_hook=ControlResiduals(base, net, control, scale))


class ControlledDiT(nn.Module):
    """A base DiT and its ControlNet as one callable ``(x, t, y, mask, control=…, scale=…)`` for the sampler."""

    def __init__(self, base: PixArtDiT, net: ControlNet):
        super().__init__()
        net.config.check_base(base.config)
        self.base, self.net = base, net

    @property
    def config(self) -> DiTConfig:
        return self.base.config

    def forward(self, x: Tensor, t: Tensor, y: Tensor, mask: Tensor | None = None, control: Tensor | None = None,
                scale: float = 1.0, **extra: Tensor) -> Tensor:
        return controlled_forward(self.base, self.net, x, t, y, mask, control, scale, **extra)


def trainable_copy(base: PixArtDiT, num_copies: int | None = None) -> ControlNet:
    """``ControlNet.from_base`` with the base frozen (``requires_grad`` off) and the copies trainable."""
    base.requires_grad_(False)
    net = ControlNet.from_base(base, num_copies)
    net.requires_grad_(True)
    return net


__all__ = ["ControlBlock", "ControlNet", "ControlNetConfig", "ControlNetMismatch", "ControlResiduals", "ControlledDiT",
           "controlled_forward", "default_copies", "trainable_copy"]
