"""The app's engine: the loaded pipelines, one lock per device, per-request limits, and OOM handling.

Everything the web UI does to a model goes through :class:`AppEngine`, so the same
rules hold for the browser, the ``gradio_client`` API and the tests. It knows nothing
of gradio: requests come in as plain values, refusals go out as ``ValueError`` (bad
input, the message says what is accepted) or :class:`OutOfMemory`.
"""

from __future__ import annotations

import gc
import os
import queue
import reprlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from pixsigma.buckets import nearest_bucket
from pixsigma.config import KV_OPERATORS, DiTConfig, KVCompress, default_kv
from pixsigma.pipeline import (
    SAMPLERS,
    GenerationRequest,
    GenerationResult,
    OutOfMemory,
    PixSigmaPipeline,
    SamplingDefaults,
    latent_preview,
)

MAIN, ALPHA = "main", "alpha"
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 10_000  # far beyond any model's tokens; only stops abuse of the tokenizer
KV_RATIOS = (2, 8)  # the KV compression ratios R a request may ask for (the UI's slider range)
GUIDANCE_RANGE = (0.0, 20.0)  # 1 = no classifier-free guidance; beyond 20 images only burn out
STANDARD_RESOLUTIONS = (256, 512, 1024, 2048, 4096)  # the PixArt bucket tables
GiB = 2**30


class Cancelled(RuntimeError):
    """Raised inside the pipeline callback when nobody is listening any more (tab closed, request cancelled)."""


class Pipeline(Protocol):
    """What the engine uses of a :class:`PixSigmaPipeline` (tests pass fakes with the same surface)."""

    transformer: torch.nn.Module
    sampling: SamplingDefaults  # the folder's own steps, guidance and prompt expander

    @property
    def device(self) -> torch.device: ...

    def generate(self, request: GenerationRequest, callback: Any = None) -> GenerationResult: ...

    def unknown_words(self, prompt: str) -> list[str]: ...

    def resolve_sampling(self, request: GenerationRequest) -> tuple[float, int]: ...


@dataclass(frozen=True)
class Limits:
    """Per-request caps of one device. ``max_pixels`` bounds images × height × width."""

    max_steps: int
    max_images: int
    max_resolution: int
    max_pixels: int

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_images", "max_resolution", "max_pixels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {v!r}")
        if self.max_images > 4:
            raise ValueError(f"Limits.max_images must be at most 4 (the UI's range), got {self.max_images}")

    @classmethod
    def for_device(cls, device: torch.device | str, memory_bytes: int | None = None,
                   native_resolution: int = 1024) -> Limits:
        """Caps from the device kind and its memory; a model's own resolution is always allowed."""
        device = torch.device(device)
        if device.type == "cpu":  # minutes per image at 1024 px: keep CPU requests small
            res, steps, images = 512, 30, 2
            pixels = images * res * res
        else:
            mem = memory_bytes if memory_bytes is not None else 16 * GiB
            steps, images = 100, 4
            if mem < 12 * GiB:
                res, pixels = 1024, 4 * 1024 * 1024
            elif mem < 30 * GiB:
                res, pixels = 2048, 2048 * 2048
            else:
                res, pixels = 4096, 4096 * 4096
        res = max(res, native_resolution)
        return cls(max_steps=steps, max_images=images, max_resolution=res, max_pixels=max(pixels, res * res))


@dataclass(frozen=True)
class ModelInfo:
    """What the UI shows and offers for one loaded model."""

    name: str
    config: DiTConfig
    device: str
    resolutions: tuple[int, ...]  # base resolutions offered, ascending
    steps: int  # the model's default steps and guidance (PixSigmaPipeline.resolve_sampling)
    guidance: float
    prompt_expander: str | None  # the folder's rewrite of short prompts (SamplingDefaults), None: none

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def kv(self) -> KVCompress:
        return self.config.kv_compress

    @property
    def is_xl(self) -> bool:
        return self.config.depth == 28 and self.config.hidden_size == 1152

    @property
    def suggested_kv(self) -> KVCompress:
        """The checkpoint's own KV compression, else R=2 over the deep half of the layers (the paper's
        placement) with plain pooling: a conv the model never trained with would add a LayerNorm it never saw."""
        if self.kv.active:
            return self.kv
        return default_kv(self.depth, operator="pool")


def layers_spec(layers: tuple[int, ...]) -> str:
    """(14, 15, ..., 27) -> '14-27'; the inverse of :func:`pixsigma.config.parse_layers`."""
    parts: list[str] = []
    for i in sorted(set(layers)):
        if parts and i == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{i}"
        else:
            parts.append(str(i))
    return ",".join(parts)


