"""LoRA adapters on the DiT: read every layout (``pixsigma.lora_keys``), check them against the model, apply
them as removable additive deltas, and write the diffusers ``transformer.`` layout.

An adapter adds ``scale · alpha / r · B A x`` to a Linear's output (PEFT's LoRA; ``alpha`` = r where a file
stores none, ``alpha / √r`` for rsLoRA). The base weights are never touched: a forward hook on each adapted Linear
adds the summed deltas of the active adapters, so switching or removing adapters needs no reload and an empty
set (or every scale 0) runs the base model exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pixsigma.io import atomic_write, atomic_write_json
from pixsigma.lora_keys import LORA_LAYOUTS, Target, module_table, split_key, underscore_table
from pixsigma.registry import LORA_ALIASES
from pixsigma.weights import load_state_dict_file

Tensor = torch.Tensor
ADAPTER_CONFIG = "adapter_config.json"
LORA_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "adapter_model.bin")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry holding the LoraConfig


@dataclass(frozen=True)
class LoraSpec:
    """One adapter to apply: a file, a folder or a ``LORA_ALIASES`` name, and the user's scale."""

    path: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or self.scale != self.scale:
            raise ValueError(f"LoRA scale must be a number, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``PATH[:SCALE]`` (a colon followed by no number belongs to the path)."""
        path, sep, tail = str(text).strip().rpartition(":")
        if sep and path:
            try:
                return cls(path, float(tail))
            except ValueError:
                pass
        if not str(text).strip():
            raise ValueError("empty LoRA: use PATH[:SCALE], e.g. my_lora.safetensors:0.8")
        return cls(str(text).strip())


def parse_loras(value: str | list | tuple | None) -> list[LoraSpec]:
    """The app/API form: ``"name:1.0, other.safetensors:0.5"``, or a list of such strings / (path, scale)."""
    if value is None:
        return []
    items = [s for s in value.split(",") if s.strip()] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if isinstance(item, LoraSpec):
            out.append(item)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            out.append(LoraSpec(str(item[0]), item[1]))
        elif isinstance(item, str):
            out.append(LoraSpec.parse(item))
        else:
            raise ValueError(f"loras must be 'PATH[:SCALE], …' or a list of those / (path, scale), got {item!r}")
    return out


def resolve_lora(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(weights file, adapter_config.json or None) of an alias, a file, or a folder holding one."""
    p = LORA_ALIASES.get(str(path), Path(path)).expanduser()
    if p.is_dir():
        found = [p / n for n in LORA_FILES if (p / n).is_file()] or sorted(p.glob("*.safetensors"))
        if len(found) != 1 and not (found and found[0].name in LORA_FILES):
            raise FileNotFoundError(f"LoRA folder {p} must hold one of {', '.join(LORA_FILES)} (or exactly one "
                                    f".safetensors file), found {[f.name for f in found] or 'none'}")
        p = found[0]
    elif not p.is_file():
        known = ", ".join(LORA_ALIASES) or "none"
        raise FileNotFoundError(f"LoRA {str(path)!r} not found: give a .safetensors file, a PEFT folder "
                                f"(adapter_model.safetensors + {ADAPTER_CONFIG}) or a shipped name ({known})")
    config = p.parent / ADAPTER_CONFIG
    return p, config if config.is_file() and p.name in LORA_FILES else None


def _file_config(path: Path, config: Path | None) -> dict:
    """The LoraConfig fields a file or its folder stores (``lora_alpha``, ``r``, ``alpha_pattern``, …)."""
    cfg: dict = {}
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
        if raw:
            cfg = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    if config is not None:
        cfg.update(json.loads(config.read_text()))
    return cfg


@dataclass
class LoraWeights:
    """An adapter checked against one model: per pixsigma Linear, its (A, B, alpha/r, target) pairs."""

    name: str
    layout: str
    modules: dict[str, list[tuple[Tensor, Tensor, float, Target]]]

    @property
    def num_params(self) -> int:
        return sum(a.numel() + b.numel() for pairs in self.modules.values() for a, b, _, _ in pairs)


def _alpha_for(path: str, cfg: dict) -> float | None:
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
        if path == pattern or path.endswith("." + pattern):
            return float(alpha)
    return float(cfg["lora_alpha"]) if cfg.get("lora_alpha") is not None else None


def load_lora(path: str | os.PathLike, model: nn.Module) -> LoraWeights:
    """Read the adapter at ``path`` (any ``LORA_LAYOUTS``) and check every key against ``model``'s Linears;
    a key in no layout, naming no module, or of the wrong shape is a ValueError naming it."""
    file, config = resolve_lora(path)
    sd = load_state_dict_file(file)
    cfg = _file_config(file, config)
    table = module_table(model)
    underscored = underscore_table(table)
    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
    layouts = set()
    for key, value in sd.items():
        hit = split_key(key)
        if hit is None:
            raise ValueError(f"LoRA {file}: key {key!r} is in no known LoRA layout (DoRA and LoHa/LoKr are not "
                             f"LoRA); accepted: {'; '.join(LORA_LAYOUTS)}")
        layout, mod_path, role = hit
        if layout == "kohya":
            mod_path = underscored.get(mod_path, mod_path)
        if mod_path not in table:
            raise ValueError(f"LoRA {file}: key {key!r} matches no Linear of this model (module {mod_path!r}); "
                             "is it a LoRA of another model? This model's Linears are named like "
                             "'transformer_blocks.0.attn1.to_q' (diffusers) or 'blocks.0.attn.qkv' (original)")
        layouts.add(layout)
        parts.setdefault(mod_path, {})[role] = (key, value)
    if not parts:
        raise ValueError(f"LoRA {file} holds no tensors; accepted: {'; '.join(LORA_LAYOUTS)}")
    modules: dict[str, list[tuple[Tensor, Tensor, float, Target]]] = {}
    linears = dict(model.named_modules())
    for mod_path, got in parts.items():
        if "A" not in got or "B" not in got:
            key = next(iter(got.values()))[0]
            missing = "lora_B/lora_up" if "B" not in got else "lora_A/lora_down"
            raise ValueError(f"LoRA {file}: key {key!r} has no {missing} partner; a LoRA module needs both matrices")
        target = table[mod_path]
        lin = linears[target.module]
        (ka, a), (kb, b) = got["A"], got["B"]
        rank = a.shape[0]
        rows = lin.out_features // target.parts
        for key, t, want in ((ka, a, (rank, lin.in_features)), (kb, b, (rows, rank))):
            if tuple(t.shape) != want:
                raise ValueError(f"LoRA {file}: key {key!r} has shape {tuple(t.shape)}, the model's "
                                 f"{mod_path} expects {want} (rank {rank}); is it a LoRA of another model?")
        alpha = float(got["alpha"][1].item()) if "alpha" in got else _alpha_for(mod_path, cfg)
        alpha = rank if alpha is None else alpha
        factor = alpha / (rank ** 0.5 if cfg.get("use_rslora") else rank)
        modules.setdefault(target.module, []).append((a.float(), b.float(), factor, target))
    return LoraWeights(file.parent.name if file.name in LORA_FILES else file.stem, "+".join(sorted(layouts)),
                       modules)


class LoraStack:
    """The adapters active on one model. ``set([(weights, scale), …])`` replaces them (they add up); files are
    read once per (path, mtime) by ``load``, and the base weights are never modified."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.active: list[tuple[str, float]] = []
        self._hooks: list = []
        self._cache: dict[tuple[str, int], LoraWeights] = {}

    def load(self, spec: LoraSpec) -> LoraWeights:
        file, _ = resolve_lora(spec.path)
        key = (str(file.resolve()), file.stat().st_mtime_ns)
        if key not in self._cache:
            self._cache[key] = load_lora(spec.path, self.model)
        return self._cache[key]

    def set(self, specs: list[LoraSpec]) -> None:
        """Apply exactly ``specs`` (an empty list removes every adapter); all are read and checked first."""
        loaded = [(self.load(s), s.scale) for s in specs]
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.active = [(s.path, s.scale) for s in specs]
        linears = dict(self.model.named_modules())
        per_module: dict[str, list[tuple[Tensor, Tensor]]] = {}
        for weights, scale in loaded:
            if scale == 0:
                continue
            for name, pairs in weights.modules.items():
                out = linears[name].out_features
                for a, b, factor, t in pairs:
                    full = torch.zeros(out, a.shape[0])
                    rows = out // t.parts
                    full[t.part * rows:(t.part + 1) * rows] = b * (scale * factor)
                    per_module.setdefault(name, []).append((a, full))
        for name, pairs in per_module.items():
            lin = linears[name]
            a = torch.cat([p[0] for p in pairs]).to(lin.weight.device, lin.weight.dtype)  # (sum r, in)
            b = torch.cat([p[1] for p in pairs], dim=1).to(lin.weight.device, lin.weight.dtype)  # (out, sum r)
            self._hooks.append(lin.register_forward_hook(_delta_hook(a, b)))


def _delta_hook(a: Tensor, b: Tensor):
    def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        x = args[0]
        return out + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))

    return hook


