"""LoRA, LoHa and LoKr adapters at inference, through peft: several at once with their own scales, swapped per
request without reloading the model, fused into the weights for speed.

Files are read and checked by ``pixsigma.lora_read`` (every layout of ``pixsigma.lora_keys``) and become peft
tuner layers (``pixsigma.lora_peft``). ``LoraStack.set`` applies exactly the given adapters; an adapter is
injected once per file (path, mtime, size) and switched on and off afterwards. While no adapter is active on a
Linear, the model holds the original Linear itself, so with none active the DiT (and T5) are the never-adapted
modules: same ``state_dict``, bit-identical outputs. ``fuse`` merges the active adapters into the weights
(peft's ``merge``) and keeps the base weights, which ``unfuse`` (and any ``set``) puts back bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from pixsigma import lora_peft
from pixsigma.io import atomic_write, atomic_write_json
from pixsigma.lora_keys import base_linears, module_table
from pixsigma.lora_read import (
    ADAPTER_CONFIG,
    LORA_FILES,
    METADATA_KEY,
    AdapterWeights,
    read_adapter,
    resolve_lora,
)

Tensor = torch.Tensor
SCALE_RANGE = (-4.0, 4.0)  # the one range of a LoRA's scale: CLI, API (GenerationRequest, parse_loras) and app
CACHE_SIZE = 8  # adapters kept injected (switched off) after their last request
__all__ = ["ADAPTER_CONFIG", "CACHE_SIZE", "LORA_FILES", "METADATA_KEY", "SCALE_RANGE", "LoraSpec", "LoraStack",
           "parse_loras", "read_adapter", "resolve_lora", "save_lora", "to_diffusers_lora"]


@dataclass(frozen=True)
class LoraSpec:
    """One adapter to apply: a file, a folder or a ``LORA_ALIASES`` name, and the user's scale (finite, within
    ``SCALE_RANGE``)."""

    path: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"LoRA scale must be a number, got {self.scale!r}")
        lo, hi = SCALE_RANGE
        if not (math.isfinite(self.scale) and lo <= self.scale <= hi):
            raise ValueError(f"scale of {self.path!r} must be in [{lo}, {hi}], got {self.scale}")
        object.__setattr__(self, "scale", float(self.scale))

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``PATH[:SCALE]``: a tail that reads as a number (``nan`` and ``inf`` too) is the scale, checked;
        a colon followed by no number belongs to the path."""
        path, sep, tail = str(text).strip().rpartition(":")
        if sep and path:
            try:
                scale = float(tail)
            except ValueError:
                pass
            else:
                return cls(path, scale)
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


