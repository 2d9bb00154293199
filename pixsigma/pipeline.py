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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer

from pixsigma.buckets import check_size, nearest_bucket
from pixsigma.config import PREDICTION_TYPES, KVCompress
from pixsigma.constants import MAX_TOKENS, TILED_DECODE_FROM, VAE_SCALE_FACTOR
from pixsigma.control import controlnet_for, default_control_type
from pixsigma.device import DTYPES, default_dtype, dtype_name, resolve_device
from pixsigma.diffusers_call import DiffusersCall
from pixsigma.edit import Edit, plan_edit
from pixsigma.folder_settings import SamplingDefaults, adapter_sampling
from pixsigma.images import resize_and_crop, to_pil
from pixsigma.lora import LoraStack, parse_loras
from pixsigma.model.controlnet import ControlNet
from pixsigma.model.dit import PixArtDiT
from pixsigma.registry import MODEL_ALIASES, load_expander
from pixsigma.request import MAX_IMAGES, GenerationRequest, GenerationResult, generators
from pixsigma.sampling import SAMPLERS, decode, latent_preview_array, make_scheduler, micro_conditions
from pixsigma.speed import optimize, speed_mode
from pixsigma.stack.conditioning import Conditioning, text_conditioning
from pixsigma.stack.control import prepare_control
from pixsigma.stack.denoiser import build_denoiser
from pixsigma.stack.latents import initial_latents, set_schedule, start_noise
from pixsigma.stack.loop import StepHook, sample, step_kwargs
from pixsigma.stack.scope import request_scope
from pixsigma.t5 import check_t5_precision, load_t5, quiet_torchao, to_device, to_host
from pixsigma.text import encode_text, preprocess_captions, token_lengths, unknown_words
from pixsigma.weights import LAYOUTS, MODEL_INDEX, PIXSIGMA_CONFIG, load_dit

with quiet_torchao():  # diffusers imports torchao, when installed, with its models
    from diffusers import AutoencoderKL

__all__ = ["MAX_IMAGES", "SAMPLERS", "GenerationRequest", "GenerationResult", "PixSigmaPipeline", "SamplingDefaults",
           "default_dtype", "latent_preview", "resolve_device", "resolve_model", "OutOfMemory"]

TEXT_CACHE = 32  # distinct prompts whose T5 features are kept
ALPHA_TOKENS = 120  # PixArt-α's T5 length
MEMORY_HINTS = ("--dtype bf16 (or fp16), --offload-t5, fewer --num-images, a smaller --width/--height, "
                "--kv-compress 2 (KV token compression), or tiled decoding (on from 2K)")
StepCallback = Callable[[int, int, torch.Tensor], None]  # (step, total, latents)


class OutOfMemory(RuntimeError):
    """Raised instead of a bare CUDA OOM, naming what lowers memory."""


