"""LoRA / LyCORIS key layouts found in the wild, normalised to the modules of pixsigma's DiT and of T5.

A key is ``<prefix><module path>.<role>``. The roles: LoRA ``lora_A`` / ``lora_down`` and ``lora_B`` /
``lora_up`` (``.weight``), LoHa ``hada_w1_a`` ``hada_w1_b`` ``hada_w2_a`` ``hada_w2_b``, LoKr ``lokr_w1`` (or
``lokr_w1_a`` + ``lokr_w1_b``) and ``lokr_w2`` (or ``lokr_w2_a`` + ``lokr_w2_b``), and ``alpha``.

DiT prefixes (``DIT_PREFIXES``): diffusers/PEFT ``transformer.``, PEFT ``base_model.model.``, ComfyUI
``diffusion_model.`` and ``unet.base_model.model.``, OneTrainer's ``lora_transformer.`` and none; underscore
(kohya) prefixes ``lora_unet_`` and ``lora_transformer_``. The module path may be diffusers'
(``transformer_blocks.N.attn1.to_q``) or the original PixArt one (``blocks.N.attn.qkv``), and OneTrainer's OMI
names a fused projection's part by index (``blocks.N.attn.qkv.0`` = to_q, ``cross_attn.kv_linear.1`` = to_v).

Text-encoder prefixes (``TE_PREFIXES``): diffusers ``text_encoder.``, OneTrainer OMI ``t5.`` and ``lora_te.``,
ComfyUI ``text_encoders.t5xxl.transformer.``; underscores ``lora_te_`` (kohya, OneTrainer legacy) and
``lora_te1_`` (OneTrainer's kohya output), all over transformers' T5 module names
(``encoder.block.N.layer.0.SelfAttention.q``).

diffusers' split projections (``to_q``/``to_k``/``to_v`` of ``attn1``, ``to_k``/``to_v`` of ``attn2``) are row
blocks of pixsigma's fused ``qkv``/``kv_linear``: an adapter on one of them adds to its block of rows only,
which is exactly what it does to diffusers' separate Linear (``Target.part``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from pixsigma.weights import _FWD, _SPLITS, _pattern, _rename  # the one original <-> diffusers name table

DIT_PREFIXES = ("unet.base_model.model.", "base_model.model.", "diffusion_model.", "lora_transformer.",
                "transformer.", "")
DIT_UNDERSCORE = ("lora_transformer_", "lora_unet_")
TE_PREFIXES = ("text_encoders.t5xxl.transformer.", "text_encoder.", "lora_te.", "t5.")
TE_UNDERSCORE = ("lora_te1_", "lora_te_")
LORA_LAYOUTS = (
    "diffusers/PEFT 'transformer.transformer_blocks.N.attn1.to_q.lora_A.weight'",
    "a PEFT folder (adapter_model.safetensors 'base_model.model.<path>.lora_A.weight' + adapter_config.json)",
    "OneTrainer OMI 'transformer.blocks.N.attn.qkv.0.lora_down.weight' / '.alpha'",
    "OneTrainer legacy and kohya 'lora_transformer_transformer_blocks_N_attn1_to_q.lora_down.weight' "
    "('lora_unet_…')",
    "ComfyUI 'diffusion_model.blocks.N.attn.qkv.lora_down.weight'",
    "LyCORIS LoHa '….hada_w1_a' … and LoKr '….lokr_w1', '….lokr_w2_a' … in any of these",
)
LORA_ROLES = {"lora_A": "lora_A", "lora_down": "lora_A", "lora_B": "lora_B", "lora_up": "lora_B"}
LYCORIS_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b",
                 "lokr_w2", "lokr_w2_a", "lokr_w2_b")
_SUFFIX = re.compile(r"^(?P<path>.+?)\.(?:(?P<ab>lora_A|lora_B|lora_down|lora_up)(?:\.[A-Za-z0-9_-]+)?\.weight"
                     r"|(?P<ly>" + "|".join(LYCORIS_ROLES) + r")(?:\.[A-Za-z0-9_-]+)?|(?P<alpha>alpha))$")


@dataclass(frozen=True)
class Target:
    """Where an adapter module lands: Linear ``module`` (its own name), rows ``part`` of ``parts``."""

    module: str
    part: int = 0
    parts: int = 1


@dataclass(frozen=True)
class KeyHit:
    """A parsed key: ``side`` 'dit' or 'te', the layout's prefix, the module path (underscored when
    ``underscored``) and the role ('lora_A', 'lora_B', 'alpha' or a LyCORIS role)."""

    side: str
    prefix: str
    path: str
    role: str
    underscored: bool


def base_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """``model``'s own Linears by name, seen through any peft layers wrapped around them (never an adapter's)."""
    out: dict[str, nn.Linear] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".lora_" not in name:
            while name.endswith(".base_layer"):
                name = name.removesuffix(".base_layer")
            out[name] = mod
    return out


def module_table(model: nn.Module) -> dict[str, Target]:
    """Every name an adapter may give a Linear of the DiT: its own (original) name, diffusers' name(s) and
    OneTrainer's OMI part names (``blocks.N.attn.qkv.0``)."""
    table: dict[str, Target] = {}
    for name in base_linears(model):
        table[name] = Target(name)
        for src, names in _SPLITS:
            m = _pattern(src).match(name)
            if m:
                for j, split in enumerate(names):
                    table[split.format(i=m.group(1))] = table[f"{name}.{j}"] = Target(name, j, len(names))
                break
        else:
            try:
                table[_rename(name, _FWD, "")] = Target(name)
            except ValueError:
                pass  # a Linear with no diffusers counterpart keeps its own name only
    return table


def linear_table(model: nn.Module) -> dict[str, Target]:
    """A model's Linears by their own names (the text encoder: transformers' names)."""
    return {n: Target(n) for n in base_linears(model)}


def split_key(key: str) -> KeyHit | None:
    """``key`` -> its ``KeyHit``, or None when it has no adapter role (then it is counted as unknown)."""
    m = _SUFFIX.match(key)
    if m is None:
        return None
    role = "alpha" if m["alpha"] else m["ly"] or LORA_ROLES[m["ab"]]
    path = m["path"]
    for side, under, dotted in (("te", TE_UNDERSCORE, TE_PREFIXES), ("dit", DIT_UNDERSCORE, DIT_PREFIXES)):
        for prefix in under:
            if path.startswith(prefix):
                return KeyHit(side, prefix, path[len(prefix):], role, True)
        for prefix in dotted:
            if path.startswith(prefix):
                return KeyHit(side, prefix, path[len(prefix):], role, False)
    return None  # unreachable: the DiT's empty prefix always matches


def resolve_path(hit: KeyHit, table: dict[str, Target], underscored: dict[str, str]) -> Target | None:
    """The Target a parsed key names in ``table`` (``underscored``: ``underscore_table(table)``), or None."""
    name = underscored.get(hit.path) if hit.underscored else hit.path
    return table.get(name) if name is not None else None


def underscore_table(table: dict[str, Target]) -> dict[str, str]:
    """Kohya's underscore spelling of every name in ``table`` -> the dotted name."""
    return {name.replace(".", "_"): name for name in table}
