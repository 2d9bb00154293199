"""Text -> image: T5 features -> CFG sampling with a diffusers scheduler -> VAE decode -> PIL.

With the same folder, seed and settings this makes the same image as diffusers'
``PixArtSigmaPipeline`` (noise drawn on the CPU from one generator, prompts
lower-cased and stripped, padding to the model's token length, binning on the
PixArt tables, bilinear cover-resize + centre-crop back to the asked size). A folder whose ``sampling.json``
names a prompt expander (``folder_settings``) has its prompts rewritten first, which diffusers does not do:
``GenerationRequest(expand_prompt=False)`` gives the prompts as typed.
"""

from __future__ import annotations

import json
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pixsigma.buckets import check_size, nearest_bucket
from pixsigma.config import PREDICTION_TYPES, KVCompress
from pixsigma.constants import DTYPE_NAMES, MAX_TOKENS, TILED_DECODE_FROM, VAE_SCALE_FACTOR
from pixsigma.control import apply_control, check_control_request, controlnet_for, default_control_type
from pixsigma.diffusers_call import DiffusersCall, dtype_name
from pixsigma.edit import check_edit_request, plan_edit
from pixsigma.folder_settings import SamplingDefaults, adapter_sampling, check_sampling
from pixsigma.lora import LoraStack, parse_loras
from pixsigma.model.controlnet import ControlNet
from pixsigma.model.dit import PixArtDiT
from pixsigma.registry import MODEL_ALIASES, load_expander
from pixsigma.sampling import (
    SAMPLERS,
    decode,
    denoise,
    initial_noise,
    latent_preview_array,
    make_scheduler,
    micro_conditions,
    resize_and_crop,
    to_pil,
)
from pixsigma.t5 import check_t5_precision, load_t5, quiet_torchao, to_device, to_host
from pixsigma.text import encode_text, token_lengths, unknown_words
from pixsigma.weights import LAYOUTS, MODEL_INDEX, PIXSIGMA_CONFIG, load_dit

__all__ = ["SAMPLERS", "GenerationRequest", "GenerationResult", "PixSigmaPipeline", "SamplingDefaults",
           "default_dtype", "latent_preview", "resolve_model", "OutOfMemory"]

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))
MAX_IMAGES = 16
TEXT_CACHE = 32  # distinct prompts whose T5 features are kept
ALPHA_TOKENS = 120  # PixArt-α's T5 length
MEMORY_HINTS = ("--dtype bf16 (or fp16), --offload-t5, fewer --num-images, a smaller --width/--height, "
                "--kv-compress 2 (KV token compression), or tiled decoding (on from 2K)")


