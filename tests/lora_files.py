"""Adapter files as the tools in the wild write them, made from a peft state dict of diffusers' PixArt transformer
(or of T5). The key names are written out here from each tool's own definition, independently of
``pixsigma.lora_keys``:

- OneTrainer (``modules/util/convert/lora/convert_pixart_lora.py`` and ``convert_t5.py``): OMI keys
  ``transformer.<original path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` where a fused projection's
  part is an index (``blocks.N.attn.qkv.0`` = to_q), T5 under ``t5.``; legacy keys ``lora_transformer_`` /
  ``lora_te_`` + the diffusers path with underscores; its newer kohya output names T5 ``lora_te1_``;
- ComfyUI: ``diffusion_model.<original path>`` (fused qkv / kv_linear adapters), and kohya-style ``lora_unet_``
  + the original path with underscores;
- diffusers / PEFT: ``transformer.<diffusers path>.lora_A.weight``, ``text_encoder.…``; a PEFT folder
  ``base_model.model.…`` + ``adapter_config.json``;
- LyCORIS LoHa / LoKr: ``….hada_w1_a`` … / ``….lokr_w1`` … with ``.alpha``.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

# diffusers block module -> (original module, part, parts): OneTrainer's convert_pixart_lora.py table
ORIGINAL = {"attn1.to_q": ("attn.qkv", 0, 3), "attn1.to_k": ("attn.qkv", 1, 3), "attn1.to_v": ("attn.qkv", 2, 3),
            "attn1.to_out.0": ("attn.proj", 0, 1), "attn2.to_q": ("cross_attn.q_linear", 0, 1),
            "attn2.to_k": ("cross_attn.kv_linear", 0, 2), "attn2.to_v": ("cross_attn.kv_linear", 1, 2),
            "attn2.to_out.0": ("cross_attn.proj", 0, 1), "ff.net.0.proj": ("mlp.fc1", 0, 1),
            "ff.net.2": ("mlp.fc2", 0, 1)}
DIT_LAYOUTS = ("diffusers", "peft", "onetrainer_omi", "onetrainer_legacy", "onetrainer_diffusers", "comfyui",
               "kohya_unet")
TE_PREFIX = {"onetrainer_omi": "t5.", "onetrainer_legacy": "lora_te_", "onetrainer_kohya": "lora_te1_",
             "diffusers": "text_encoder.", "comfyui": "text_encoders.t5xxl.transformer."}


def pairs(sd: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} of a peft LoRA state dict."""
    mods = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    return {m: (sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"]) for m in mods}


def original_name(m: str) -> tuple[str, int, int]:
    """diffusers module path -> (original path, part, parts)."""
    if m == "proj_out":
        return "final_layer.linear", 0, 1
    _, i, sub = m.split(".", 2)
    orig, part, parts = ORIGINAL[sub]
    return f"blocks.{i}.{orig}", part, parts


def _lora(out: dict, key: str, a, b, alpha, down_up: bool) -> None:
    names = ("lora_down", "lora_up") if down_up else ("lora_A", "lora_B")
    out[f"{key}.{names[0]}.weight"], out[f"{key}.{names[1]}.weight"] = a, b
    if alpha is not None:
        out[f"{key}.alpha"] = torch.tensor(float(alpha))


def dit_tensors(layout: str, sd: dict, alpha: float) -> dict[str, torch.Tensor]:
    """The LoRA ``sd`` (peft keys of diffusers' transformer, rank r, ``alpha``) in ``layout``'s keys."""
    out: dict[str, torch.Tensor] = {}
    lora = pairs(sd)
    if layout in ("diffusers", "peft"):
        prefix = "transformer." if layout == "diffusers" else "base_model.model."
        for m, (a, b) in lora.items():
            _lora(out, prefix + m, a, b, None, False)
    elif layout == "onetrainer_omi":
        for m, (a, b) in lora.items():
            orig, part, parts = original_name(m)
            _lora(out, f"transformer.{orig}" + (f".{part}" if parts > 1 else ""), a, b, alpha, True)
    elif layout == "onetrainer_legacy":
        for m, (a, b) in lora.items():
            _lora(out, "lora_transformer_" + m.replace(".", "_"), a, b, alpha, True)
    elif layout == "onetrainer_diffusers":
        for m, (a, b) in lora.items():
            _lora(out, f"lora_transformer.{m}", a, b, alpha, True)
    else:  # ComfyUI / kohya on the original fused Linears: q/k/v (k/v) as one LoRA of rank 3r (2r)
        fused: dict[str, list] = {}
        for m, (a, b) in lora.items():
            orig, part, _ = original_name(m)
            fused.setdefault(orig, []).append((part, a, b))
        for orig, pieces in fused.items():
            pieces.sort(key=lambda p: p[0])
            down, up = torch.cat([p[1] for p in pieces]), torch.block_diag(*[p[2] for p in pieces])
            key = f"diffusion_model.{orig}" if layout == "comfyui" else "lora_unet_" + orig.replace(".", "_")
            _lora(out, key, down, up, alpha * len(pieces), True)  # alpha / rank unchanged
    return out


def te_tensors(layout: str, sd: dict) -> dict[str, torch.Tensor]:
    """A T5 LoRA ``sd`` (peft keys of T5EncoderModel, alpha = r) in ``layout``'s text-encoder keys."""
    out: dict[str, torch.Tensor] = {}
    prefix = TE_PREFIX[layout]
    for m, (a, b) in pairs(sd).items():
        key = prefix + (m.replace(".", "_") if prefix.endswith("_") else m)
        _lora(out, key, a, b, None, layout != "diffusers")
    return out


def write(tensors: dict, folder, layout: str, config: dict | None = None) -> str:
    """Save ``tensors`` as ``layout`` writes them (a PEFT folder for 'peft'); returns the path to pass."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "peft":
        save_file(tensors, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps(config or {}))
        return str(folder)
    meta = {"format": "pt"}
    if layout == "diffusers" and config:
        meta["lora_adapter_metadata"] = json.dumps(config)
    save_file(tensors, folder / f"{layout}.safetensors", metadata=meta)
    return str(folder / f"{layout}.safetensors")
