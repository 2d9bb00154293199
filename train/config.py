"""Frozen, validated training configs, loaded from YAML (or a Python file defining ``config``).

Layering, later wins: the dataclass defaults < the stage's overrides (``train.stages``) < the file's
``base:`` file (a path relative to it) < the file < ``--set key=value`` (dotted keys: ``optim.lr=1e-4``,
``stage.resolution=256``). Unknown keys and bad values raise ``ValueError`` naming the key, the value and
what is accepted.
"""

from __future__ import annotations

import runpy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pixsigma.config import PRESETS
from pixsigma.constants import NUM_TRAIN_TIMESTEPS

from .lora import LoraTrainConfig
from .stages import STAGE_NAMES, Stage, stage_overrides

OPTIMIZERS = ("came", "adamw")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("no", "fp16", "bf16")


def _positive_int(where: str, v: Any, zero: bool = False) -> None:
    low = 0 if zero else 1
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ValueError(f"{where} must be an integer >= {low}, got {v!r}")


def _float(obj: Any, name: str, where: str) -> float:
    """The field as a float; YAML reads ``1e-4`` (no dot) as a string, so numeric strings are accepted."""
    v = getattr(obj, name)
    try:
        if isinstance(v, bool):
            raise TypeError
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {v!r}") from None
    object.__setattr__(obj, name, f)
    return f


def _fraction(obj: Any, name: str, where: str) -> None:
    v = getattr(obj, name)
    if not 0.0 <= _float(obj, name, where) <= 1.0:
        raise ValueError(f"{where} must be a number in [0, 1], got {v!r}")


def check_timestep_band(band: Any, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, int, float]:
    """``band`` as (low, high, share), or a ValueError saying what is accepted."""
    msg = (f"timestep_band must be [low, high, share] with integers 0 <= low <= high < {num_timesteps} and "
           f"share in (0, 1], or null (uniform t), got {band!r}")
    try:
        low, high, share = band
    except (TypeError, ValueError):
        raise ValueError(msg) from None
    numbers = not any(isinstance(v, bool) for v in band) and isinstance(low, int) and isinstance(high, int) \
        and isinstance(share, (int, float))
    if not (numbers and 0 <= low <= high < num_timesteps and 0 < share <= 1):
        raise ValueError(msg)
    return low, high, float(share)


@dataclass(frozen=True)
class DataConfig:
    """Images + captions, or a feature cache written by ``python -m train.extract``.

    ``source``: an image folder (``x.png`` + ``x.txt`` short caption, optional ``x.long.txt``), a folder
    holding ``metadata.jsonl``, or a ``.jsonl`` of ``{path, caption, long_caption?}`` (paths relative to it).
    ``cache``: feature cache folder; when set, training reads it and never builds T5 or the VAE.
    ``text_encoder`` / ``vae``: a diffusers pipeline folder (``text_encoder/``+``tokenizer/``, ``vae/``) or
    the component folder itself. ``long_caption_ratio``: share of samples using the long caption where one
    exists (paper: 0.6). ``max_tokens``: None = the model's. ``max_images``: use only the first N records
    (a short stage then extracts and trains on the subset it can see, not the whole source).
    """

    source: str = ""
    cache: str | None = None
    text_encoder: str | None = None
    vae: str | None = None
    long_caption_ratio: float = 0.6
    max_tokens: int | None = None
    num_workers: int = 2
    shard_size: int = 1024
    extract_batch_size: int = 16
    max_images: int | None = None

    def __post_init__(self) -> None:
        _fraction(self, "long_caption_ratio", "data.long_caption_ratio")
        if self.max_images is not None:
            _positive_int("data.max_images", self.max_images)
        if self.max_tokens is not None:
            _positive_int("data.max_tokens", self.max_tokens)
        _positive_int("data.num_workers", self.num_workers, zero=True)
        _positive_int("data.shard_size", self.shard_size)
        _positive_int("data.extract_batch_size", self.extract_batch_size)
        if not self.source and not self.cache:
            raise ValueError("data.source (images) or data.cache (extracted features) must be set")


