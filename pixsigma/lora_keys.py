"""LoRA key layouts found in the wild, normalised to pixsigma's DiT modules.

A LoRA tensor key is ``<prefix><module path><suffix>``. Accepted (``LORA_LAYOUTS``):

- PEFT / diffusers: ``transformer.<diffusers module path>.lora_A.weight`` / ``.lora_B.weight`` (SimpleTuner,
  diffusers-style savers, and ``train/lora.py``);
- PEFT ``save_pretrained``: ``base_model.model.<module path>.lora_A.weight`` (+ ``adapter_config.json``);
- ComfyUI: ``unet.base_model.model.<module path>…``;
- OneTrainer original names: ``transformer.blocks.N.attn.qkv.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``;
- kohya underscores: ``lora_transformer_transformer_blocks_N_attn1_to_q.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha`` (``lora_unet_`` too).

The module path may be diffusers' (``transformer_blocks.N.attn1.to_q``) or the original PixArt one
(``blocks.N.attn.qkv``) in every layout. diffusers' split projections (``to_q``/``to_k``/``to_v`` of ``attn1``,
``to_k``/``to_v`` of ``attn2``) are row blocks of pixsigma's fused ``qkv``/``kv_linear``: a LoRA on one of them
adds to its block of rows only, which is exactly what it does to diffusers' separate Linear.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from pixsigma.weights import _FWD, _SPLITS, _pattern, _rename  # the one original <-> diffusers name table

LORA_LAYOUTS = (
    "PEFT/diffusers 'transformer.<diffusers module path>.lora_A.weight / .lora_B.weight'",
    "a PEFT save_pretrained folder (adapter_model.safetensors with 'base_model.model.<module path>.lora_A.weight' "
    "+ adapter_config.json)",
    "ComfyUI 'unet.base_model.model.<module path>.lora_A.weight'",
    "OneTrainer original names 'transformer.blocks.N.attn.qkv.lora_down.weight / .lora_up.weight / .alpha'",
    "kohya underscores 'lora_transformer_transformer_blocks_N_attn1_to_q.lora_down.weight / .lora_up.weight / "
    ".alpha'",
)
# (prefix, layout name); longer prefixes first so 'unet.base_model.model.' is not read as 'base_model.model.'
_DOTTED = (("unet.base_model.model.", "comfyui"), ("base_model.model.", "peft"), ("transformer.", "diffusers"),
           ("", "bare"))
_KOHYA = ("lora_transformer_", "lora_unet_")
_SUFFIX = re.compile(r"^(?P<path>.+?)\.(?:(?P<ab>lora_A|lora_B|lora_down|lora_up)(?:\.[A-Za-z0-9_-]+)?\.weight"
                     r"|(?P<alpha>alpha))$")
_ROLE = {"lora_A": "A", "lora_down": "A", "lora_B": "B", "lora_up": "B"}


@dataclass(frozen=True)
class Target:
    """Where a LoRA module lands: pixsigma Linear ``module`` (original name), rows ``part`` of ``parts``."""

    module: str
    part: int = 0
    parts: int = 1


def module_table(model: nn.Module) -> dict[str, Target]:
    """Every name a LoRA may give a Linear of ``model``: its own (original) name and diffusers' name(s)."""
    table: dict[str, Target] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        table[name] = Target(name)
        for src, names in _SPLITS:
            m = _pattern(src).match(name)
            if m:
                for j, split in enumerate(names):
                    table[split.format(i=m.group(1))] = Target(name, j, len(names))
                break
        else:
            try:
                table[_rename(name, _FWD, "")] = Target(name)
            except ValueError:
                pass  # a Linear with no diffusers counterpart keeps its own name only
    return table


def split_key(key: str) -> tuple[str, str, str] | None:
    """``key`` -> (layout, module path, role 'A' | 'B' | 'alpha'), or None when it is no LoRA key.
    Kohya paths come back with underscores (``underscore_path`` matches them)."""
    for prefix in _KOHYA:
        if key.startswith(prefix):
            m = _SUFFIX.match(key[len(prefix):])
            return None if m is None else ("kohya", m["path"], "alpha" if m["alpha"] else _ROLE[m["ab"]])
    m = _SUFFIX.match(key)
    if m is None:
        return None
    role = "alpha" if m["alpha"] else _ROLE[m["ab"]]
    for prefix, layout in _DOTTED:
        if m["path"].startswith(prefix):
            path = m["path"][len(prefix):]
            if layout == "diffusers" and path.startswith("blocks."):
                layout = "onetrainer"
            return layout, path, role
    return None  # unreachable: the empty prefix always matches


def underscore_table(table: dict[str, Target]) -> dict[str, str]:
    """Kohya's underscore spelling of every name in ``table`` -> the dotted name."""
    return {name.replace(".", "_"): name for name in table}
