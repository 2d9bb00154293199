"""LoRA training on the shared loop: ``lora: {rank, alpha, target_modules}`` in a run's config.

``add_lora`` freezes the loaded model (any stage's) and injects ``peft`` LoRA layers into the chosen Linears of
every block; the loop then trains only those. ``export_lora`` writes ``RUN/final/`` as a LoRA folder in the
diffusers ``transformer.`` layout (``pixsigma.lora.save_lora``), which ``--lora``, ComfyUI and diffusers-style
tools read: a fused ``qkv`` / ``kv_linear`` adapter becomes one per diffusers projection, exactly.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from pixsigma.config import DiTConfig
from pixsigma.io import swap_in_folder
from pixsigma.lora import save_lora, to_diffusers_lora
from pixsigma.model.dit import PixArtDiT
from pixsigma.t5 import quiet_torchao
from pixsigma.weights import load_dit

from .runfiles import FINAL

# The Linears of a block a LoRA may adapt (pixsigma's names; diffusers' to_q/to_k/to_v are rows of attn.qkv).
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
                 "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class LoraTrainConfig:
    """``rank`` r; ``alpha`` (None: = r, scale 1); ``target_modules``: names from ``BLOCK_LINEARS``, in every block."""

    rank: int = 16
    alpha: float | None = None
    target_modules: tuple[str, ...] = field(default=BLOCK_LINEARS)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
                raise ValueError(f"lora.alpha must be a number > 0 or null (= rank), got {self.alpha!r}")
            object.__setattr__(self, "alpha", float(self.alpha))
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
        bad = [t for t in targets if t not in BLOCK_LINEARS]
        if not targets or bad:
            raise ValueError(f"lora.target_modules must be a non-empty list of {list(BLOCK_LINEARS)}, got "
                             f"{list(targets)!r}")
        object.__setattr__(self, "target_modules", targets)

    @property
    def lora_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else self.alpha


def add_lora(model: PixArtDiT, cfg: LoraTrainConfig) -> PixArtDiT:
    """Freeze ``model`` and inject trainable LoRA layers (A: Kaiming, B: 0, so training starts at the base)."""
    with quiet_torchao():  # peft imports torchao, when installed
        from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    pattern = r"blocks\.\d+\.(" + "|".join(re.escape(t) for t in cfg.target_modules) + ")"
    inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=pattern,
                                       lora_dropout=0.0), model)
    return model


def lora_pairs(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, tuple]:
    """{pixsigma Linear name: (A, B)} of a LoRA-injected model (or of its gathered ``state``)."""
    with quiet_torchao():
        from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, state_dict=state)
    mods = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    return {m: (sd[f"{m}.lora_A.weight"].float(), sd[f"{m}.lora_B.weight"].float()) for m in mods}


def export_lora(accelerator: Accelerator, model: torch.nn.Module, config: DiTConfig, cfg: LoraTrainConfig,
                run_dir: Path, base: str | None) -> dict[str, str]:
    """Collective. Writes ``RUN/final/`` (``pytorch_lora_weights.safetensors`` + ``adapter_config.json``)."""
    state = accelerator.get_state_dict(model)
    out: dict[str, str] = {}
    if accelerator.is_main_process:
        with torch.device("meta"):
            skeleton = PixArtDiT(config)  # names and shapes only
        tensors = to_diffusers_lora(lora_pairs(accelerator.unwrap_model(model), state), skeleton)
        targets = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in tensors})
        tmp, dest = run_dir / f".tmp-{FINAL}", run_dir / FINAL
        shutil.rmtree(tmp, ignore_errors=True)
        save_lora(tensors, tmp, cfg.rank, cfg.lora_alpha, targets, base=base)
        swap_in_folder(tmp, dest)
        out[FINAL] = str(dest)
    accelerator.wait_for_everyone()
    return out


def export_lora_checkpoint(checkpoint: Path, base: str | Path, cfg: LoraTrainConfig, out: Path) -> Path:
    """A LoRA folder (as ``export_lora`` writes) from a LoRA run's checkpoint folder and the weights it started
    from: a stopped run's adapter, or one of its points on the way."""
    net = add_lora(load_dit(base), cfg)
    net.load_state_dict(load_file(Path(checkpoint) / "model.safetensors"))
    with torch.device("meta"):
        skeleton = PixArtDiT(net.config)
    tensors = to_diffusers_lora(lora_pairs(net), skeleton)
    targets = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in tensors})
    return save_lora(tensors, out, cfg.rank, cfg.lora_alpha, targets, base=str(base))
