"""The demo's two VAEs: diffusers ``AutoencoderKL`` with f = 8 and 4 latent channels.

PixArt-Σ's first "weak-to-strong" step swaps PixArt-α's SD VAE for the better SDXL VAE.
The demo mirrors that with a weaker "VAE-α" (fewer channels, fewer steps) and a better
"VAE-Σ", both trained here on shapes-world scenes. Each gets ``scaling_factor`` = 1 / std
of its latents on held-out world images (as SD's 0.18215 was measured), and its
reconstruction PSNR on held-out images is recorded next to it in ``metrics.json``.
Weights are stored in fp16 (diffusers upcasts to fp32 on load by default) to keep the
shipped demo small.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from pixsigma.io import atomic_write, atomic_write_text
from pixsigma.sampling import from_pil

from .fit import fit, warmup_cosine
from .world import BACKGROUNDS, check_image_size, render, sample_scene, scene_rng

HELDOUT_SEED = 0  # scenes from the world's "heldout" domain: never seen by any training
EVAL_SIZE = 128  # the demo's base resolution


@dataclass(frozen=True)
class VAESpec:
    """Architecture and training schedule of one demo VAE."""

    block_out_channels: tuple[int, ...]
    steps: int
    layers_per_block: int = 1
    batch_size: int = 8
    # Whole scenes at small sizes, one size per batch: the world is scale-free, so 64 px scenes teach the
    # 128–256 px ones, and whole images (unlike crops of big ones) keep GroupNorm's image statistics honest.
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (64, 64), (96, 64), (64, 96))
    lr: float = 2e-3
    kl_weight: float = 1e-6
    object_weight: float = 4.0  # extra loss weight on object pixels: colour is rare next to background
    # Weight of the MSE between this VAE's latent means and a reference VAE's (``train_vae(align_to=…)``):
    # keeps a better VAE's latent space where a model trained on the weaker one already works (0 = off).
    align_weight: float = 0.0
    # Phase 2, after the joint training: ``decoder_steps`` of decoder-only training with the encoder frozen, so
    # the latent space (and every DiT trained on it) stays exactly as it was (as SD's ft-MSE decoders were
    # made). Each latent gets Gaussian noise of a std drawn uniformly in [0, decoder_noise] × the batch's latent
    # std: a DiT's samples are near, not on, the encoder's latents, and a decoder that has only seen exact
    # latents turns their small errors into blotches of wrong colour and ragged shapes.
    decoder_steps: int = 0
    decoder_noise: float = 0.0
    decoder_sizes: tuple[tuple[int, int], ...] = ((64, 64), (96, 64), (64, 96), (128, 128))
    decoder_lr: float = 5e-4

    def __post_init__(self) -> None:
        if len(self.block_out_channels) != 4:
            raise ValueError(f"block_out_channels must have 4 entries (f = 8), got {self.block_out_channels}")
        if any(c % 8 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels must be multiples of 8 (GroupNorm groups), got "
                             f"{self.block_out_channels}")
        if not self.align_weight >= 0:
            raise ValueError(f"align_weight must be >= 0 (0 = no latent alignment), got {self.align_weight}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if self.decoder_steps < 0 or not self.decoder_noise >= 0 or not self.decoder_lr > 0:
            raise ValueError(f"decoder_steps and decoder_noise must be >= 0 and decoder_lr > 0 (phase 2, the "
                             f"decoder-only refinement; 0 steps = none), got {self.decoder_steps}, "
                             f"{self.decoder_noise} and {self.decoder_lr}")
        for w, h in self.sizes + self.decoder_sizes:
            check_image_size(w, h)
            if w % 8 or h % 8:
                raise ValueError(f"training sizes must be multiples of 8 (f = 8), got {w}x{h}")


VAE_SPECS: dict[str, VAESpec] = {
    "alpha": VAESpec(block_out_channels=(16, 32, 32, 32), steps=700),
    # align_weight: a tiny DiT cannot relearn a far latent space in the few hundred steps of the paper's VAE swap.
    # decoder_noise: the noisier the latents phase 2 learns from, the cleaner the shapes it draws from a DiT's.
    "sigma": VAESpec(block_out_channels=(32, 48, 64, 64), steps=1200, align_weight=1.0, decoder_steps=1500,
                     decoder_noise=0.8),
}


def build_vae(spec: VAESpec) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=spec.block_out_channels,
                         layers_per_block=spec.layers_per_block, latent_channels=4, norm_num_groups=8,
                         sample_size=EVAL_SIZE, mid_block_add_attention=False)


def world_batch(rng: np.random.Generator, n: int, width: int, height: int) -> torch.Tensor:
    """(n, 3, height, width) freshly sampled training scenes in [-1, 1]."""
    return from_pil([render(sample_scene(rng), width, height) for _ in range(n)])


def _pixel_weights(x: torch.Tensor, object_weight: float) -> torch.Tensor:
    """(B, 1, H, W): 1 on background colours, 1 + object_weight elsewhere (objects and their edges)."""
    bg = torch.tensor(list(BACKGROUNDS.values()), dtype=x.dtype) / 127.5 - 1  # (N, 3)
    d2 = ((x[:, None] - bg[None, :, :, None, None]) ** 2).sum(2).amin(1)  # (B, H, W)
    return 1 + object_weight * (d2 > 0.01).to(x.dtype)[:, None]


def heldout_images(n: int = 64, size: int = EVAL_SIZE, seed: int = HELDOUT_SEED) -> torch.Tensor:
    """(n, 3, size, size) held-out world images in [-1, 1]."""
    return from_pil([render(sample_scene(scene_rng("heldout", seed, i)), size, size) for i in range(n)])


def _reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, object_weight: float) -> torch.Tensor:
    err = (rec - x) * _pixel_weights(x, object_weight).sqrt()
    return err.abs().mean() + (err ** 2).mean()


def train_vae(spec: VAESpec, seed: int = 0, max_seconds: float | None = None,
              log: Callable[[str], None] | None = None,
              align_to: AutoencoderKL | None = None,
              heldout: torch.Tensor | None = None) -> tuple[AutoencoderKL, dict]:
    """Train one VAE on world scenes (object-weighted L1 + MSE, a small KL, and with ``spec.align_weight``
    the latent-mean MSE to the frozen ``align_to``), then refine its decoder (``refine_decoder``, phase 2)
    when ``spec.decoder_steps`` > 0, recording the PSNR on ``heldout`` images between the phases
    (``psnr_db_phase1``) when given; deterministic for a seed unless the time budget ``max_seconds`` (per
    phase) stops it early."""
    if spec.align_weight > 0 and align_to is None:
        raise ValueError(f"align_weight {spec.align_weight} needs align_to: the VAE whose latents to stay near")
    torch.manual_seed(seed)
    rng = np.random.default_rng([11, seed])
    vae = build_vae(spec)
    if spec.align_weight > 0 and align_to.config.latent_channels != vae.config.latent_channels:
        raise ValueError(f"align_to has {align_to.config.latent_channels} latent channels, this VAE "
                         f"{vae.config.latent_channels}")
    with torch.no_grad():  # start log-variance at -8: posterior noise would otherwise drown the early signal
        vae.quant_conv.bias[vae.config.latent_channels:] = -8.0

    def step_loss(step: int) -> torch.Tensor:
        w, h = spec.sizes[step % len(spec.sizes)]
        x = world_batch(rng, spec.batch_size, w, h)  # (B, 3, H, W)
        post = vae.encode(x).latent_dist
        kl = post.kl().mean() / x[0].numel()
        loss = _reconstruction_loss(vae.decode(post.sample()).sample, x, spec.object_weight) + spec.kl_weight * kl
        if spec.align_weight > 0:
            with torch.no_grad():
                ref = align_to.encode(x.to(align_to.dtype)).latent_dist.mode().float()  # (B, 4, H/8, W/8)
            loss = loss + spec.align_weight * ((post.mean - ref) ** 2).mean()
        return loss

    vae.train()
    t0 = time.perf_counter()
    done, _ = fit(step_loss, torch.optim.Adam(vae.parameters(), lr=spec.lr), warmup_cosine(spec.steps), spec.steps,
                  f"vae {spec.block_out_channels}", max_seconds, log)
    vae.eval().requires_grad_(False)
    info = {"steps": done, "train_seconds": round(time.perf_counter() - t0, 1)}
    if spec.decoder_steps > 0:
        if heldout is not None:
            info["psnr_db_phase1"] = round(reconstruction_psnr(vae, heldout), 3)
        info.update(refine_decoder(vae, spec, seed=seed, max_seconds=max_seconds, log=log))
    return vae, info


def refine_decoder(vae: AutoencoderKL, spec: VAESpec, seed: int = 0, max_seconds: float | None = None,
                   log: Callable[[str], None] | None = None) -> dict:
    """Phase 2 in place: ``spec.decoder_steps`` of decoder-only training on noised encoder latents (see
    ``VAESpec.decoder_noise``). The encoder and ``quant_conv`` stay frozen, so ``encode`` is unchanged bit for
    bit and a DiT trained on this VAE's latents needs no retraining. Its own seeded stream makes the result a
    function of the phase-1 VAE and ``seed`` alone (``build_parts --refine-decoder`` applies it to a built VAE).
    """
    if spec.decoder_steps < 1:
        raise ValueError(f"refine_decoder needs spec.decoder_steps >= 1, got {spec.decoder_steps}")
    rng = np.random.default_rng([13, seed])
    gen = torch.Generator().manual_seed(seed)
    vae.requires_grad_(False)
    decoder = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for p in decoder:
        p.requires_grad_(True)

    def step_loss(step: int) -> torch.Tensor:
        w, h = spec.decoder_sizes[step % len(spec.decoder_sizes)]
        x = world_batch(rng, spec.batch_size, w, h)  # (B, 3, H, W)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()  # (B, 4, H/8, W/8)
            sigma = torch.rand(len(z), 1, 1, 1, generator=gen) * spec.decoder_noise * z.std()
            z = z + sigma * torch.randn(z.shape, generator=gen)
        return _reconstruction_loss(vae.decode(z).sample, x, spec.object_weight)

    vae.decoder.train()
    t0 = time.perf_counter()
    done, _ = fit(step_loss, torch.optim.Adam(decoder, lr=spec.decoder_lr), warmup_cosine(spec.decoder_steps),
                  spec.decoder_steps, "vae decoder", max_seconds, log)
    vae.eval().requires_grad_(False)
    return {"decoder_steps": done, "decoder_seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor, batch: int = 16) -> float:
    """Mean per-image PSNR (dB, pixel range [0, 1]) of decode(mode(encode(x)))."""
    vals = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = (((rec - x) / 2) ** 2).flatten(1).mean(1)  # (B,)
        vals.append(-10 * torch.log10(mse.clamp_min(1e-10)))
    return float(torch.cat(vals).mean())


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: torch.Tensor, seed: int = 0, batch: int = 16) -> float:
    """Std of sampled latents over held-out images (the diffusion model sees scaling_factor × this)."""
    gen = torch.Generator().manual_seed(seed)
    lat = [vae.encode(images[i:i + batch]).latent_dist.sample(gen) for i in range(0, len(images), batch)]
    return float(torch.cat(lat).std())


def finish_vae(vae: AutoencoderKL, name: str, spec: VAESpec, train_info: dict, images: torch.Tensor) -> dict:
    """Set ``scaling_factor`` = 1 / latent std and measure PSNR; returns the metrics to store."""
    std = latent_std(vae, images)
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return {"name": f"VAE-{'Σ' if name == 'sigma' else 'α'}", "psnr_db": round(reconstruction_psnr(vae, images), 3),
            "heldout_images": len(images), "heldout_size": list(images.shape[-2:]), "latent_std": round(std, 5),
            "scaling_factor": vae.config.scaling_factor, "params": sum(p.numel() for p in vae.parameters()),
            "spec": asdict(spec), **train_info}


def save_vae(vae: AutoencoderKL, folder: str | Path, metrics: dict) -> None:
    """fp16 weights + config + ``metrics.json`` into ``folder`` (the caller makes the folder swap atomic)."""
    folder = Path(folder)
    vae.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    if config.pop("_name_or_path", None) is not None:  # a VAE loaded from a folder would record where it was
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    weights = folder / "diffusion_pytorch_model.safetensors"
    half = {k: v.to(torch.float16) for k, v in load_file(weights).items()}  # halves the shipped size
    atomic_write(weights, lambda tmp: save_file(half, tmp, metadata={"format": "pt"}))
    atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