@dataclass(frozen=True)
class OptimConfig:
    """CAME with the paper's settings by default; AdamW as an option. Linear warm-up, then the base LR held
    (``constant``, PixArt's schedule) or decayed to 0 at the run's last step (``cosine``: a short run then
    ends on small, low-noise updates instead of on its largest LR)."""

    name: str = "came"
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999, 0.9999)
    eps: tuple[float, ...] = (1e-30, 1e-16)
    warmup_steps: int = 1000
    schedule: str = "constant"
    grad_clip: float = 0.01  # PixArt's gradient_clip (max global norm); 0 = off
    ema_decay: float | None = None  # e.g. 0.9999 (PixArt); None = no EMA

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {self.name!r}")
        for name in ("lr", "weight_decay", "grad_clip"):
            _float(self, name, f"optim.{name}")
        if self.ema_decay is not None:
            _float(self, "ema_decay", "optim.ema_decay")
        try:
            object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
            object.__setattr__(self, "eps", tuple(float(e) for e in self.eps))
        except (TypeError, ValueError):
            raise ValueError(f"optim.betas and optim.eps must be lists of numbers, got {self.betas!r}, "
                             f"{self.eps!r}") from None
        want_b, want_e = (3, 2) if self.name == "came" else (2, 1)
        if len(self.betas) != want_b or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas for {self.name} must be {want_b} numbers in [0, 1), got {self.betas}")
        if len(self.eps) != want_e or not all(e > 0 for e in self.eps):
            raise ValueError(f"optim.eps for {self.name} must be {want_e} positive numbers, got {self.eps}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("optim.weight_decay and optim.grad_clip must be >= 0, got "
                             f"{self.weight_decay!r}, {self.grad_clip!r}")
        _positive_int("optim.warmup_steps", self.warmup_steps, zero=True)
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {LR_SCHEDULES}, got {self.schedule!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in (0, 1) or null (no EMA), got {self.ema_decay!r}")


@dataclass(frozen=True)
class TrainConfig:
    """One run of the shared loop. ``batch_size`` is per process; the global batch is
    ``batch_size × processes × grad_accum``. ``model`` (a ``PRESETS`` name) and ``model_args`` (DiTConfig
    field overrides) define the architecture only for ``from_scratch``; other stages take it from
    ``stage.load_from``."""

    name: str = "run"
    output_dir: str = ""
    stage: Stage = field(default_factory=Stage)
    model: str = "XL_2_1024"
    model_args: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=lambda: DataConfig(source="data"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000
    batch_size: int = 2
    grad_accum: int = 1
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = False
    caption_dropout: float = 0.1
    snr_gamma: float | None = None  # Min-SNR-γ loss weighting (train/diffusion.py); None = PixArt's plain MSE
    timestep_band: tuple[int, int, float] | None = None  # [low, high, share] of t drawn there (train/diffusion.py)
    seed: int = 0
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0  # 0 = no validation images
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    lora: LoraTrainConfig | None = None  # train a LoRA on the loaded model instead of its weights (train/lora.py)

    def __post_init__(self) -> None:
        if self.model not in PRESETS:
            raise ValueError(f"model must be one of the presets {sorted(PRESETS)}, got {self.model!r}")
        if self.mixed_precision is False:  # YAML reads a bare `no` as false
            object.__setattr__(self, "mixed_precision", "no")
        if not isinstance(self.model_args, dict):
            raise ValueError(f"model_args must be a mapping of DiTConfig fields, got {self.model_args!r}")
        if isinstance(self.sample_prompts, str):
            object.__setattr__(self, "sample_prompts", (self.sample_prompts,))
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        for name in ("steps", "batch_size", "grad_accum", "save_every", "keep_last", "log_every", "sample_steps"):
            _positive_int(name, getattr(self, name))
        _positive_int("sample_every", self.sample_every, zero=True)
        _positive_int("seed", self.seed, zero=True)
        _fraction(self, "caption_dropout", "caption_dropout")
        if self.snr_gamma is not None and not _float(self, "snr_gamma", "snr_gamma") > 0:
            raise ValueError(f"snr_gamma must be > 0 (Min-SNR-γ; paper: 5) or null (off), got {self.snr_gamma!r}")
        if self.timestep_band is not None:
            object.__setattr__(self, "timestep_band", check_timestep_band(self.timestep_band))
        object.__setattr__(self, "sample_prompts", tuple(str(p) for p in self.sample_prompts))
        if self.sample_every and not self.sample_prompts:
            raise ValueError("sample_every > 0 needs sample_prompts (a list of captions to render)")
        if not self.output_dir:
            object.__setattr__(self, "output_dir", str(Path("runs") / self.name))
        if self.lora is not None and (self.stage.name == "from_scratch" or self.optim.ema_decay is not None):
            raise ValueError("lora trains an adapter on loaded weights: it needs a stage with stage.load_from "
                             f"(not {self.stage.name!r} from scratch) and optim.ema_decay: null")
        if self.lora is not None and self.stage.name == "controlnet":
            raise ValueError("lora and the controlnet stage cannot be combined: the controlnet stage trains its own "
                             "copied blocks; remove the lora section or choose another stage")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.stage.kv is not None:
            d["stage"]["kv"]["layers"] = list(self.stage.kv.layers)
        if self.timestep_band is not None:
            d["timestep_band"] = list(self.timestep_band)
        if self.lora is not None:
            d["lora"]["target_modules"] = list(self.lora.target_modules)
        if self.stage.consistency is not None:
            d["stage"]["consistency"]["guidance"] = list(self.stage.consistency.guidance)
        return d


_NESTED = {"stage": Stage, "data": DataConfig, "optim": OptimConfig, "lora": LoraTrainConfig}


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {where or 'config'} keys {unknown}; accepted: {sorted(known)}")
    kw = dict(d)
    for key, sub in _NESTED.items():
        if cls is TrainConfig and key in kw and isinstance(kw[key], dict):
            kw[key] = _build(sub, kw[key], key)
    return cls(**kw)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of nested dicts; ``over`` wins."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "steps=10"]`` -> nested dict; values parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad override {pair!r}: use key=value, e.g. optim.lr=1e-4")
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value) if value.strip() else None
    return out