def latent_preview(latents: torch.Tensor) -> Image.Image:
    """A cheap preview of the first latent (no VAE), for progress displays."""
    return Image.fromarray(latent_preview_array(latents).numpy())


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
        self._text_cache: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        # LoRA/LoHa/LoKr adapters through peft, never a reload (pixsigma.lora): the pipeline's own set
        # (set_loras); a request's apply during it only. T5 adapters make cached prompts stale.
        self.loras = LoraStack(transformer, text_encoder, self._text_cache.clear)

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

    def set_loras(self, loras: str | list | None) -> list[str]:
        """Apply exactly these LoRAs (``"PATH[:SCALE], …"``, a list of those, or ``LoraSpec``s; empty: none);
        returns their files' warnings (skipped keys), which every result also carries while they are active."""
        return self.loras.set(parse_loras(loras))

    # -- text ---------------------------------------------------------------------------------------------
    def unknown_words(self, prompt: str) -> list[str]:
        """Words this model's tokenizer can only map to its unknown token (the demo's closed vocabulary)."""
        return unknown_words(self.tokenizer, prompt)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], max_tokens: int | None = None,
                       clean_caption: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(B, L, C) T5 features, (B, L) mask, and warnings (a prompt cut at the token limit, cleaning not
        available); L = ``max_tokens`` (None: the model's own length)."""
        length = max_tokens or self.max_tokens
        texts, warnings = preprocess_captions(prompts, clean_caption)
        keys = [(t, length) for t in texts]
        need = [k for k in dict.fromkeys(keys) if k not in self._text_cache]
        if need:
            if self.offload_t5 and self.device.type != "cpu":
                to_device(self.text_encoder, self.device)
            emb, mask = encode_text(self.tokenizer, self.text_encoder, [t for t, _ in need], length)
            if self.offload_t5 and self.device.type != "cpu":
                to_host(self.text_encoder)  # back to its pinned host copy
                torch.cuda.empty_cache()
            for i, k in enumerate(need):
                self._text_cache[k] = (emb[i].to(self.device), mask[i].to(self.device))
        for p, n in zip(prompts, token_lengths(self.tokenizer, texts)):
            if n > length:
                warnings.append(f"prompt {p[:40]!r}… is {n} tokens; the model reads {length}, "
                                f"so the last {n - length} tokens were dropped")
        emb = torch.stack([self._text_cache[k][0] for k in keys])
        mask = torch.stack([self._text_cache[k][1] for k in keys])
        for k in keys:  # most recently used last; evict only after this batch is served
            self._text_cache.move_to_end(k)
        while len(self._text_cache) > max(TEXT_CACHE, len(set(keys))):
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

    def seed_for(self, req: GenerationRequest) -> int:
        """The request's seed, else its generator's initial seed, else a random one (reported in the result)."""
        if req.seed is not None:
            return req.seed
        gens = generators(req.generator)
        return gens[0].initial_seed() if gens else random.SystemRandom().randrange(2**31)

    @torch.no_grad()
    def generate(self, req: GenerationRequest, callback: StepCallback | None = None, *,
                 on_step: StepHook | None = None) -> GenerationResult:
        """Run one request. ``callback(step, total, latents)`` after each step (for progress); ``on_step(i, t,
        latents)`` too, and latents it returns replace the loop's (diffusers' ``callback_on_step_end``)."""
        try:
            return self._generate(req, callback, on_step)
        except torch.OutOfMemoryError as e:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemory(f"out of memory generating {req.width}x{req.height} × {req.num_images}: "
                              f"lower memory with {MEMORY_HINTS}") from e

    def _generate(self, req: GenerationRequest, callback: StepCallback | None,
                  on_step: StepHook | None) -> GenerationResult:
        """The stack (``pixsigma.stack``): inputs -> denoiser from its layers -> the bare loop -> decode."""
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        sampler, steps, guidance = self.sampling_for(req).resolve(req.sampler, req.steps, req.guidance)
        seed, (h, w, gh, gw) = self.seed_for(req), self.plan_size(req)
        with request_scope(self, req):  # LoRAs, KV: this request's, the pipeline's own again after
            prompts, cond, control, cmap, warnings = self.condition(req, seed, guidance, gh, gw)
            warnings = self.loras.warnings + warnings  # skipped keys of the active adapters' files
            scheduler = make_scheduler(sampler, self.scheduler_config, self.transformer.config.prediction_type)
            steps = set_schedule(scheduler, steps, self.device, req.timesteps, req.sigmas)
            shape = (cond.cond.shape[0], self.transformer.config.in_channels, gh // VAE_SCALE_FACTOR,
                     gw // VAE_SCALE_FACTOR)
            noise, gen = start_noise(shape, seed, generators(req.generator), req.latents, self.device, self.dtype)
            edit = self.plan_edit(req, noise, (w, h), (gw, gh), warnings)
            latents, timesteps = initial_latents(scheduler, noise, steps, edit)
            denoiser = build_denoiser(self.transformer, cond, guidance, req.guidance_interval, self.controlnet,
                                      control, req.control_scale)
            latents = sample(denoiser, scheduler, latents, timesteps, step_kwargs(scheduler, gen, req.eta), edit,
                             _step_hook(callback, on_step, len(timesteps)))
            images, pixels = self.decode(req, latents, h, w, edit)
            params = self.params(req, seed, sampler, steps, guidance, prompts, edit, (h, w, gh, gw))
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return GenerationResult(images, seed, params, warnings, time.perf_counter() - start, peak, w, h, cmap,
                                latents, pixels)

    # -- the stack's inputs and outputs ---------------------------------------------------------------------
    def condition(self, req: GenerationRequest, seed: int, guidance: float, gh: int, gw: int
                  ) -> tuple[list[str], Conditioning, torch.Tensor | None, Image.Image | None, list[str]]:
        """(the prompts the model reads, one per image; the text and micro-conditions; the control latent and
        map, where the request has a control image; warnings)."""
        asked = [p for p in req.prompts for _ in range(req.num_images)]
        prompts = self.expand(asked, seed) if req.expand_prompt and req.prompt is not None else asked
        negatives = req.negative_prompts
        if req.prompt_embeds is None:
            negatives = [n for n in negatives for _ in range(req.num_images)]
        extra = micro_conditions(self.transformer.config, len(asked), gh, gw, self.dtype, self.device)

        def encode(texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
            return self.encode_prompts(texts, length, req.clean_caption)

        cond, warnings = text_conditioning(encode, prompts, negatives, req.num_images, guidance > 1.0,
                                           req.max_sequence_length or self.max_tokens, self.device, self.dtype,
                                           req.prompt_embeds, req.prompt_attention_mask, req.negative_prompt_embeds,
                                           req.negative_prompt_attention_mask, extra)
        control = cmap = None
        if req.control_image is not None:
            control, cmap, _, control_warnings = prepare_control(self.vae, self.controlnet, req.control_image,
                                                                 req.control_type, gw, gh, self.device, self.dtype)
            warnings += control_warnings
        return prompts, cond, control, cmap, warnings

    def plan_edit(self, req: GenerationRequest, noise: torch.Tensor, size: tuple[int, int], bucket: tuple[int, int],
                  warnings: list[str]) -> Edit | None:
        """Image-to-image / inpainting from the request's input and the start noise (``pixsigma.edit``)."""
        if req.init_image is None:
            return None
        edit, edit_warnings = plan_edit(self.vae, req.init_image, req.mask, req.strength, size, bucket, noise)
        warnings += edit_warnings
        return edit

    def decode(self, req: GenerationRequest, latents: torch.Tensor, h: int, w: int,
               edit: Edit | None) -> tuple[list[Image.Image], torch.Tensor | None]:
        """(PIL images, the decoded images in [-1, 1] where they are the output as they are)."""
        if not req.decode:
            return [], None
        pixels = decode(self.vae, latents, tiled=max(latents.shape[-2:]) * VAE_SCALE_FACTOR >= TILED_DECODE_FROM)
        if req.binning:
            pixels = resize_and_crop(pixels, h, w)
        if edit is not None and edit.mask is not None:
            return edit.finish(to_pil(pixels)), None  # pasted onto the input
        return to_pil(pixels), pixels

    def params(self, req: GenerationRequest, seed: int, sampler: str, steps: int, guidance: float,
               prompts: list[str], edit: Edit | None, sizes: tuple[int, int, int, int]) -> dict[str, Any]:
        """What the PNG records of the request (read inside its scope: its LoRAs and KV)."""
        h, w, gh, gw = sizes
        kv = self.transformer.config.kv_compress
        params = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": seed, "steps": steps,
                  "guidance": guidance, "sampler": sampler, "width": w, "height": h,
                  "generated_size": [gw, gh], "binning": req.binning, "model": self.name,
                  "kv_compress": {"ratio": kv.ratio, "layers": list(kv.layers), "operator": kv.operator},
                  "dtype": str(self.dtype).removeprefix("torch."), "generator": "pixsigma"}
        if self.loras.active:
            params["loras"] = [{"path": p, "scale": s} for p, s in self.loras.active]
        if req.guidance_interval is not None:
            params["guidance_interval"] = list(req.guidance_interval)
        if speed_mode(self.transformer) != "eager":  # how it ran, not what it computed (up to kernel rounding)
            params["speed"] = speed_mode(self.transformer)
        if self.t5_precision is not None:  # int8 T5 changes the image slightly
            params["t5"] = self.t5_precision
        if req.control_image is not None:
            params["control"] = {"type": req.control_type or default_control_type(self.controlnet),
                                 "scale": req.control_scale}
        if edit is not None:
            params["edit"] = edit.params
        asked = [p for p in req.prompts for _ in range(req.num_images)]
        if req.prompt is not None and prompts != asked:  # what the model read, image by image ("revised prompt")
            params["expanded_prompts"] = prompts
        for name in ("timesteps", "sigmas", "max_sequence_length"):
            if getattr(req, name) is not None:
                params[name] = list(getattr(req, name)) if name != "max_sequence_length" else req.max_sequence_length
        if req.eta:
            params["eta"] = req.eta
        return params


def _step_hook(callback: StepCallback | None, on_step: StepHook | None, total: int) -> StepHook | None:
    """The loop's step hook: ``on_step`` (may replace the latents), then the progress ``callback``."""
    if callback is None and on_step is None:
        return None

    def hook(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        if on_step is not None:
            new = on_step(i, t, latents)
            latents = latents if new is None else new
        if callback is not None:
            callback(i + 1, total, latents)
        return latents

    return hook


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