class LoraStack:
    """The adapters active on one DiT (and its T5). ``set([LoraSpec, …])`` applies exactly those (their scales
    add up; an empty list removes every one) and returns the warnings of their files, also kept as
    ``warnings``; ``active`` lists (path, scale) as set. ``fuse()`` merges them into the weights until
    ``unfuse()``; while fused, ``set`` re-fuses the new set. ``on_text_change`` is called whenever the text
    encoder's adapters change (the pipeline's prompt cache is then stale)."""

    def __init__(self, model: nn.Module, text_encoder: nn.Module | None = None,
                 on_text_change: Callable[[], None] | None = None):
        self.model, self.text_encoder, self.on_text_change = model, text_encoder, on_text_change
        self.active: list[tuple[str, float]] = []
        self.warnings: list[str] = []
        self.fused = False
        self._cache: dict[tuple[str, int, int], AdapterWeights] = {}
        self._names: dict[tuple[str, int, int], list[str]] = {}  # file -> its peft adapter names (injected)
        self._chains: dict[str, dict[str, lora_peft.Chain]] = {"dit": {}, "te": {}}
        self._saved: dict[tuple[str, str], Tensor] = {}  # base weights of fused Linears
        self._scales: dict[str, float] = {}  # active peft adapter -> scale
        self._count = 0

    def _models(self) -> dict[str, nn.Module]:
        return {"dit": self.model} | ({"te": self.text_encoder} if self.text_encoder is not None else {})

    def _key(self, spec: LoraSpec) -> tuple[str, int, int]:
        file, _ = resolve_lora(spec.path)
        st = file.stat()
        return str(file.resolve()), st.st_mtime_ns, st.st_size

    def load(self, spec: LoraSpec) -> AdapterWeights:
        """The file of ``spec`` read and checked against the model (once per path, mtime and size)."""
        key = self._key(spec)
        if key not in self._cache:
            self._cache[key] = read_adapter(spec.path, self.model, self.text_encoder)
        self._cache[key] = self._cache.pop(key)  # most recently used last
        return self._cache[key]

    def set(self, specs: list[LoraSpec]) -> list[str]:
        """Apply exactly ``specs``; all are read and checked first, so a refused file changes nothing."""
        loaded = [(self._key(s), self.load(s), s.scale) for s in specs]
        was_fused = self.fused
        self.unfuse()
        try:
            for key, weights, _ in loaded:
                if key not in self._names:
                    weights.warnings += self._inject(key, weights)
        except Exception:
            self._show(self._scales)  # the model as before the call
            if was_fused:
                self.fuse()
            raise
        scales: dict[str, float] = {}
        for key, _, scale in loaded:
            for name in self._names[key]:
                if scale != 0:  # scale 0: the adapter is off, and the model exactly the base
                    scales[name] = scales.get(name, 0.0) + scale
        te_before = self._text_adapters(self._scales)
        self._show(scales)
        self.active = [(s.path, s.scale) for s in specs]
        self.warnings = list(dict.fromkeys(w for _, weights, _ in loaded for w in weights.warnings))
        self._evict({k for k, _, _ in loaded})
        if was_fused:
            self.fuse()
        if self._text_adapters(scales) != te_before and self.on_text_change is not None:
            self.on_text_change()
        return list(self.warnings)

    def _show(self, scales: dict[str, float]) -> None:
        """Activate exactly ``scales``' peft adapters; chains holding none of them give back the original Linear."""
        self._scales = scales
        for chains in self._chains.values():
            for chain in chains.values():
                chain.show(True)
                chain.show(lora_peft.activate(chain, scales))

    def _text_adapters(self, scales: dict[str, float]) -> dict[str, float]:
        held = {a for c in self._chains["te"].values() for a in c.adapters()}
        return {n: s for n, s in scales.items() if n in held}

    def _inject(self, key: tuple[str, int, int], weights: AdapterWeights) -> list[str]:
        """Inject one file's adapters into the models (their existing chains shown while peft adds to them)."""
        names: list[str] = []
        warnings: list[str] = []
        for side, model in self._models().items():
            factors = weights.dit if side == "dit" else weights.te
            if not factors:
                continue
            for chain in self._chains[side].values():
                chain.show(True)
            linears = base_linears(model)
            out = {m: linears[m].out_features for m in factors}
            done: list[str] = []
            try:
                for kind, modules in lora_peft.slots(factors, out):
                    self._count += 1
                    done.append(f"a{self._count}_{kind}")
                    lora_peft.inject(model, done[-1], kind, modules)
            except Exception as e:  # noqa: BLE001 -- peft refuses some Linears (an int8 T5): skip, say so
                self._chains[side] = lora_peft.find_chains(model)
                self._forget(done + (names if side == "dit" else []))
                if side == "dit":
                    raise ValueError(f"LoRA {weights.name}: peft could not apply it to the DiT: {e}") from e
                warnings.append(f"LoRA {weights.name}: its {len(factors)} text-encoder module(s) were skipped "
                                f"({type(e).__name__}: {e})")
            else:
                names += done
            self._chains[side] = lora_peft.find_chains(model)
        self._names[key] = names
        return warnings

    def _forget(self, names: list[str]) -> None:
        """Delete peft adapters from every layer (``_show`` then sets the active ones again)."""
        with warnings.catch_warnings():  # peft warns that it picks another active adapter: _show decides
            warnings.simplefilter("ignore")
            for chains in self._chains.values():
                for chain in chains.values():
                    for layer in chain.layers():
                        for n in names:
                            if n in layer._all_available_adapter_names():
                                layer.delete_adapter(n)

    def _evict(self, keep: set) -> None:
        """Delete the least recently used injected adapters beyond ``CACHE_SIZE`` (never those in use)."""
        old = [k for k in self._cache if k in self._names and k not in keep]  # least recently used first
        for k in old[:max(0, len(self._names) - CACHE_SIZE)]:
            self._forget(self._names.pop(k))
            self._cache.pop(k, None)

    def fuse(self) -> None:
        """Merge the active adapters into the DiT's weights (no extra matmuls per step); ``unfuse`` restores them
        exactly. T5's adapters stay unmerged: T5 runs once per prompt, and its weights may be 8-bit."""
        if self.fused:
            return
        for path, chain in self._chains["dit"].items():
            if getattr(chain.parent, chain.attr) is chain.outer:
                self._saved[("dit", path)] = lora_peft.fuse(chain, list(chain.layers()[0].active_adapters))
        self.fused = True

    def unfuse(self) -> None:
        """Put back the base weights saved by ``fuse`` (bit for bit); adapters run unmerged again."""
        for (side, path), saved in self._saved.items():
            lora_peft.unfuse(self._chains[side][path], saved)
        self._saved = {}
        self.fused = False


def to_diffusers_lora(pairs: dict[str, tuple[Tensor, Tensor]], model: nn.Module) -> dict[str, Tensor]:
    """{pixsigma Linear name: (A, B)} -> ``transformer.<diffusers path>.lora_A/B.weight`` tensors. A fused
    ``qkv``/``kv_linear`` adapter becomes one per diffusers projection: the same A, B's row block (exact)."""
    out: dict[str, Tensor] = {}
    table = module_table(model)
    for module, (a, b) in pairs.items():
        # diffusers' names (not OMI's part indices); a Linear diffusers lacks keeps its own
        names = [(n, t) for n, t in table.items() if t.module == module and n != module
                 and not n.startswith(module + ".")] or [(module, table[module])]
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