def _stage_as_mapping(raw: dict[str, Any]) -> dict[str, Any]:
    """``stage: res_up`` is short for ``stage: {name: res_up}``."""
    raw = dict(raw)
    if isinstance(raw.get("stage"), str):
        raw["stage"] = {"name": raw["stage"]}
    return raw


def _read(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist")
    if path.resolve() in seen:
        raise ValueError(f"config {path} includes itself through `base`")
    if path.suffix == ".py":
        raw = runpy.run_path(str(path)).get("config")
    elif path.suffix in (".yaml", ".yml"):
        raw = yaml.safe_load(path.read_text()) or {}
    else:
        raise ValueError(f"config {path}: use a .yaml/.yml file or a .py file defining `config`")
    if not isinstance(raw, dict):
        raise ValueError(f"config {path} must be a mapping (a .py file: a dict named `config`)")
    raw = _stage_as_mapping(raw)
    base = raw.pop("base", None)  # a shared file this one overrides, relative to this one
    return merge(_read(path.parent / base, (*seen, path.resolve())), raw) if base else raw


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The file's mapping, on top of its ``base:`` file if it names one; ``name`` defaults to the file stem."""
    path = Path(path)
    raw = _read(path, ())
    raw.setdefault("name", path.stem)
    return raw


def build_config(raw: dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    """Defaults < stage overrides < ``raw`` < ``overrides``."""
    raw = merge(_stage_as_mapping(raw), parse_overrides(overrides or []))
    stage = (raw.get("stage") or {}).get("name", Stage.name)
    if stage not in STAGE_NAMES:
        raise ValueError(f"stage.name must be one of {STAGE_NAMES}, got {stage!r}")
    return _build(TrainConfig, merge(stage_overrides(stage), raw), "")


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    return build_config(read_config_file(path), overrides)