class OutOfMemory(RuntimeError):
    """Raised instead of a bare CUDA OOM, naming what lowers memory."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | list[str]
    negative_prompt: str = ""
    width: int | None = None  # None: the model's base resolution
    height: int | None = None
    steps: int | None = None  # None: the model folder's (SamplingDefaults), else the sampler's
    guidance: float | None = None  # None: the model folder's (SamplingDefaults), else DEFAULT_GUIDANCE
    sampler: str | None = None  # None / "default": the model folder's scheduler
    seed: int | None = None  # None: a random seed, reported in the result
    num_images: int = 1  # per prompt
    binning: bool = True
    kv: KVCompress | None = None  # None: the model's own; KVCompress(): off
    guidance_interval: tuple[float, float] | None = None  # CFG only for t in [low, high] (changes the image)
    expand_prompt: bool = True  # rewrite prompts with the model folder's prompt_expander, where it names one
    loras: str | tuple | None = None  # LoRAs for this request ("PATH[:SCALE], …", pixsigma.lora); None: as set
    # ControlNet (pixsigma.control): an image the pipeline's ControlNet follows, how it becomes a map, how strongly
    control_image: Image.Image | None = None
    control_type: str | None = None  # None: the type the ControlNet was trained on (its folder's), else canny
    control_scale: float = 1.0
    # Image-to-image and inpainting (pixsigma.edit): the input (also the default output size), white = repaint,
    # how far the input is noised (None: 0.8, with a mask 1.0)
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float | None = None

    def __post_init__(self) -> None:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        check_sampling(self.steps, self.guidance)
        if self.loras is not None:
            object.__setattr__(self, "loras", tuple(parse_loras(self.loras)))
        if not isinstance(self.expand_prompt, bool):
            raise ValueError(f"expand_prompt must be true or false, got {self.expand_prompt!r}")
        if self.sampler not in (None, *SAMPLERS):
            raise ValueError(f"unknown sampler {self.sampler!r}; accepted: {', '.join(SAMPLERS)}")
        if not isinstance(self.num_images, int) or not 1 <= self.num_images <= MAX_IMAGES:
            raise ValueError(f"num_images must be an integer in 1-{MAX_IMAGES}, got {self.num_images!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        gi = self.guidance_interval
        if gi is not None and (len(gi) != 2 or not 0 <= gi[0] <= gi[1]):
            raise ValueError(f"guidance_interval must be (low, high) timesteps with 0 <= low <= high, got {gi!r}")
        check_control_request(self.control_image, self.control_type, self.control_scale)
        check_edit_request(self.init_image, self.mask, self.strength)
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


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


def latent_preview(latents: torch.Tensor) -> Image.Image:
    """A cheap preview of the first latent (no VAE), for progress displays."""
    return Image.fromarray(latent_preview_array(latents).numpy())


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N, mps") from None


def default_dtype(device: torch.device) -> str:
    """The dtype a model runs in when none is asked (the CLI, the app, ``from_pretrained``): bf16 on CUDA (half
    the memory of fp32, without fp16's T5 overflow), fp32 elsewhere (CPUs and MPS are slow or unsupported in bf16)."""
    return "bf16" if device.type == "cuda" else "fp32"


def resolve_model(model: str) -> Path:
    """A local pipeline folder, a shipped demo name, or a hub id (downloaded through huggingface_hub)."""
    if model in MODEL_ALIASES:
        path = MODEL_ALIASES[model]
        if not (path / MODEL_INDEX).is_file():
            raise FileNotFoundError(f"demo model {model!r} is missing at {path}; rebuild it with "
                                    "`python -m shapes.build` (from a clone of the repository)")
        return path
    path = Path(model).expanduser()
    if path.exists():
        if not (path / MODEL_INDEX).is_file():
            raise FileNotFoundError(f"{path} is not a pipeline folder (no model_index.json). --model accepts a "
                                    "diffusers pipeline folder (model_index.json, transformer/, vae/, text_encoder/, "
                                    "tokenizer/, scheduler/), a hub id such as PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, "
                                    f"or 'demo'; --transformer accepts {'; '.join(LAYOUTS)}")
        return path
    if model.count("/") == 1 and not model.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as e:
            raise FileNotFoundError(f"cannot get hub model {model!r} ({type(e).__name__}: {str(e)[:200]}); "
                                    "download it where there is network and pass the local folder") from None
    raise FileNotFoundError(f"model {model!r} not found: no such folder, not a hub id (owner/name), not 'demo'. "
                            "--model accepts a diffusers pipeline folder (model_index.json, transformer/, vae/, "
                            "text_encoder/, tokenizer/, scheduler/), a hub id such as "
                            "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, or 'demo' / 'demo-alpha'")


class PixSigmaPipeline(DiffusersCall):
    """The loaded parts of a PixArt pipeline folder, and ``generate`` (diffusers' call: ``pixsigma.diffusers_call``)."""

    t5_precision: str | None = None  # T5's --t5 precision (pixsigma.t5), None: the pipeline's dtype

    def __init__(self, transformer: PixArtDiT, vae, text_encoder, tokenizer, scheduler_config: dict | None,
                 device: torch.device, dtype: torch.dtype, offload_t5: bool = False, name: str = "",
                 sampling: SamplingDefaults | None = None, controlnet: ControlNet | None = None):
        self.transformer, self.vae, self.text_encoder, self.tokenizer = transformer, vae, text_encoder, tokenizer
        self.scheduler_config, self.device, self.dtype = scheduler_config, device, dtype
        self.offload_t5, self.name = offload_t5, name
        self.sampling = sampling or SamplingDefaults()
        self.controlnet = controlnet  # pixsigma.model.controlnet; used when a request has a control image
        self.max_tokens = transformer.config.max_tokens
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.loras = LoraStack(transformer)  # LoRA adapters: hooks on the DiT, never a reload (pixsigma.lora)

    @classmethod
    def from_pretrained(cls, model: str, transformer: str | None = None, device: str = "auto",
                        dtype: str | None = None, offload_t5: bool = False, kv: KVCompress | None = None,
                        speed: str = "eager", t5_precision: str | None = None,
                        controlnet: str | None = None, torch_dtype: torch.dtype | None = None) -> PixSigmaPipeline:
        """``dtype``: fp32, bf16 or fp16 (None: ``default_dtype`` of the device). ``speed``: how the DiT runs
        (``pixsigma.speed.MODES``: eager, sdpa, compile, graphs); never what it computes. ``t5_precision``:
        fp32, bf16 or int8 (8-bit weights; ``pixsigma.t5``); None: T5 in ``dtype``. ``controlnet``: a
        ControlNet (``pixsigma.controlnet_weights``); None: the one the model folder ships, if any.
        ``torch_dtype`` (diffusers' name): torch.float32, torch.bfloat16 or torch.float16, the same as ``dtype``."""
        with quiet_torchao():  # diffusers imports torchao, when installed, with its models
            from diffusers import AutoencoderKL
        from transformers import AutoTokenizer

        check_t5_precision(t5_precision)
        dtype = dtype_name(dtype, torch_dtype)

        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
        dev = resolve_device(device)
        torch_dtype = DTYPES[dtype or default_dtype(dev)]
        folder = resolve_model(model)
        # a checkpoint file takes the folder's architecture where its shapes agree (heads, base size, PE)
        dit = load_dit(transformer or folder, device=dev, dtype=torch_dtype, kv=kv, like=folder)
        if speed != "eager":
            from pixsigma.speed import optimize

            optimize(dit, speed)
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch_dtype).to(dev).eval()
        text_encoder = load_t5(folder / "text_encoder", t5_precision, torch_dtype, dev, offload_t5)
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        sched_file = folder / "scheduler" / "scheduler_config.json"
        sched = json.loads(sched_file.read_text()) if sched_file.is_file() else None
        meta = _pixsigma_meta(folder, transformer)  # read once: the prediction type and the token length
        if meta is None and sched and sched.get("prediction_type") in PREDICTION_TYPES:
            # a diffusers-layout DiT cannot say what it predicts; its pipeline's scheduler does
            dit.config = replace(dit.config, prediction_type=sched["prediction_type"])
        pipe = cls(dit, vae, text_encoder, tokenizer, sched, dev, torch_dtype, offload_t5, name=model,
                   sampling=SamplingDefaults.read(folder))
        pipe.max_tokens = _token_length(folder, transformer, meta)
        pipe.t5_precision = t5_precision
        pipe.controlnet = controlnet_for(folder, controlnet, dit)
        return pipe

    def set_loras(self, loras: str | list | None) -> None:
        """Apply exactly these LoRAs (``"PATH[:SCALE], …"``, a list of those, or ``LoraSpec``s; empty: none)."""
        self.loras.set(parse_loras(loras))

    # -- text ---------------------------------------------------------------------------------------------
    def unknown_words(self, prompt: str) -> list[str]:
        """Words this model's tokenizer can only map to its unknown token (the demo's closed vocabulary)."""
        return unknown_words(self.tokenizer, prompt)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(B, L, C) T5 features, (B, L) mask, and a warning per prompt cut at the token limit."""
        texts = [p.lower().strip() for p in prompts]
        warnings: list[str] = []
        need = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if need:
            if self.offload_t5 and self.device.type != "cpu":
                to_device(self.text_encoder, self.device)
            emb, mask = encode_text(self.tokenizer, self.text_encoder, need, self.max_tokens)
            if self.offload_t5 and self.device.type != "cpu":
                to_host(self.text_encoder)  # back to its pinned host copy
                torch.cuda.empty_cache()
            for i, t in enumerate(need):
                self._text_cache[t] = (emb[i].to(self.device), mask[i].to(self.device))
        for p, n in zip(prompts, token_lengths(self.tokenizer, texts)):
            if n > self.max_tokens:
                warnings.append(f"prompt {p[:40]!r}… is {n} tokens; the model reads {self.max_tokens}, "
                                f"so the last {n - self.max_tokens} tokens were dropped")
        emb = torch.stack([self._text_cache[t][0] for t in texts])
        mask = torch.stack([self._text_cache[t][1] for t in texts])
        for t in texts:  # most recently used last; evict only after this batch is served
            self._text_cache.move_to_end(t)
        while len(self._text_cache) > max(TEXT_CACHE, len(set(texts))):
            self._text_cache.popitem(last=False)
        return emb, mask, warnings

    def expand(self, prompts: list[str], seed: int) -> list[str]:
        """What the model reads for ``prompts`` (image ``i`` of a request drawn from ``seed + i``): the folder's
        prompt expander applied, or the prompts as they are where it names none."""
        if self.sampling.prompt_expander is None:
            return list(prompts)
        fn = load_expander(self.sampling.prompt_expander)
        return [fn(p, seed + i) for i, p in enumerate(prompts)]

    # -- images -------------------------------------------------------------------------------------------
    @property
    def base_resolution(self) -> int:
        return self.transformer.config.sample_size * VAE_SCALE_FACTOR

    def plan_size(self, req: GenerationRequest) -> tuple[int, int, int, int]:
        """(asked h, asked w, generated h, generated w)."""
        own = req.init_image.size if req.init_image is not None else (self.base_resolution,) * 2  # (w, h)
        h = req.height or own[1]
        w = req.width or own[0]
        if req.binning:
            gh, gw = nearest_bucket(h, w, self.base_resolution)
        else:
            check_size(h, w)
            gh, gw = h, w
        return h, w, gh, gw

    def sampling_for(self, req: GenerationRequest) -> SamplingDefaults:
        """This model's ``sampling`` defaults under those of the LoRAs the request applies (else the applied
        ones): a few-step adapter's ``sampling.json`` brings its sampler, steps and guidance."""
        paths = [s.path for s in req.loras if s.scale] if req.loras is not None else \
            [p for p, scale in self.loras.active if scale]
        return self.sampling.with_adapters([adapter_sampling(p) for p in paths])

    def resolve_sampling(self, req: GenerationRequest) -> tuple[float, int]:
        """(guidance, steps) a request runs with: its own, else this model's (and its adapters') ``sampling``
        defaults (their steps go with their own sampler only), else the sampler's."""
        _, steps, guidance = self.sampling_for(req).resolve(req.sampler, req.steps, req.guidance)
        return guidance, steps

    @torch.no_grad()
    def generate(self, req: GenerationRequest,
                 callback: Callable[[int, int, torch.Tensor], None] | None = None) -> GenerationResult:
        try:
            return self._generate(req, callback)
        except torch.OutOfMemoryError as e:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemory(f"out of memory generating {req.width}x{req.height} × {req.num_images}: "
                              f"lower memory with {MEMORY_HINTS}") from e

    def _generate(self, req: GenerationRequest, callback) -> GenerationResult:
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        sampler, steps, guidance = self.sampling_for(req).resolve(req.sampler, req.steps, req.guidance)
        if req.loras is not None:
            self.set_loras(list(req.loras))  # a swap of hooks, never a reload
        seed = req.seed if req.seed is not None else random.SystemRandom().randrange(2**31)
        h, w, gh, gw = self.plan_size(req)
        dit = self.transformer
        if req.kv is not None and req.kv != dit.config.kv_compress:
            own = dit.config.kv_compress
            dit.set_kv_compress(req.kv)
        else:
            own = None
        try:
            asked = [p for p in req.prompts for _ in range(req.num_images)]
            prompts = self.expand(asked, seed) if req.expand_prompt else asked
            cond, cmask, warnings = self.encode_prompts(prompts)
            if guidance > 1.0:
                uncond, umask, _ = self.encode_prompts([req.negative_prompt] * len(prompts))
                y, mask = torch.cat([uncond, cond]), torch.cat([umask, cmask])  # (2B, L, C), (2B, L)
            else:
                y, mask = cond, cmask
            y = y.to(self.dtype)
            scheduler = make_scheduler(sampler, self.scheduler_config, dit.config.prediction_type)
            shape = (len(prompts), dit.config.in_channels, gh // VAE_SCALE_FACTOR, gw // VAE_SCALE_FACTOR)
            latents, gen = initial_noise(shape, seed, self.device, self.dtype, scheduler.init_noise_sigma)
            edit = None
            if req.init_image is not None:  # image-to-image / inpainting from the same seed's noise (pixsigma.edit)
                noise = initial_noise(shape, seed, self.device, self.dtype)[0]
                edit, edit_warnings = plan_edit(self.vae, req.init_image, req.mask, req.strength, (w, h), (gw, gh),
                                                noise)
                warnings += edit_warnings
            extra = micro_conditions(dit.config, y.shape[0], gh, gw, self.dtype, self.device)

            call, control_map = dit, None
            if req.control_image is not None:
                call, extra, control_map, control_warnings = apply_control(self, req, gh, gw, y.shape[0], extra)
                warnings += control_warnings
            if req.guidance_interval is not None and guidance > 1.0:
                from pixsigma.speed import cfg_interval

                call = cfg_interval(dit, *req.guidance_interval)

            def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return call(x, t, y, mask, **extra)

            latents = denoise(model_fn, scheduler, latents, steps, guidance, gen, callback,
                              dit.config.learn_sigma, edit)
            images = decode(self.vae, latents, tiled=max(gh, gw) >= TILED_DECODE_FROM)
            if req.binning:
                images = resize_and_crop(images, h, w)
            pil = to_pil(images) if edit is None else edit.finish(to_pil(images))
        finally:
            if own is not None:
                dit.set_kv_compress(own)
        kv = req.kv if req.kv is not None else dit.config.kv_compress
        params = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": seed, "steps": steps,
                  "guidance": guidance, "sampler": sampler, "width": w, "height": h,
                  "generated_size": [gw, gh], "binning": req.binning, "model": self.name,
                  "kv_compress": {"ratio": kv.ratio, "layers": list(kv.layers), "operator": kv.operator},
                  "dtype": str(self.dtype).removeprefix("torch."), "generator": "pixsigma"}
        if self.loras.active:
            params["loras"] = [{"path": p, "scale": s} for p, s in self.loras.active]
        if req.guidance_interval is not None:
            params["guidance_interval"] = list(req.guidance_interval)
        if self.t5_precision is not None:  # int8 T5 changes the image slightly
            params["t5"] = self.t5_precision
        if req.control_image is not None:
            params["control"] = {"type": req.control_type or default_control_type(self.controlnet),
                                 "scale": req.control_scale}
        if edit is not None:
            params["edit"] = edit.params
        if prompts != asked:  # what the model read, image by image (DALL-E 3's "revised prompt")
            params["expanded_prompts"] = prompts
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return GenerationResult(pil, seed, params, warnings,
                                time.perf_counter() - start, peak, w, h, control_map)


def _pixsigma_meta(folder: Path, transformer: str | None) -> dict | None:
    """The ``pixsigma.json`` of the DiT a pipeline loads (the --transformer, else the folder's), if it has one."""
    cand = Path(transformer) if transformer else folder / "transformer"
    meta = cand / PIXSIGMA_CONFIG
    return json.loads(meta.read_text()) if meta.is_file() else None


def _token_length(folder: Path, transformer: str | None, meta: dict | None) -> int:
    """T5 tokens the model was trained with: a pixsigma folder says so (``meta``, the loaded DiT's; else the
    pipeline folder's own DiT's); diffusers folders imply it by pipeline class (PixArt-α: 120, PixArt-Σ: 300)."""
    if meta is None and transformer:
        meta = _pixsigma_meta(folder, None)
    if meta is not None:
        return int(meta["dit"]["max_tokens"])
    index = json.loads((folder / MODEL_INDEX).read_text())
    return ALPHA_TOKENS if index.get("_class_name") == "PixArtAlphaPipeline" else MAX_TOKENS
