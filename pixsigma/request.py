"""What one generation asks (``GenerationRequest``, the one validated form of every call: CLI, app, API and
diffusers' ``pipe(...)``) and what it gives back (``GenerationResult``). Refused here, before any work.

The tensor fields (``latents``, ``prompt_embeds`` …, ``generator``) are diffusers' inputs given as tensors; they
take the place of what the request's other fields would make (``pixsigma.stack``) and are left out of equality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from pixsigma.config import KVCompress
from pixsigma.control import check_control_request
from pixsigma.edit import check_edit_request
from pixsigma.folder_settings import check_sampling
from pixsigma.lora import parse_loras
from pixsigma.sampling import SAMPLERS

Tensor = torch.Tensor
MAX_IMAGES = 16
SEED_RANGE = 2**63


def _tensor(value: Any, name: str, ndim: int) -> None:
    if value is not None and (not isinstance(value, Tensor) or value.ndim != ndim):
        raise ValueError(f"{name} must be a {ndim}-dimensional torch.Tensor or None, got "
                         f"{getattr(value, 'shape', type(value).__name__)}")


def generators(value: Any) -> list[torch.Generator] | None:
    """A request's ``generator`` as a list (one per image, or one for all), refused unless torch.Generators."""
    if value is None:
        return None
    gens = list(value) if isinstance(value, list | tuple) else [value]
    if not gens or not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError(f"generator must be a torch.Generator, a list of them (one per image) or None, got "
                         f"{value!r}")
    return gens


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | list[str] | None  # None only with prompt_embeds
    negative_prompt: str | list[str] = ""  # a list: one per prompt
    width: int | None = None  # None: the model's base resolution
    height: int | None = None
    steps: int | None = None  # None: the model folder's (SamplingDefaults), else the sampler's
    guidance: float | None = None  # None: the model folder's (SamplingDefaults), else DEFAULT_GUIDANCE
    sampler: str | None = None  # None / "default": the model folder's scheduler
    seed: int | None = None  # None: a random seed, reported in the result (or the generator's initial seed)
    num_images: int = 1  # per prompt
    binning: bool = True
    kv: KVCompress | None = None  # None: the model's own; KVCompress(): off
    guidance_interval: tuple[float, float] | None = None  # CFG only for t in [low, high] (changes the image)
    expand_prompt: bool = True  # rewrite prompts with the model folder's prompt_expander, where it names one
    loras: str | tuple | None = None  # LoRAs for this request only ("PATH[:SCALE], …"); None: the pipeline's own
    # ControlNet (pixsigma.control): an image the pipeline's ControlNet follows, how it becomes a map, how strongly
    control_image: Image.Image | None = None
    control_type: str | None = None  # None: the type the ControlNet was trained on (its folder's), else canny
    control_scale: float = 1.0
    # Image-to-image and inpainting (pixsigma.edit): the input (also the default output size), white = repaint,
    # how far the input is noised (None: 0.8, with a mask 1.0)
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float | None = None
    # diffusers' PixArtSigmaPipeline arguments with their meaning (pixsigma.diffusers_call)
    timesteps: tuple[int, ...] | None = None  # the scheduler's custom timesteps instead of ``steps`` of them
    sigmas: tuple[float, ...] | None = None  # the scheduler's custom sigmas instead of ``steps`` of them
    eta: float = 0.0  # DDIM's η (schedulers without it ignore it)
    max_sequence_length: int | None = None  # T5 tokens read; None: the model's own (300 for Σ, 120 for α)
    clean_caption: bool = False  # diffusers' caption cleaning (needs bs4 and ftfy, else a warning)
    decode: bool = True  # False: no VAE decode; the result carries the latents only (diffusers' "latent")
    latents: Tensor | None = field(default=None, compare=False)  # (B, C, h, w) start noise instead of the seed's
    prompt_embeds: Tensor | None = field(default=None, compare=False)  # (B, L, C) T5 features instead of prompt
    prompt_attention_mask: Tensor | None = field(default=None, compare=False)  # (B, L), with prompt_embeds
    negative_prompt_embeds: Tensor | None = field(default=None, compare=False)
    negative_prompt_attention_mask: Tensor | None = field(default=None, compare=False)
    generator: Any = field(default=None, compare=False)  # torch.Generator(s) the noise is drawn from

    def __post_init__(self) -> None:
        if self.prompt_embeds is not None:
            if self.prompt is not None:
                raise ValueError("give prompt or prompt_embeds, not both")
            _tensor(self.prompt_embeds, "prompt_embeds", 3)
            _tensor(self.prompt_attention_mask, "prompt_attention_mask", 2)
            if self.prompt_attention_mask is None:
                raise ValueError("prompt_embeds needs its prompt_attention_mask (B, L)")
        else:
            prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt or [])
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompt must be a string or a non-empty list of strings")
        _tensor(self.negative_prompt_embeds, "negative_prompt_embeds", 3)
        _tensor(self.negative_prompt_attention_mask, "negative_prompt_attention_mask", 2)
        if (self.negative_prompt_embeds is None) != (self.negative_prompt_attention_mask is None):
            raise ValueError("negative_prompt_embeds and negative_prompt_attention_mask go together")
        _tensor(self.latents, "latents", 4)
        negs = self.negative_prompt
        if not isinstance(negs, str) and (not isinstance(negs, list | tuple) or len(negs) != self.batch_size
                                          or not all(isinstance(n, str) for n in negs)):
            raise ValueError(f"negative_prompt must be a string or a list of one string per prompt "
                             f"({self.batch_size}), got {negs!r}")
        check_sampling(self.steps, self.guidance)
        if self.loras is not None:
            object.__setattr__(self, "loras", tuple(parse_loras(self.loras)))
        for name in ("expand_prompt", "clean_caption", "decode", "binning"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.sampler not in (None, *SAMPLERS):
            raise ValueError(f"unknown sampler {self.sampler!r}; accepted: {', '.join(SAMPLERS)}")
        if not isinstance(self.num_images, int) or not 1 <= self.num_images <= MAX_IMAGES:
            raise ValueError(f"num_images must be an integer in 1-{MAX_IMAGES}, got {self.num_images!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < SEED_RANGE):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        gens = generators(self.generator)
        if gens is not None and len(gens) not in (1, self.batch_size * self.num_images):
            raise ValueError(f"generator: pass one torch.Generator or one per image "
                             f"({self.batch_size * self.num_images}), got a list of {len(gens)}")
        gi = self.guidance_interval
        if gi is not None and (len(gi) != 2 or not 0 <= gi[0] <= gi[1]):
            raise ValueError(f"guidance_interval must be (low, high) timesteps with 0 <= low <= high, got {gi!r}")
        if self.timesteps is not None and self.sigmas is not None:
            raise ValueError("give timesteps or sigmas, not both")
        for name in ("timesteps", "sigmas"):
            v = getattr(self, name)
            if v is not None:
                if not isinstance(v, list | tuple) or not v or not all(isinstance(x, int | float) for x in v):
                    raise ValueError(f"{name} must be a non-empty list of numbers or None, got {v!r}")
                object.__setattr__(self, name, tuple(v))
        if isinstance(self.eta, bool) or not isinstance(self.eta, int | float) or not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be a number in [0, 1] (DDIM's η), got {self.eta!r}")
        msl = self.max_sequence_length
        if msl is not None and (not isinstance(msl, int) or isinstance(msl, bool) or msl < 1):
            raise ValueError(f"max_sequence_length must be a positive integer or None, got {msl!r}")
        check_control_request(self.control_image, self.control_type, self.control_scale)
        check_edit_request(self.init_image, self.mask, self.strength)
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

    @property
    def batch_size(self) -> int:
        """Prompts (or rows of prompt_embeds) in the request; each gives ``num_images`` images."""
        if self.prompt_embeds is not None:
            return int(self.prompt_embeds.shape[0])
        return 1 if isinstance(self.prompt, str) else len(self.prompt)

    @property
    def prompts(self) -> list[str]:
        """The prompts as typed ("" for each row of prompt_embeds)."""
        if self.prompt is None:
            return [""] * self.batch_size
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def negative_prompts(self) -> list[str]:
        """One negative prompt per prompt."""
        negs = self.negative_prompt
        return [negs] * self.batch_size if isinstance(negs, str) else list(negs)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seed: int
    params: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_bytes: int | None = None
    width: int = 0
    height: int = 0
    control_map: Image.Image | None = None  # the preprocessed control map the ControlNet read
    latents: Tensor | None = None  # (B, C, h, w) the final latents (diffusers' output_type="latent")
    pixels: Tensor | None = None  # (B, 3, H, W) the decoded images in [-1, 1] at the asked size, before PIL
