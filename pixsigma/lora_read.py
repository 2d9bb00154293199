"""Read one adapter file (LoRA, LoHa or LoKr in any ``pixsigma.lora_keys`` layout) and check it against the DiT
and, where given, the text encoder: every tensor finite, every shape fitting, every module named.

Keys of the text encoder land on T5 where they name its Linears; those that do not (or every one, without a text
encoder) are skipped with one warning that counts them. DiT keys naming no module are skipped with a counted
warning too; a file where nothing matches is refused. A tensor of the wrong shape (an adapter of another model),
a half module (A without B), a non-finite tensor or alpha is refused, naming file and key.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pixsigma.lora_keys import (
    LORA_LAYOUTS,
    KeyHit,
    Target,
    base_linears,
    linear_table,
    module_table,
    resolve_path,
    split_key,
    underscore_table,
)
from pixsigma.registry import LORA_ALIASES
from pixsigma.weights import load_state_dict_file

Tensor = torch.Tensor
ADAPTER_CONFIG = "adapter_config.json"
LORA_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "adapter_model.bin")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry holding the LoraConfig
ALPHA_LIMIT = 1e4  # |alpha| above this is no adapter anyone trained: refused rather than overflowing
KINDS = {"lora": ("lora_A", "lora_B"), "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
         "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}


@dataclass
class Factors:
    """One module's delta from one file: ``kind`` lora/loha/lokr, its tensors by role (float32), the factor
    ``scale`` (alpha / r, folded in when applied) and the rows it adds to (``target``)."""

    kind: str
    tensors: dict[str, Tensor]
    scale: float
    target: Target


@dataclass
class AdapterWeights:
    """An adapter file checked against one model: Factors per DiT Linear and per text-encoder Linear."""

    name: str
    layout: str
    dit: dict[str, list[Factors]]
    te: dict[str, list[Factors]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(t.numel() for mods in (self.dit, self.te) for fs in mods.values() for f in fs
                   for t in f.tensors.values())


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


def file_config(path: Path, config: Path | None) -> dict:
    """The adapter config fields a file or its folder stores (``lora_alpha``/``alpha``, ``r``, patterns, …)."""
    cfg: dict = {}
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
        if raw:
            cfg = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    if config is not None:
        try:
            cfg.update(json.loads(config.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"LoRA {config}: not valid JSON ({e})") from None
    return cfg


def _pattern_value(path: str, pattern: dict | None, default):
    for key, value in (pattern or {}).items():
        if path == key or path.endswith("." + key):
            return value
    return default


def _finite_alpha(value, file: Path, where: str) -> float:
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"LoRA {file}: {where} must be a number, got {value!r}") from None
    if not math.isfinite(alpha) or abs(alpha) > ALPHA_LIMIT:
        raise ValueError(f"LoRA {file}: {where} is {alpha!r}; alpha must be finite and within "
                         f"[-{ALPHA_LIMIT:g}, {ALPHA_LIMIT:g}]")
    return alpha


def _scale(kind: str, got: dict[str, tuple[str, Tensor]], path: str, cfg: dict, file: Path) -> float:
    """alpha / r of one module: its ``.alpha`` tensor (LyCORIS/kohya/OneTrainer), else the config's."""
    if kind == "lora":
        rank = got["lora_A"][1].shape[0]
    elif kind == "loha":
        rank = got["hada_w1_b"][1].shape[0]
    else:  # LyCORIS/ComfyUI: the rank of the decomposed factor (w2 first); both full: no alpha scaling
        rank = next((got[r][1].shape[0] for r in ("lokr_w2_b", "lokr_w1_b") if r in got), None)
    if "alpha" in got:
        key, t = got["alpha"]
        alpha = _finite_alpha(t.float().flatten()[0].item() if t.numel() == 1 else float("nan"), file, f"key {key!r}")
        return 1.0 if rank is None else alpha / rank
    if cfg.get("peft_type") in ("LOHA", "LOKR") or kind != "lora":
        r = _pattern_value(path, cfg.get("rank_pattern"), cfg.get("r"))
        alpha = _pattern_value(path, cfg.get("alpha_pattern"), cfg.get("alpha"))
        if r is None or alpha is None:  # LyCORIS without alpha: alpha = r
            return 1.0
        return _finite_alpha(alpha, file, "'alpha' of the adapter config") / float(r)
    alpha = _pattern_value(path, cfg.get("alpha_pattern"), cfg.get("lora_alpha"))
    alpha = rank if alpha is None else _finite_alpha(alpha, file, "'lora_alpha' of the adapter config")
    return alpha / (rank ** 0.5 if cfg.get("use_rslora") else rank)


def _shapes_ok(kind: str, t: dict[str, Tensor], rows: int, cols: int) -> bool:
    """Do the factors give a (rows, cols) delta?"""
    if kind == "lora":
        a, b = t["lora_A"], t["lora_B"]
        return a.dim() == 2 and b.dim() == 2 and a.shape[1] == cols and b.shape == (rows, a.shape[0])
    if kind == "loha":
        w1a, w1b, w2a, w2b = (t[r] for r in KINDS["loha"])
        return (all(x.dim() == 2 for x in (w1a, w1b, w2a, w2b)) and w1a.shape[0] == w2a.shape[0] == rows
                and w1b.shape[1] == w2b.shape[1] == cols and w1a.shape[1] == w1b.shape[0]
                and w2a.shape[1] == w2b.shape[0])
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return w1.dim() == w2.dim() == 2 and (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]) == (rows, cols)


