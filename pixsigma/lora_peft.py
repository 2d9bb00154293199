"""Checked adapter factors (``pixsigma.lora_read``) as peft tuner layers on a model's Linears.

Each file becomes peft adapters injected with ``peft.inject_adapter_in_model`` (``LoraConfig``, ``LoHaConfig``,
``LoKrConfig``) whose tensors are then set to the file's, with alpha / r folded into one factor, so peft's
``scaling`` is the user's scale alone (``set_scale``). A fused Linear (``attn.qkv``, ``cross_attn.kv_linear``)
takes an adapter of one of diffusers' split projections exactly:

- LoRA: one adapter, A stacked, B block-structured (each part's B in its rows and rank columns, zeros elsewhere);
- LoHa: one adapter per part, w1_a and w2_a zero outside the part's rows ((W1a W1b) ⊙ (W2a W2b) is then zero there);
- LoKr: one adapter per part, w1 (or w1_a) zero outside the part's rows (kron(W1, W2)'s rows follow W1's).

A ``Chain`` is one adapted Linear: the outermost peft layer (peft nests a LoHa around a LoRA layer and so on) and
the original Linear, so the model can hold either: the Linear itself while none of its adapters is active, which
keeps the model's modules, ``state_dict`` and outputs those of a never-adapted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pixsigma.lora_read import Factors
from pixsigma.quiet import quiet_torchao

with quiet_torchao():  # peft imports torchao, when installed
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

Tensor = torch.Tensor
_LYCORIS_DICTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b",
                  "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _rows(f: Factors, t: Tensor) -> Tensor:
    """``t`` (rows of one part of a fused Linear) padded with zero rows to the whole Linear."""
    if f.target.parts == 1:
        return t
    n = t.shape[0]
    full = t.new_zeros((n * f.target.parts, *t.shape[1:]))
    full[f.target.part * n:(f.target.part + 1) * n] = t
    return full


def slots(factors: dict[str, list[Factors]], out_features: dict[str, int]) -> list[tuple[str, dict]]:
    """[(kind, {module: {role: tensor}})]: the peft adapters one file's factors become (see the module doc)."""
    lora: dict[str, dict[str, Tensor]] = {}
    other: dict[tuple[str, int], dict[str, dict[str, Tensor]]] = {}
    for module, fs in factors.items():
        out = out_features[module]
        los = [f for f in fs if f.kind == "lora"]
        if los:
            a = torch.cat([f.tensors["lora_A"] for f in los])
            b = a.new_zeros(out, a.shape[0])
            col = 0
            for f in los:
                r, rows = f.tensors["lora_A"].shape[0], out // f.target.parts
                b[f.target.part * rows:(f.target.part + 1) * rows, col:col + r] = f.tensors["lora_B"] * f.scale
                col += r
            lora[module] = {"lora_A": a, "lora_B": b}
        for kind in ("loha", "lokr"):
            for k, f in enumerate(f for f in fs if f.kind == kind):
                t = dict(f.tensors)
                if kind == "loha":
                    t["hada_w1_a"], t["hada_w2_a"] = _rows(f, t["hada_w1_a"] * f.scale), _rows(f, t["hada_w2_a"])
                else:
                    first = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"
                    t[first] = _rows(f, t[first] * f.scale)
                other.setdefault((kind, k), {})[module] = t
    return ([("lora", lora)] if lora else []) + [(kind, mods) for (kind, _), mods in other.items()]


