"""The parts the bench runs, built in memory with random weights (nothing comes from a model hub).

Three sizes of everything: ``xl`` is the released PixArt-Σ (XL/2 DiT, a T5-XXL-sized
encoder, an SDXL-sized VAE), ``demo`` the shipped shapes-world DiT architecture (the CPU
fallback when the trained demo is absent), ``tiny`` the unit-test scale (``--quick``).
The peer is diffusers' ``PixArtTransformer2DModel`` loaded with exactly the weights
pixsigma runs; a KV-compressed pixsigma model adds only the compression layers, at their
"Conv Avg Init".
"""

from __future__ import annotations

import torch

from pixsigma.config import PRESETS, DiTConfig, KVCompress, default_kv
from pixsigma.model.dit import PixArtDiT
from pixsigma.text import word_level_tokenizer
from pixsigma.weights import KV_KEYS, diffusers_config, to_diffusers_state_dict

ARCHS = ("xl", "demo", "tiny")
_BASE = {"xl": "XL_2_1024", "demo": "demo", "tiny": "tiny"}

# T5 v1.1 XXL (the PixArt text encoder): 4.76 B parameters, 9.5 GB in bf16.
T5_XXL = dict(vocab_size=32128, d_model=4096, num_layers=24, num_heads=64, d_ff=10240, d_kv=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)
# SDXL's VAE (PixArt-Σ decodes with it): 84 M parameters, tile size 1024 px.
SDXL_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.13025, force_upcast=True)
_SMALL_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=64)
VOCAB = ("a an the of on in with and red blue green yellow orange purple white black star circle square ring "
         "triangle small large above below left right photo lighthouse cat mountain lake sunset").split()


def dit_config(arch: str, resolution: int, kv: bool = False) -> DiTConfig:
    """The ``arch`` DiT configured for base ``resolution`` (its PE interpolation), with or without KV."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; accepted: {', '.join(ARCHS)}")
    cfg = PRESETS[_BASE[arch]].at_resolution(resolution)
    return cfg.with_kv(default_kv(cfg.depth)) if kv else cfg


@torch.no_grad()
def random_dit_weights(config: DiTConfig, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Original-layout weights of a DiT without KV, every tensor random (the default init zeroes the
    output layers, which would make every output 0 and every equality check pass trivially)."""
    with torch.device(device):
        model = PixArtDiT(config.with_kv(KVCompress()))
    gen = torch.Generator(device=device).manual_seed(seed)
    for p in model.parameters():
        p.normal_(0.0, 0.02, generator=gen)  # the scale of a trained DiT's weights
    return model.state_dict()


@torch.no_grad()
def build_pixsigma(config: DiTConfig, weights: dict[str, torch.Tensor], device: torch.device,
                   dtype: torch.dtype) -> PixArtDiT:
    """pixsigma's DiT with ``weights``; KV-compressed layers keep their average-init ``sr``/``norm``."""
    with torch.device(device):
        model = PixArtDiT(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    bad = [k for k in missing if not KV_KEYS.match(k)] + list(unexpected)
    if bad:
        raise RuntimeError(f"weights do not fit the {config.depth}-block DiT: {bad[:3]}")
    return model.to(dtype).eval()


@torch.no_grad()
def build_peer(config: DiTConfig, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    """diffusers' ``PixArtTransformer2DModel`` with the same weights (the peer; it has no KV compression)."""
    from diffusers import PixArtTransformer2DModel

    kwargs = {k: v for k, v in diffusers_config(config).items() if not k.startswith("_")}
    with torch.device(device):
        model = PixArtTransformer2DModel(**kwargs)
    model.load_state_dict(to_diffusers_state_dict({k: v for k, v in weights.items()}), strict=True)
    return model.to(dtype).eval()


def dit_inputs(config: DiTConfig, resolution: int, batch: int, device: torch.device, dtype: torch.dtype,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """One step's inputs at a square ``resolution``: noisy latents, timesteps, caption features and a mask
    with 40 % real tokens (prompts are padded to ``max_tokens``; padding is masked, as in the pipeline)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    side = resolution // 8
    tokens, real = config.max_tokens, max(1, config.max_tokens * 2 // 5)
    mask = torch.zeros(batch, tokens)
    mask[:, :real] = 1
    return {"x": torch.randn(batch, config.in_channels, side, side, generator=gen).to(device, dtype),  # (B,4,S,S)
            "t": torch.full((batch,), 500.0, device=device),  # (B,)
            "y": torch.randn(batch, tokens, config.caption_channels, generator=gen).to(device, dtype),  # (B,L,C)
            "mask": mask.to(device)}  # (B, L)


def run_pixsigma(model: PixArtDiT, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(inputs["x"], inputs["t"], inputs["y"], inputs["mask"])


def run_peer(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(inputs["x"], encoder_hidden_states=inputs["y"], timestep=inputs["t"],
                 encoder_attention_mask=inputs["mask"], added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                 return_dict=False)[0]


def build_tokenizer():
    """An in-memory word-level tokenizer (T5's SentencePiece model would need the hub); T5 compute does not
    depend on which ids it sees, only on the padded length."""
    return word_level_tokenizer(VOCAB)


@torch.no_grad()
def build_t5(arch: str, caption_channels: int, device: torch.device, dtype: torch.dtype):
    """A random T5 encoder: T5-XXL-sized for ``xl``, a small one with ``caption_channels`` outputs otherwise."""
    from transformers import T5Config, T5EncoderModel

    if arch == "xl":
        if caption_channels != T5_XXL["d_model"]:
            raise ValueError(f"XL DiT reads {caption_channels} caption channels, T5-XXL gives {T5_XXL['d_model']}")
        cfg = T5Config(**T5_XXL)
    else:
        cfg = T5Config(vocab_size=64, d_model=caption_channels, d_kv=16, d_ff=2 * caption_channels, num_layers=2,
                       num_heads=max(1, caption_channels // 32), feed_forward_proj="gated-gelu")
    torch.manual_seed(1)
    with torch.device(device):  # initialise where it runs: 4.8 B parameters init in seconds on a GPU
        model = T5EncoderModel(cfg)
    return model.to(dtype).eval()


@torch.no_grad()
def build_vae(arch: str, device: torch.device, dtype: torch.dtype):
    """A random AutoencoderKL: SDXL-sized for ``xl``, a tiny one otherwise."""
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    with torch.device(device):
        model = AutoencoderKL(**(SDXL_VAE if arch == "xl" else _SMALL_VAE))
    return model.to(dtype).eval()


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
