"""Conditioning: the text features of a request's prompts (or the T5 features it gives, diffusers'
``prompt_embeds``), the negatives guidance needs, and the micro-conditions of micro-conditioned models; as the
denoiser's inputs for the guidance batch ([uncond; cond]) or the conditional half alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
# (texts, token length) -> (features (B, L, C), mask (B, L), warnings): the pipeline's cached T5 encoder
Encoder = Callable[[list[str], int], tuple[Tensor, Tensor, list[str]]]


@dataclass
class Conditioning:
    """What the DiT reads besides the latents, for B images: ``cond`` (B, L, C) and its mask; ``uncond`` and its
    mask (the negatives) where guidance runs; ``extra`` the micro-conditions (B rows)."""

    cond: Tensor
    cond_mask: Tensor
    uncond: Tensor | None = None
    uncond_mask: Tensor | None = None
    extra: dict[str, Tensor] | None = None

    def single(self) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(y, mask, extra) of the conditional batch."""
        return self.cond, self.cond_mask, dict(self.extra or {})

    def pair(self) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(y, mask, extra) of the guidance batch [uncond; cond] (2B rows)."""
        if self.uncond is None or self.uncond_mask is None:
            raise ValueError("this conditioning has no negatives: it was made without guidance")
        extra = {k: torch.cat([v, v]) for k, v in (self.extra or {}).items()}
        return torch.cat([self.uncond, self.cond]), torch.cat([self.uncond_mask, self.cond_mask]), extra


def _repeat(x: Tensor, n: int) -> Tensor:
    """Each row ``n`` times in a row (diffusers' ``repeat(1, n, …).view(B·n, …)``)."""
    return x.repeat_interleave(n, dim=0)


def text_conditioning(encode: Encoder, prompts: list[str], negatives: list[str], num_images: int, guidance: bool,
                      max_tokens: int, device: torch.device, dtype: torch.dtype,
                      prompt_embeds: Tensor | None = None, prompt_mask: Tensor | None = None,
                      negative_embeds: Tensor | None = None, negative_mask: Tensor | None = None,
                      extra: dict[str, Tensor] | None = None) -> tuple[Conditioning, list[str]]:
    """The conditioning of B = len(prompts) × num_images images (prompt i's images in a row), with its warnings.
    ``prompts`` are already one per image where ``prompt_embeds`` is None (expanded prompts differ per image);
    given features are repeated ``num_images`` times. Negatives are encoded at the prompts' token length unless
    given (``negatives``: one per image, or one per row of ``prompt_embeds``)."""
    warnings: list[str] = []
    if prompt_embeds is None:
        cond, cmask, warnings = encode(prompts, max_tokens)
    else:
        cond, cmask = _repeat(prompt_embeds, num_images), _repeat(prompt_mask, num_images)
    uncond = umask = None
    if guidance:
        if negative_embeds is None:
            uncond, umask, _ = encode(negatives, cond.shape[1])
            if prompt_embeds is not None:
                uncond, umask = _repeat(uncond, num_images), _repeat(umask, num_images)
        else:
            uncond, umask = _repeat(negative_embeds, num_images), _repeat(negative_mask, num_images)
        uncond, umask = uncond.to(device, dtype), umask.to(device)
    return Conditioning(cond.to(device, dtype), cmask.to(device), uncond, umask, extra), warnings