def to_diffusers_lora(pairs: dict[str, tuple[Tensor, Tensor]], model: nn.Module) -> dict[str, Tensor]:
    """{pixsigma Linear name: (A, B)} -> ``transformer.<diffusers path>.lora_A/B.weight`` tensors. A fused
    ``qkv``/``kv_linear`` adapter becomes one per diffusers projection: the same A, B's row block (exact)."""
    out: dict[str, Tensor] = {}
    table = module_table(model)
    for module, (a, b) in pairs.items():
        names = [(n, t) for n, t in table.items() if t.module == module and n != module] or [(module, table[module])]
        for name, t in names:
            rows = b.shape[0] // t.parts
            out[f"transformer.{name}.lora_A.weight"] = a.detach().cpu().clone()  # one tensor per key on disk
            out[f"transformer.{name}.lora_B.weight"] = b[t.part * rows:(t.part + 1) * rows].detach().cpu().contiguous()
    return out


def save_lora(tensors: dict[str, Tensor], folder: str | os.PathLike, rank: int, alpha: float,
              target_modules: list[str], base: str | None = None) -> Path:
    """A LoRA folder: ``pytorch_lora_weights.safetensors`` (diffusers' name, its LoraConfig in the metadata) and
    ``adapter_config.json``, each written atomically."""
    folder = Path(folder)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(target_modules),
              "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "base_model_name_or_path": base}
    meta = {"format": "pt", METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    atomic_write(folder / LORA_FILES[1], lambda t: save_file(tensors, t, metadata=meta))
    atomic_write_json(config, folder / ADAPTER_CONFIG, indent=2)
    return folder