@dataclass(frozen=True)
class Step:
    """One denoising step done; ``previews`` (one per image) only every few steps."""

    step: int
    total: int
    previews: list[Any] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Done:
    """The result, and the run's peak memory: GPU memory allocated on CUDA, else the process's
    resident memory sampled at each step (the CPU allocator keeps no per-run peak)."""

    result: GenerationResult
    peak_memory_bytes: int | None
    memory_kind: str  # "GPU" | "process RSS" | ""


def offered_resolutions(config: DiTConfig, max_resolution: int) -> tuple[int, ...]:
    """Half, native and double base resolution; for XL models every PixArt table within 4× (up to 4K)."""
    native = config.resolution
    out = {native // 2, native, native * 2}
    if config.depth == 28 and config.hidden_size == 1152:
        out |= {r for r in STANDARD_RESOLUTIONS if native / 4 <= r <= native * 4}
    return tuple(sorted(r for r in out if 64 <= r <= 4096 and (r <= max_resolution or r == native)))


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def device_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def is_oom(error: BaseException) -> bool:
    if isinstance(error, OutOfMemory | torch.OutOfMemoryError | MemoryError):
        return True
    text = str(error).lower()  # CPU/MPS allocators raise a plain RuntimeError
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class AppEngine:
    """The loaded models (``main`` = PixArt-Σ, optional ``alpha``) and the rules for using them."""

    def __init__(self, pipes: dict[str, Pipeline], names: dict[str, str] | None = None,
                 limits: Limits | None = None) -> None:
        if MAIN not in pipes:
            raise ValueError(f"the engine needs a {MAIN!r} pipeline, got {sorted(pipes)}")
        self.pipes = dict(pipes)
        self.names = {k: (names or {}).get(k, k) for k in self.pipes}
        # As loaded: a request with its own KV setting switches the live transformer's config while it runs.
        self._configs: dict[str, DiTConfig] = {k: p.transformer.config for k, p in self.pipes.items()}
        self.device = torch.device(self.pipes[MAIN].device)
        self.limits = limits or Limits.for_device(self.device, device_memory(self.device),
                                                  self._configs[MAIN].resolution)
        # One lock per device: two requests never share a GPU's memory or a CPU's cores at once.
        self._locks = {str(torch.device(p.device)): threading.Lock() for p in self.pipes.values()}
        self.runs: Any = None  # finished training runs, loaded when a request names one (run_models.RunModels)

    @classmethod
    def load(cls, model: str, alpha_model: str | None = None, device: str = "auto", dtype: str | None = None,
             offload_t5: bool = False, t5_precision: str | None = None) -> AppEngine:
        """``dtype`` None: the pipeline's ``default_dtype`` of the device (bf16 on CUDA, fp32 elsewhere);
        ``t5_precision``: fp32, bf16 or int8 (``pixsigma.t5``), None: ``dtype``."""
        t5 = dict(offload_t5=offload_t5, t5_precision=t5_precision)
        pipes = {MAIN: PixSigmaPipeline.from_pretrained(model, device=device, dtype=dtype, **t5)}
        names = {MAIN: model}
        if alpha_model:
            pipes[ALPHA] = PixSigmaPipeline.from_pretrained(alpha_model, device=device, dtype=dtype, **t5)
            names[ALPHA] = alpha_model
        return cls(pipes, names)

    def move_to(self, device: str | torch.device) -> None:
        """Every model onto ``device``, each keeping its lock (under the new device's name); the limits stay.
        ZeroGPU loads on the CPU and moves to CUDA inside a GPU call (``zerogpu.py``)."""
        locks = {id(lk): lk for lk in self._locks.values()}.values()
        for lk in locks:  # no request runs while the models move
            lk.acquire()
        try:
            moved = {}
            for pipe in self.pipes.values():
                lock = self._locks[str(torch.device(pipe.device))]
                pipe.to(device)
                moved[str(torch.device(pipe.device))] = lock
            self._locks, self.device = moved, torch.device(self.pipes[MAIN].device)
        finally:
            for lk in locks:
                lk.release()

    # -- what is loaded --------------------------------------------------------------------------

    @property
    def concurrency(self) -> int:
        """Requests the queue may run at once: one per device."""
        return len(self._locks)

    @property
    def devices(self) -> list[str]:
        """The devices the models are on, one entry per device (the header shows them; a pool lists its engines')."""
        return sorted(self._locks)

    @property
    def device_key(self) -> str:
        """The queue's concurrency group of the main model's device (events on one device share it)."""
        return f"device:{self.device}"

    def has(self, model: str) -> bool:
        return model in self.pipes

    def info(self, model: str = MAIN) -> ModelInfo:
        self._check_model(model)
        cfg, pipe = self._configs[model], self.pipes[model]
        guidance, steps = pipe.resolve_sampling(GenerationRequest("-", loras=()))  # its own, whatever LoRAs ran last
        return ModelInfo(name=self.names[model], config=cfg, device=str(pipe.device),
                         resolutions=offered_resolutions(cfg, self.limits.max_resolution), steps=steps,
                         guidance=guidance, prompt_expander=pipe.sampling.prompt_expander)

    def _check_model(self, model: str) -> None:
        if self.runs is not None and model not in self.pipes:
            self.runs.attach(self, model)  # a finished run's pipeline (run_models.py); a bad name is refused there
        if model not in self.pipes:
            raise ValueError(f"model {model!r} is not loaded; loaded: {sorted(self.pipes)}")

    def add_model(self, key: str, pipe: Pipeline, name: str) -> None:
        """Serve ``pipe`` as ``key`` too (a run's pipeline, on a device this engine already has)."""
        if str(torch.device(pipe.device)) not in self._locks:
            raise ValueError(f"model {name} is on {pipe.device}, not on this engine's devices {self.devices}")
        self.pipes[key], self.names[key], self._configs[key] = pipe, name, pipe.transformer.config

    def drop_model(self, key: str) -> None:
        if key == MAIN:
            raise ValueError("the main model cannot be dropped")
        for table in (self.pipes, self.names, self._configs):
            table.pop(key, None)

    def unknown_words(self, prompt: str, model: str = MAIN) -> list[str]:
        self._check_model(model)
        pipe = self.pipes[model]
        with self._locks[str(torch.device(pipe.device))]:  # a fast tokenizer must not be shared mid-call
            return list(pipe.unknown_words(prompt))

    # -- requests ---------------------------------------------------------------------------------

    def kv_setting(self, mode: str, ratio: int = 2, layers: tuple[int, ...] = (),
                   operator: str = "conv") -> KVCompress | None:
        """'model' -> the checkpoint's own (None); 'off' -> full attention; 'on' -> R over ``layers``."""
        if mode == "model":
            return None
        if mode == "off":
            return KVCompress()
        if mode != "on":
            raise ValueError(f"kv_mode must be 'model', 'off' or 'on', got {reprlib.repr(mode)}")
        depth = self.info(MAIN).depth
        if not layers:
            deep = default_kv(depth).layers
            raise ValueError(f"KV compression needs layers, e.g. '{deep[0]}-{deep[-1]}' (the model has "
                             f"layers 0-{depth - 1})")
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"KV compression layers {reprlib.repr(bad)} do not exist: this model has layers "
                             f"0-{depth - 1}")
        lo, hi = KV_RATIOS
        if not isinstance(ratio, int) or isinstance(ratio, bool) or not lo <= ratio <= hi:
            raise ValueError(f"kv_ratio: the KV compression ratio must be an integer from {lo} to {hi}, "
                             f"got {reprlib.repr(ratio)}")
        if operator not in KV_OPERATORS:
            raise ValueError(f"kv_operator must be one of {', '.join(KV_OPERATORS)}, got {reprlib.repr(operator)}")
        return KVCompress(ratio=ratio, layers=layers, operator=operator)

    def make_request(self, prompt: str, *, negative_prompt: str = "", aspect_ratio: float = 1.0,
                     resolution: int | None = None, steps: int | None = None, guidance: float | None = None,
                     sampler: str = "default", seed: int = 0, num_images: int = 1,
                     kv: KVCompress | None = None, model: str = MAIN,
                     expand_prompt: bool = True, loras: tuple = ()) -> GenerationRequest:
        """A validated request: ``aspect_ratio`` is height/width, snapped to the bucket of ``resolution``;
        unset ``steps``/``guidance`` are the model's own (:class:`ModelInfo`); ``expand_prompt`` applies the
        model's prompt expander where it has one; ``loras`` (``LoraSpec``s) are exactly the adapters it runs with."""
        info = self.info(model)
        steps = info.steps if steps is None else steps
        guidance = info.guidance if guidance is None else guidance
        lim = self.limits
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty: describe the image to draw")
        if len(prompt) + len(negative_prompt or "") > MAX_PROMPT_CHARS:
            chars = len(prompt) + len(negative_prompt or "")
            raise ValueError(f"prompt and negative_prompt are {chars} characters long together; at most "
                             f"{MAX_PROMPT_CHARS} are accepted (the model reads only its first tokens)")
        resolution = info.resolution if resolution is None else resolution
        if resolution not in info.resolutions:
            raise ValueError(f"resolution: base resolution {reprlib.repr(resolution)} is not offered for {info.name} "
                             f"on {info.device}; accepted: {', '.join(map(str, info.resolutions))}")
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= lim.max_steps:
            raise ValueError(f"steps must be an integer from 1 to {lim.max_steps} on this device, "
                             f"got {reprlib.repr(steps)}")
        lo, hi = GUIDANCE_RANGE
        if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not lo <= guidance <= hi:
            raise ValueError(f"guidance must be a number from {lo:g} to {hi:g}, got {reprlib.repr(guidance)}")
        if not isinstance(sampler, str) or sampler not in SAMPLERS:
            raise ValueError(f"sampler {reprlib.repr(sampler)} is unknown; accepted: {', '.join(SAMPLERS)}")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}, got {reprlib.repr(seed)}")
        if not isinstance(num_images, int) or isinstance(num_images, bool) or not 1 <= num_images <= lim.max_images:
            raise ValueError(f"num_images: the number of images must be from 1 to {lim.max_images} on this device, "
                             f"got {reprlib.repr(num_images)}")
        if isinstance(aspect_ratio, bool) or not isinstance(aspect_ratio, int | float) or not 0.2 <= aspect_ratio <= 5:
            raise ValueError(f"aspect_ratio: the aspect ratio (height/width) must be from 0.2 to 5, "
                             f"got {reprlib.repr(aspect_ratio)}")
        height, width = nearest_bucket(round(1000 * aspect_ratio), 1000, resolution)
        if num_images * height * width > lim.max_pixels:
            raise ValueError(f"{num_images} image(s) of {width}×{height} px exceed this device's limit of "
                             f"{lim.max_pixels / 1e6:.1f} megapixels per request: use fewer images or a lower "
                             f"base resolution")
        return GenerationRequest(prompt=prompt, negative_prompt=negative_prompt or "", width=width, height=height,
                                 steps=steps, guidance=float(guidance), sampler=sampler, seed=seed,
                                 num_images=num_images, binning=True, kv=kv, expand_prompt=expand_prompt,
                                 loras=tuple(loras))  # swapped per request under the device lock, no reload

    # -- running ----------------------------------------------------------------------------------

    def stream(self, request: GenerationRequest, model: str = MAIN,
               preview_every: int = 0) -> Iterator[Step | Done]:
        """Run ``request``; yield a :class:`Step` per denoising step, then :class:`Done`.

        The pipeline runs in a worker thread under its device's lock, so the caller can
        hand each step to a UI while it happens. Closing the iterator early cancels the
        run at its next step.
        """
        self._check_model(model)
        pipe = self.pipes[model]
        device = torch.device(pipe.device)
        events: queue.Queue = queue.Queue()
        cancel = threading.Event()
        rss_peak = [rss_bytes()]

        def callback(step: int, total: int, latents: torch.Tensor) -> None:  # latents: (B, 4, h, w)
            if cancel.is_set():
                raise Cancelled("generation cancelled")
            if rss_peak[0] is not None:
                rss_peak[0] = max(rss_peak[0], rss_bytes() or 0)
            previews = None
            if preview_every and step % preview_every == 0 and step < total:
                previews = [latent_preview(latents[i: i + 1]) for i in range(latents.shape[0])]
            events.put(Step(step, total, previews))

        def work() -> None:
            try:
                with self._locks[str(device)]:
                    try:
                        result = pipe.generate(request, callback=callback)
                    except Exception as e:  # handed to the consumer thread
                        events.put(self._translate(e, request, pipe))
                        return
                if result.peak_memory_bytes is not None:
                    events.put(Done(result, result.peak_memory_bytes, "GPU"))
                else:
                    events.put(Done(result, rss_peak[0], "process RSS" if rss_peak[0] else ""))
            except BaseException as e:  # e.g. the lock's KeyboardInterrupt: never leave the consumer waiting
                events.put(e)

        threading.Thread(target=work, name="pixsigma-generate", daemon=True).start()
        try:
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Done):
                    return
        finally:
            cancel.set()

    def run(self, request: GenerationRequest, model: str = MAIN) -> Done:
        """Blocking :meth:`stream`."""
        for event in self.stream(request, model):
            if isinstance(event, Done):
                return event
        raise RuntimeError("the pipeline ended without a result")

    def _translate(self, error: Exception, request: GenerationRequest, pipe: Pipeline) -> Exception:
        """An OOM becomes :class:`OutOfMemory` naming the UI's memory savers (the pipeline's own names CLI
        flags), after freeing what the failed run held; other errors pass through."""
        if not is_oom(error):
            return error
        gc.collect()
        device = torch.device(pipe.device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        tips = []
        if request.num_images > 1:
            tips.append("fewer images")
        tips.append("a lower base resolution or a squarer aspect ratio")
        tips.append("KV compression ('on', R=2 over the deep half of the layers)")
        return OutOfMemory(f"out of memory on {device} generating {request.num_images} image(s) of "
                           f"{request.width}×{request.height} px. To lower memory use: " + "; ".join(tips) + ".")
