"""Starting weights, resumable checkpoints, and the final export.

A checkpoint ``RUN/checkpoints/step_NNNNNNNN/`` is ``accelerator.save_state`` (model, optimizer, LR
schedule, EMA, the loop's position, every process's RNG states) plus ``pixsigma.json``, which also makes it
a pixsigma weights folder (``load_dit`` / a next stage's ``load_from`` read it). It is written under a
temporary name and renamed when complete, so a checkpoint folder is either complete or absent; only the
last ``keep_last`` are kept. The end of a run exports ``RUN/final/`` (``save_dit``; the EMA weights when
EMA is on) and, without KV compression, ``RUN/final_diffusers/`` (``save_diffusers_transformer``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from pixsigma.config import DiTConfig
from pixsigma.io import swap_in_folder
from pixsigma.model.dit import PixArtDiT
from pixsigma.weights import (
    PIXSIGMA_CONFIG,
    CheckpointError,
    load_dit,
    load_report,
    load_weights,
    read_checkpoint,
    save_diffusers_transformer,
    save_dit,
)

from .config import TrainConfig
from .optim import EMA
from .runfiles import CHECKPOINTS, FINAL, FINAL_DIFFUSERS, step_name
from .stages import allowed_missing, model_config

_STEP = re.compile(r"^step_(\d+)$")  # runfiles.step_name's folders


def checkpoint_step(ckpt: str | Path) -> int:
    """The optimizer step a checkpoint folder (``step_NNNNNNNN``) was saved at."""
    m = _STEP.match(Path(ckpt).name)
    if m is None:
        raise ValueError(f"{ckpt} is not a checkpoint folder: its name must be step_NNNNNNNN")
    return int(m.group(1))


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name)] if root.is_dir() else []
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def checkpoint_model(ckpt: str | Path, ema: bool = True) -> PixArtDiT:
    """The model of a checkpoint folder: its EMA weights when the run kept an EMA (what ``final/`` exports,
    so curves over checkpoints score what a finished run would ship), else the trained weights."""
    ckpt = Path(ckpt)
    net = load_dit(ckpt)
    if ema:
        for f in sorted(ckpt.glob("custom_checkpoint_*.pkl")):  # accelerate's registered objects, EMA among them
            state = torch.load(f, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "shadow" in state:
                net.load_state_dict(state["shadow"])
                break
    return net


def resolve_load_from(path: str | Path) -> Path:
    """A run folder -> its ``final/``, else its latest checkpoint; anything else as given."""
    p = Path(path)
    if (p / FINAL / PIXSIGMA_CONFIG).is_file():
        return p / FINAL
    if (p / CHECKPOINTS).is_dir():
        last = latest_checkpoint(p)
        if last is None:
            raise FileNotFoundError(f"run folder {p} has neither {FINAL}/ nor a complete checkpoint")
        return last
    if not p.exists():
        raise FileNotFoundError(f"stage.load_from {p} does not exist")
    return p


def target_model_config(cfg: TrainConfig) -> DiTConfig:
    """The model config of a run without loading weights where the source has a ``pixsigma.json``."""
    if cfg.stage.name == "from_scratch":
        return model_config(cfg, None)
    src = resolve_load_from(cfg.stage.load_from)
    meta = src / PIXSIGMA_CONFIG
    loaded = DiTConfig.from_dict(json.loads(meta.read_text())["dit"]) if meta.is_file() else read_checkpoint(src)[0]
    return model_config(cfg, loaded)


def build_model(cfg: TrainConfig) -> tuple[PixArtDiT, dict[str, Any]]:
    """The model this run trains, with its starting weights, and a report of what was loaded."""
    if cfg.stage.name == "from_scratch":
        config = model_config(cfg, None)
        return PixArtDiT(config), {"source": None, "missing": [], "unexpected": []}
    src = resolve_load_from(cfg.stage.load_from)
    loaded, sd = read_checkpoint(src)
    config = model_config(cfg, loaded)
    model = PixArtDiT(config)
    missing, unexpected = load_report(model, sd)
    allowed = allowed_missing(cfg.stage.name)
    load_weights(model, sd, str(src), allow_missing=allowed, allow_unexpected=allowed)
    return model, {"source": str(src), "missing": missing, "unexpected": unexpected}


def _write_meta(folder: Path, config: DiTConfig, extra: dict[str, Any]) -> None:
    (folder / PIXSIGMA_CONFIG).write_text(json.dumps({"dit": config.to_dict(), **extra}, indent=2))


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, config: DiTConfig, keep_last: int) -> Path:
    """Collective: every process calls it. Returns the complete checkpoint folder."""
    root = run_dir / CHECKPOINTS
    final, tmp = root / step_name(step), root / f".tmp-{step_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        _write_meta(tmp, config, {"step": step})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        swap_in_folder(tmp, final)  # replaces the same step saved again (a stop request on a save step)
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def clean_partial(run_dir: Path) -> None:
    """Remove the temporary folders of checkpoints or exports cut short by a crash."""
    for parent in (run_dir / CHECKPOINTS, run_dir):
        if parent.is_dir():
            for p in parent.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)


def export_final(accelerator: Accelerator, model: torch.nn.Module, ema: EMA | None, config: DiTConfig, run_dir: Path,
                 extra: dict[str, Any]) -> dict[str, str]:
    """Collective. Writes ``final/`` (and ``final_diffusers/`` when diffusers can hold the model)."""
    state = accelerator.get_state_dict(model)  # gathers a sharded (FSDP) model; unwraps DDP
    out: dict[str, str] = {}
    if accelerator.is_main_process:
        net = PixArtDiT(config)
        net.load_state_dict(ema.shadow if ema is not None else state)
        for name, write in ((FINAL, lambda d: save_dit(net, d, extra=extra)),
                            (FINAL_DIFFUSERS, lambda d: save_diffusers_transformer(net, d))):
            if name == FINAL_DIFFUSERS and config.kv_compress.active:
                continue  # diffusers' PixArtTransformer2DModel has no KV compression
            tmp, dest = run_dir / f".tmp-{name}", run_dir / name
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                write(tmp)
            except CheckpointError as e:  # e.g. an mlp_ratio diffusers cannot express
                print(f"[train] not exporting {name}: {e}")
                shutil.rmtree(tmp, ignore_errors=True)
                continue
            swap_in_folder(tmp, dest)
            out[name] = str(dest)
    accelerator.wait_for_everyone()
    return out