@dataclass
class Chain:
    """One adapted Linear: where it sits (``parent``.``attr``), the original ``base`` and the outermost peft
    layer ``outer`` (which holds ``base`` through its ``base_layer``s)."""

    parent: nn.Module
    attr: str
    base: nn.Module
    outer: nn.Module

    def layers(self) -> list[nn.Module]:
        """The peft layers, outermost first."""
        out, m = [], self.outer
        while m is not self.base:
            out.append(m)
            m = m.base_layer
        return out

    def adapters(self) -> set[str]:
        return {a for layer in self.layers() for a in layer._all_available_adapter_names()}

    def show(self, wrapped: bool) -> None:
        """Put the peft layers (``wrapped``) or the original Linear into the model."""
        module = self.outer if wrapped else self.base
        if getattr(self.parent, self.attr) is not module:
            setattr(self.parent, self.attr, module)
        if wrapped:
            dev = self.base.weight.device
            if any(p.device != dev for p in self.outer.parameters()):
                self.outer.to(dev)


def find_chains(model: nn.Module) -> dict[str, Chain]:
    """The outermost peft layers in ``model`` by module path."""
    out: dict[str, Chain] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, BaseTunerLayer) and not any(name.startswith(p + ".") for p in out):
            parent_name, _, attr = name.rpartition(".")
            out[name] = Chain(model.get_submodule(parent_name), attr, mod.get_base_layer(), mod)
    return out


def inject(model: nn.Module, adapter: str, kind: str, modules: dict[str, dict[str, Tensor]]) -> None:
    """Add adapter ``adapter`` of ``kind`` to ``modules`` of ``model`` (whose existing chains must be shown) and
    set its tensors; peft's own scaling of it is 1 (alpha = r = 1), the user's scale goes through ``set_scale``."""
    common = {"target_modules": sorted(modules), "inference_mode": True}
    config = {"lora": lambda: peft.LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, **common),
              "loha": lambda: peft.LoHaConfig(r=1, alpha=1, **common),
              "lokr": lambda: peft.LoKrConfig(r=1, alpha=1, **common)}[kind]()
    grads = {id(p): p.requires_grad for p in model.parameters()}
    with quiet_torchao():
        peft.inject_adapter_in_model(config, model, adapter_name=adapter)
    if "peft_config" in model.__dict__:  # each adapter's config is ours to keep; the model stays as it was
        del model.peft_config
    for p in model.parameters():  # peft freezes all but its adapters: the model's own flags as they were
        p.requires_grad_(grads.get(id(p), False))
    for module, tensors in modules.items():
        layer = model.get_submodule(module)
        while not _holds(layer, adapter):
            layer = layer.base_layer
        dev = layer.get_base_layer().weight.device
        if kind == "lora":
            for role, t in tensors.items():
                getattr(layer, role)[adapter].weight = nn.Parameter(t.to(dev), requires_grad=False)
            continue
        for d in _LYCORIS_DICTS:  # peft made factors of its own shapes: the file's replace them
            if adapter in getattr(layer, d, {}):
                del getattr(layer, d)[adapter]
        for role, t in tensors.items():
            getattr(layer, role)[adapter] = nn.Parameter(t.to(dev), requires_grad=False)


def _holds(layer: nn.Module, adapter: str) -> bool:
    return adapter in layer._all_available_adapter_names()


def activate(chain: Chain, scales: dict[str, float]) -> bool:
    """Make exactly ``scales``' adapters active on ``chain`` with their scales; True when any of them is in it."""
    names = list(scales)
    for layer in chain.layers():
        layer.set_adapter(names, inference_mode=True)
        for a, s in scales.items():
            layer.set_scale(a, s)
    return bool(chain.adapters() & set(names))


def fuse(chain: Chain, names: list[str]) -> Tensor:
    """Merge the active adapters into the base weight (peft's ``merge``); returns the base weight as it was."""
    saved = chain.base.weight.detach().to("cpu", copy=True)
    for layer in reversed(chain.layers()):
        layer.merge(adapter_names=[n for n in names if _holds(layer, n)])
    return saved


def unfuse(chain: Chain, saved: Tensor) -> None:
    """Undo ``fuse``: peft's ``unmerge``, then the saved weight, so the base is bit for bit what it was."""
    for layer in chain.layers():
        layer.unmerge()
    with torch.no_grad():
        chain.base.weight.copy_(saved)
