"""ControlNet weights in and out.

Layouts accepted by :func:`load_controlnet`:
- a pixsigma ControlNet folder (``controlnet.json`` holding ``asdict(ControlNetConfig)`` + ``controlnet.safetensors``
  in the official key names);
- an official ``ControlPixArtHalf`` checkpoint (``.pth``/``.safetensors``; ``controlnet.{i}.copied_block.*`` in the
  original PixArt block names, ``controlnet.0.before_proj``, ``controlnet.{i}.after_proj``; with or without the
  frozen ``base_model.*`` it was trained on, which is then checked against the base and otherwise ignored);
- diffusers' research adapter folder (``PixArtControlNetAdapterModel``: ``config.json`` +
  ``diffusion_pytorch_model.safetensors``, keys ``controlnet_blocks.{i}.transformer_block.*`` in diffusers' block
  names, ``controlnet_blocks.{i}.before_proj`` / ``after_proj``);
- a pipeline folder that ships one (its ``controlnet/`` subfolder).
A ControlNet made for another base width or depth is refused with ``ControlNetMismatch``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pixsigma.io import atomic_write, atomic_write_json
from pixsigma.model.controlnet import ControlNet, ControlNetConfig, ControlNetMismatch
from pixsigma.model.dit import PixArtDiT
from pixsigma.weights import (
    DIFFUSERS_WEIGHTS,
    MODEL_INDEX,
    CheckpointError,
    from_diffusers_state_dict,
    load_state_dict_file,
    load_weights,
)

Tensor = torch.Tensor
CONTROLNET_CONFIG = "controlnet.json"
CONTROLNET_WEIGHTS = "controlnet.safetensors"
CONTROLNET_SUBFOLDER = "controlnet"  # where a pipeline folder ships its ControlNet
CONTROLNET_LAYOUTS = (f"a pixsigma ControlNet folder ({CONTROLNET_CONFIG} + {CONTROLNET_WEIGHTS})",
                      "an official ControlPixArtHalf checkpoint (.pth/.safetensors with controlnet.N.* keys)",
                      "a diffusers research PixArtControlNetAdapterModel folder (config.json + "
                      "diffusion_pytorch_model.safetensors)",
                      f"a pipeline folder with a {CONTROLNET_SUBFOLDER}/ subfolder")
_KV = re.compile(r"^controlnet\.\d+\.copied_block\.attn\.(sr|norm)\.")  # present only where the base compresses
_COPY = re.compile(r"^controlnet\.(\d+)\.")
_ADAPTER = re.compile(r"^controlnet_blocks\.(\d+)\.(transformer_block|before_proj|after_proj)(\..+)$")


def from_adapter_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers' ``PixArtControlNetAdapterModel`` keys -> official ``ControlPixArtHalf`` keys (q/k/v fused)."""
    blocks: dict[str, Tensor] = {}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = _ADAPTER.match(key)
        if m is None:
            raise CheckpointError(f"{key}: not a PixArtControlNetAdapterModel key")
        i, part, rest = m.groups()
        if part == "transformer_block":
            blocks[f"transformer_blocks.{i}{rest}"] = value
        else:
            out[f"controlnet.{i}.{part}{rest}"] = value
    for key, value in from_diffusers_state_dict(blocks).items():  # blocks.{i}.* in the original names
        i, rest = key.removeprefix("blocks.").split(".", 1)
        out[f"controlnet.{i}.copied_block.{rest}"] = value
    return out


