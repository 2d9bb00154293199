"""The weak-to-strong stages as small overrides of one base config, run by the one shared loop.

Each stage only (a) overrides a few defaults and (b) says how the model config follows from the weights
it starts from. Everything else (loop, data, objective, checkpoints) is shared.

- ``from_scratch``: the base α model: random init at the preset's resolution, short captions.
- ``vae_adapt``: same model, a new VAE's latent space (a new latent cache); paper: ~2K steps suffice.
- ``res_up``: ``DiTConfig.at_resolution``: base size and PE interpolation for the new resolution, new
  aspect-ratio buckets; paper: ~1K steps suffice thanks to PE interpolation.
- ``kv_compress``: adds ``KVCompress`` to the loaded model; the new ``sr``/``norm`` parameters start
  from the average-conv init ``PixArtDiT`` does at construction; paper: ~100 steps.
- ``finetune``: same model, same resolution, more data.
- ``controlnet``: the loaded model frozen; a ControlNet (``stage.controlnet``: condition type, copies, the
  projections' LR) trains on control latents the feature cache also holds (``train/controlnet.py``).
- ``consistency``: latent consistency distillation of the loaded model into a few-step one (``stage.consistency``:
  Huber c, solver grid, teacher guidance, target EMA; ``train/consistency.py``); a LoRA student by default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pixsigma.config import PRESETS, DiTConfig, KVCompress, check_fields, default_kv, parse_layers
from pixsigma.weights import KV_KEYS

from .consistency import ConsistencyStage

CONTROLNET_TRAIN_TYPES = ("canny", "canny-thick", "regions")  # condition makers a run can derive from its own images


@dataclass(frozen=True)
class StageSpec:
    description: str
    overrides: dict[str, Any]


STAGES: dict[str, StageSpec] = {
    "from_scratch": StageSpec("train the base (α) model from random weights",
                              {"data": {"long_caption_ratio": 0.0}, "optim": {"warmup_steps": 1000}}),
    "vae_adapt": StageSpec("adapt the DiT to a new VAE's latent space (new latent cache)",
                           {"steps": 2000, "optim": {"warmup_steps": 100}}),
    "res_up": StageSpec("raise the base resolution with PE interpolation and new buckets",
                        {"steps": 1000, "optim": {"warmup_steps": 100}}),
    "kv_compress": StageSpec("add KV token compression (conv R×R, average init) to the deep layers",
                             {"steps": 100, "optim": {"warmup_steps": 0}}),
    "finetune": StageSpec("keep training the same model on (new) data", {}),
    "controlnet": StageSpec("train a ControlNet (copied blocks, zero-init projections) on the frozen model",
                            {"optim": {"warmup_steps": 0}, "sample_every": 0}),
    # LCM-LoRA by default (``lora: null`` distils the whole DiT); the teacher's guided captions are never dropped
    "consistency": StageSpec("distil the loaded model into a few-step (LCM) student: 4 steps, no CFG batch",
                             {"lora": {"rank": 64}, "caption_dropout": 0.0, "sample_every": 0,
                              "optim": {"warmup_steps": 100, "ema_decay": None}}),
}


STAGE_NAMES = tuple(STAGES)
# The stages that start from another run's weights (all but from_scratch): the ones the app can start.
CONTINUING_STAGES = tuple(s for s in STAGES if s != "from_scratch")


def stage_overrides(name: str) -> dict[str, Any]:
    return {"stage": {"name": name}, **STAGES[name].overrides}


@dataclass(frozen=True)
class ControlNetStage:
    """The controlnet stage's settings: ``control_type`` (the condition maker applied to each training image:
    canny or regions), ``copies`` (copied blocks; None = half the depth), ``proj_lr`` (LR of the zero-initialised
    projections; None = optim.lr)."""

    control_type: str = "canny"
    copies: int | None = None
    proj_lr: float | None = None

    def __post_init__(self) -> None:
        if self.control_type not in CONTROLNET_TRAIN_TYPES:
            raise ValueError(f"stage.controlnet.control_type must be one of {CONTROLNET_TRAIN_TYPES}, got "
                             f"{self.control_type!r}")
        if self.copies is not None and (not isinstance(self.copies, int) or isinstance(self.copies, bool)
                                        or self.copies < 1):
            raise ValueError(f"stage.controlnet.copies must be a positive integer or null, got {self.copies!r}")
        if self.proj_lr is not None and (isinstance(self.proj_lr, bool) or not isinstance(self.proj_lr, (int, float))
                                         or not self.proj_lr > 0):
            raise ValueError(f"stage.controlnet.proj_lr must be > 0 or null, got {self.proj_lr!r}")


@dataclass(frozen=True)
class Stage:
    """Which of the weak-to-strong stages this run is and where it starts from.

    ``load_from``: a run folder (its ``final/``, else its latest checkpoint), a checkpoint folder, or any
    layout ``pixsigma.weights.load_dit`` reads. ``resolution``: base resolution in px (None = the model's).
    ``kv``: the KV compression to add in ``kv_compress`` (None = R=2 on the deep half of the layers).
    """

    name: str = "finetune"
    load_from: str | None = None
    resolution: int | None = None
    kv: KVCompress | None = None
    controlnet: ControlNetStage | None = None  # only for the controlnet stage (None there: the defaults)
    consistency: ConsistencyStage | None = None  # only for the consistency stage (None there: the defaults)

    def __post_init__(self) -> None:
        if self.name not in STAGE_NAMES:
            raise ValueError(f"stage.name must be one of {STAGE_NAMES}, got {self.name!r}")
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution % 16
                                            or not 64 <= self.resolution <= 4096):
            raise ValueError(f"stage.resolution must be a multiple of 16 in [64, 4096] px, got {self.resolution!r}")
        if isinstance(self.kv, dict):
            kv = dict(self.kv)
            if isinstance(kv.get("layers"), str):
                kv["layers"] = parse_layers(kv["layers"])
            object.__setattr__(self, "kv", KVCompress(**kv))
        if self.kv is not None and self.name != "kv_compress":
            raise ValueError(f"stage.kv is only used by the kv_compress stage, not {self.name!r}")
        if isinstance(self.controlnet, dict):
            object.__setattr__(self, "controlnet", ControlNetStage(**self.controlnet))
        if self.controlnet is not None and self.name != "controlnet":
            raise ValueError(f"stage.controlnet is only used by the controlnet stage, not {self.name!r}")
        if self.name == "controlnet" and self.controlnet is None:
            object.__setattr__(self, "controlnet", ControlNetStage())
        if isinstance(self.consistency, dict):
            check_fields(ConsistencyStage, self.consistency, "stage.consistency keys")
            object.__setattr__(self, "consistency", ConsistencyStage(**self.consistency))
        if self.consistency is not None and self.name != "consistency":
            raise ValueError(f"stage.consistency is only used by the consistency stage, not {self.name!r}")
        if self.name == "consistency" and self.consistency is None:
            object.__setattr__(self, "consistency", ConsistencyStage())
        if self.name == "from_scratch" and self.load_from:
            raise ValueError("stage from_scratch starts from random weights: remove stage.load_from "
                             "(or use stage finetune)")
        if self.name != "from_scratch" and not self.load_from:
            raise ValueError(f"stage {self.name} starts from another stage's weights: set stage.load_from to a run "
                             "folder, a checkpoint folder or a weights file")


class RunSpec(Protocol):
    """What ``model_config`` reads of a run (a ``train.config.TrainConfig``; named here so this module, which
    ``train.config`` imports, does not import it back)."""

    stage: Stage
    model: str
    model_args: dict


def model_config(cfg: RunSpec, loaded: DiTConfig | None) -> DiTConfig:
    """The DiTConfig this run trains: the preset (from scratch) or the loaded one, changed as the stage says."""
    stage = cfg.stage
    if stage.name == "from_scratch":
        base = PRESETS[cfg.model]
        check_fields(DiTConfig, cfg.model_args, "model_args")
        base = replace(base, **cfg.model_args)
        if stage.resolution and stage.resolution != base.resolution:
            base = base.at_resolution(stage.resolution)
        return base
    if loaded is None:
        raise ValueError(f"stage {stage.name} needs the config of the weights in stage.load_from")
    res = stage.resolution or loaded.resolution
    if stage.name == "res_up":
        if res == loaded.resolution:
            raise ValueError(f"res_up: stage.resolution ({stage.resolution}) must differ from the loaded model's "
                             f"base resolution {loaded.resolution}")
        return loaded.at_resolution(res)
    if res != loaded.resolution:
        raise ValueError(f"stage {stage.name}: stage.resolution {res} differs from the loaded model's "
                         f"{loaded.resolution} px; changing resolution is the res_up stage")
    if stage.name == "kv_compress":
        kv = stage.kv or default_kv(loaded.depth)
        if not kv.active:
            raise ValueError(f"kv_compress needs ratio > 1 and some layers, got {kv}")
        bad = [i for i in kv.layers if i >= loaded.depth]
        if bad:
            raise ValueError(f"stage.kv.layers {bad} do not exist: the model has layers 0-{loaded.depth - 1}")
        return loaded.with_kv(kv)
    return loaded


def allowed_missing(stage: str) -> re.Pattern | None:
    """Keys that may be absent from the starting weights: the new KV conv when entering kv_compress."""
    return KV_KEYS if stage == "kv_compress" else None