def _kind(roles: set[str]) -> str | None:
    """The adapter kind of a module's roles, or None when they are incomplete."""
    if {"lora_A", "lora_B"} <= roles:
        return "lora"
    if set(KINDS["loha"]) <= roles:
        return "loha"
    if ("lokr_w1" in roles or {"lokr_w1_a", "lokr_w1_b"} <= roles) and (
            "lokr_w2" in roles or {"lokr_w2_a", "lokr_w2_b"} <= roles):
        return "lokr"
    return None


def _check_modules(parts: dict[tuple[str, Target], dict[str, tuple[str, Tensor]]], model: nn.Module, cfg: dict,
                   file: Path) -> dict[str, list[Factors]]:
    linears = base_linears(model)
    out: dict[str, list[Factors]] = {}
    for (path, target), got in parts.items():
        roles = set(got) - {"alpha"}
        kind = _kind(roles)
        key = next(iter(got.values()))[0]
        if kind is None:
            raise ValueError(f"LoRA {file}: key {key!r} has no complete set of partners (has {sorted(roles)}); a "
                             f"LoRA module needs lora_A/lora_down and lora_B/lora_up, LoHa hada_w1_a, hada_w1_b, "
                             f"hada_w2_a, hada_w2_b, LoKr lokr_w1(_a/_b) and lokr_w2(_a/_b)")
        extra = roles - set(KINDS[kind])
        if extra:
            raise ValueError(f"LoRA {file}: module {path!r} mixes {kind} keys with {sorted(extra)}")
        for role in roles:
            k, t = got[role]
            if not torch.isfinite(t).all():
                raise ValueError(f"LoRA {file}: key {k!r} holds non-finite values (NaN or inf)")
        lin = linears[target.module]
        rows, cols = lin.out_features // target.parts, lin.in_features
        tensors = {r: got[r][1].float() for r in roles}
        if not _shapes_ok(kind, tensors, rows, cols):
            shapes = {got[r][0]: tuple(got[r][1].shape) for r in sorted(roles)}
            raise ValueError(f"LoRA {file}: key {key!r}: {kind} shapes {shapes} do not give the ({rows}, {cols}) "
                             f"delta of the model's {path}; is it an adapter of another model?")
        scale = _scale(kind, got, path, cfg, file)
        bound = scale * math.prod(float(t.abs().max()) * max(t.shape) for t in tensors.values())
        if not math.isfinite(bound):
            raise ValueError(f"LoRA {file}: module {path!r} would overflow (alpha/r {scale:g} with its tensors' "
                             "magnitudes); refused")
        out.setdefault(target.module, []).append(Factors(kind, tensors, scale, target))
    return out


def read_adapter(path: str | os.PathLike, model: nn.Module, text_encoder: nn.Module | None = None
                 ) -> AdapterWeights:
    """Read the adapter at ``path`` and check it against ``model`` (and ``text_encoder``); see the module doc."""
    file, config = resolve_lora(path)
    sd = load_state_dict_file(file)
    cfg = file_config(file, config)
    tables = {"dit": module_table(model)}
    if text_encoder is not None:
        tables["te"] = linear_table(text_encoder)
    under = {side: underscore_table(t) for side, t in tables.items()}
    parts: dict[str, dict[tuple[str, Target], dict[str, tuple[str, Tensor]]]] = {"dit": {}, "te": {}}
    unknown: list[str] = []
    te_skipped: list[str] = []
    layouts: set[str] = set()
    for key, value in sd.items():
        hit: KeyHit | None = split_key(key)
        if hit is None:
            unknown.append(key)
            continue
        target = resolve_path(hit, tables[hit.side], under[hit.side]) if hit.side in tables else None
        if target is None:
            (te_skipped if hit.side == "te" else unknown).append(key)
            continue
        name = under[hit.side][hit.path] if hit.underscored else hit.path
        layouts.add(f"{hit.side}:{hit.prefix or '(none)'}")
        parts[hit.side].setdefault((name, target), {})[hit.role] = (key, value)
    if not parts["dit"] and not parts["te"]:
        raise ValueError(f"LoRA {file}: none of its {len(sd)} keys names a module of this model (e.g. "
                         f"{(unknown or te_skipped or ['none'])[0]!r}); is it an adapter of another model? "
                         f"Accepted: {'; '.join(LORA_LAYOUTS)}")
    warnings = []
    if unknown:
        warnings.append(f"LoRA {file.name}: {len(unknown)} key(s) match no module of this DiT and were skipped "
                        f"(e.g. {unknown[0]!r})")
    if te_skipped:
        warnings.append(f"LoRA {file.name}: {len(te_skipped)} text-encoder key(s) match no module of this "
                        f"model's T5 and were skipped (e.g. {te_skipped[0]!r})" if text_encoder is not None else
                        f"LoRA {file.name}: {len(te_skipped)} text-encoder key(s) skipped (no text encoder to "
                        f"adapt; e.g. {te_skipped[0]!r})")
    dit = _check_modules(parts["dit"], model, cfg, file)
    te = _check_modules(parts["te"], text_encoder, cfg, file) if parts["te"] else {}
    name = file.parent.name if file.name in LORA_FILES else file.stem
    return AdapterWeights(name, "+".join(sorted(layouts)), dit, te, warnings)