def _split_official(sd: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], int | None]:
    """(the ``controlnet.*`` tensors, the depth of the ``base_model`` it carries or None)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    net = {k: v for k, v in sd.items() if k.startswith("controlnet.")}
    if not net:
        raise CheckpointError(f"{source}: no controlnet.N.* keys; accepted: {'; '.join(CONTROLNET_LAYOUTS)}")
    depths = [int(k.split(".")[2]) for k in sd if re.match(r"^base_model\.blocks\.\d+\.", k)]
    return net, (max(depths) + 1 if depths else None)


def infer_controlnet_config(sd: dict[str, Tensor], base: PixArtDiT, base_depth: int | None = None,
                            source: str = "ControlNet") -> ControlNetConfig:
    """Copies and width from the tensors; the base depth from its ``base_model`` where the file has one."""
    try:
        width = sd["controlnet.0.after_proj.weight"].shape[0]
    except KeyError:
        raise CheckpointError(f"{source}: missing key 'controlnet.0.after_proj.weight'") from None
    copies = 1 + max(int(_COPY.match(k).group(1)) for k in sd)
    if width != base.config.hidden_size:
        raise ControlNetMismatch(f"{source} was made for a base of width {width}; this model has width "
                                 f"{base.config.hidden_size}")
    depth = base.config.depth if base_depth is None else base_depth
    if copies > depth - 1:
        raise ControlNetMismatch(f"{source} copies {copies} blocks; a base of depth {depth} takes at most "
                                 f"{depth - 1}")
    return ControlNetConfig(width, depth, copies)


def read_json(path: Path) -> dict[str, Any]:
    """A ControlNet's JSON file as a dict; broken JSON (or not an object) is a CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); rewrite it or pass another --controlnet") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_controlnet(path: str | os.PathLike, base: PixArtDiT) -> tuple[ControlNetConfig, dict[str, Tensor]]:
    """(config, official-layout state dict) of any accepted layout."""
    p = Path(path)
    if p.is_dir() and (p / MODEL_INDEX).is_file():
        if not (p / CONTROLNET_SUBFOLDER).is_dir():
            raise FileNotFoundError(f"pipeline folder {p} ships no ControlNet ({CONTROLNET_SUBFOLDER}/); pass "
                                    f"--controlnet PATH: {'; '.join(CONTROLNET_LAYOUTS)}")
        p = p / CONTROLNET_SUBFOLDER
    if p.is_dir() and (p / CONTROLNET_CONFIG).is_file():
        meta = read_json(p / CONTROLNET_CONFIG)
        if not isinstance(meta.get("controlnet"), dict):
            raise CheckpointError(f"{p / CONTROLNET_CONFIG} has no \"controlnet\" object (the ControlNetConfig)")
        return ControlNetConfig.from_dict(meta["controlnet"]), load_state_dict_file(p / CONTROLNET_WEIGHTS)
    if p.is_dir() and (p / "config.json").is_file():
        cfg = read_json(p / "config.json")
        if cfg.get("_class_name") not in (None, "PixArtControlNetAdapterModel"):
            raise CheckpointError(f"{p}/config.json is a {cfg.get('_class_name')}, not a "
                                  "PixArtControlNetAdapterModel")
        sd = from_adapter_state_dict(load_state_dict_file(p / DIFFUSERS_WEIGHTS))
        return infer_controlnet_config(sd, base, source=str(p)), sd
    if p.is_file():
        sd, depth = _split_official(load_state_dict_file(p), str(p))
        return infer_controlnet_config(sd, base, depth, str(p)), sd
    raise FileNotFoundError(f"ControlNet {path} not found or not a known layout; accepted: "
                            f"{'; '.join(CONTROLNET_LAYOUTS)}")


def trained_control_type(path: str | os.PathLike) -> str | None:
    """The control type a pixsigma ControlNet folder (or a pipeline folder's) says it was trained on, else None."""
    p = Path(path)
    p = p / CONTROLNET_SUBFOLDER if (p / MODEL_INDEX).is_file() else p
    if not (p / CONTROLNET_CONFIG).is_file():
        return None
    kind = read_json(p / CONTROLNET_CONFIG).get("control_type")
    return kind if isinstance(kind, str) else None


def load_controlnet(path: str | os.PathLike, base: PixArtDiT) -> ControlNet:
    """A ControlNet for ``base`` from any accepted layout, on the base's device and dtype, in eval mode.
    Copies compress KV as the base does; KV weights the file lacks start from the average init."""
    config, sd = read_controlnet(path, base)
    config.check_base(base.config, f"ControlNet {path}")
    net = ControlNet(config, base.config)
    load_weights(net, sd, str(path), allow_missing=_KV, allow_unexpected=_KV)
    net.control_type = trained_control_type(path)
    ref = base.final_layer.linear.weight
    return net.to(device=ref.device, dtype=ref.dtype).eval().requires_grad_(False)


def find_controlnet(model_folder: str | os.PathLike) -> Path | None:
    """The ControlNet a pipeline folder ships (``controlnet/``), if any."""
    sub = Path(model_folder) / CONTROLNET_SUBFOLDER
    return sub if (sub / CONTROLNET_CONFIG).is_file() or (sub / "config.json").is_file() else None


def _tensors(net: ControlNet, dtype: torch.dtype | None) -> dict[str, Tensor]:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in net.state_dict().items()}


def save_controlnet(net: ControlNet, folder: str | os.PathLike, dtype: torch.dtype | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """A pixsigma ControlNet folder, each file written atomically; ``extra`` goes into the config json (with the
    net's ``control_type``, where it has one)."""
    folder = Path(folder)
    extra = {**({"control_type": net.control_type} if net.control_type else {}), **(extra or {})}
    atomic_write(folder / CONTROLNET_WEIGHTS, lambda t: save_file(_tensors(net, dtype), t))
    atomic_write_json({"controlnet": net.config.to_dict(), **(extra or {})}, folder / CONTROLNET_CONFIG, indent=2)
    return folder


def save_official(net: ControlNet, path: str | os.PathLike, base: PixArtDiT | None = None) -> Path:
    """One official-layout ``ControlPixArtHalf`` file (with ``base_model.*`` when ``base`` is given)."""
    sd = _tensors(net, None)
    if base is not None:
        sd.update({f"base_model.{k}": v.detach().cpu().contiguous() for k, v in base.state_dict().items()})
    path = Path(path)
    if path.suffix == ".safetensors":
        atomic_write(path, lambda t: save_file(sd, t))
    else:
        atomic_write(path, lambda t: torch.save({"state_dict": sd}, t))
    return path


__all__ = ["CONTROLNET_CONFIG", "CONTROLNET_LAYOUTS", "CONTROLNET_SUBFOLDER", "CONTROLNET_WEIGHTS",
           "ControlNetMismatch", "find_controlnet", "from_adapter_state_dict", "infer_controlnet_config",
           "load_controlnet", "read_controlnet", "save_controlnet", "save_official", "trained_control_type"]
