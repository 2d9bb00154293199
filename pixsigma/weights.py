"""Weights in and out: original PixArt checkpoints, diffusers folders, and pixsigma folders.

Layouts accepted by :func:`load_dit`:
- an original checkpoint file (``.pth``/``.pt``/``.bin``/``.safetensors``; ``{'state_dict': …}`` or bare;
  keys ``x_embedder``, ``t_block``, ``blocks.N.attn.qkv`` …); the architecture comes from a reference folder's
  config where the tensor shapes agree with it (``like``: the pipeline it runs in), else from the shapes (head
  dim 72); KV compression always from ``blocks.N.attn.sr.*``;
- a diffusers transformer folder (``config.json`` + ``diffusion_pytorch_model*.safetensors|.bin``);
- a pixsigma folder (``pixsigma.json`` holding ``asdict(DiTConfig)`` + ``model.safetensors`` in original layout);
- a pipeline folder (``model_index.json``): its ``transformer/``.
Checkpoints are never unpickled beyond tensors (``weights_only=True``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import diffusers
import torch
from safetensors.torch import load_file, save_file

from pixsigma.config import DiTConfig, KVCompress
from pixsigma.io import atomic_write, atomic_write_json
from pixsigma.model.dit import PixArtDiT

Tensor = torch.Tensor
PIXSIGMA_CONFIG = "pixsigma.json"
MODEL_INDEX = "model_index.json"  # marks a diffusers pipeline folder
PIXSIGMA_WEIGHTS = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
HEAD_DIM = 72  # every released PixArt uses 72-dim heads; used only when no config says otherwise
LAYOUTS = ("an original PixArt checkpoint (.pth/.pt/.bin/.safetensors)",
           "a diffusers transformer folder (config.json + diffusion_pytorch_model.safetensors)",
           f"a pixsigma folder ({PIXSIGMA_CONFIG} + {PIXSIGMA_WEIGHTS})",
           "a diffusers pipeline folder (model_index.json with transformer/)")
# Keys the original checkpoints carry that are not model weights here.
# The KV compression's own parameters (its conv and LayerNorm): absent from a model without it.
KV_KEYS = re.compile(r"^blocks\.\d+\.attn\.(sr|norm)\.")
_IGNORED = re.compile(r"^(pos_embed|y_embedder\.y_embedding)$")

# original-name pattern -> diffusers-name pattern; {i} is a block index.
_RENAMES = [
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
    ("csize_embedder.mlp.0", "adaln_single.emb.resolution_embedder.linear_1"),
    ("csize_embedder.mlp.2", "adaln_single.emb.resolution_embedder.linear_2"),
    ("ar_embedder.mlp.0", "adaln_single.emb.aspect_ratio_embedder.linear_1"),
    ("ar_embedder.mlp.2", "adaln_single.emb.aspect_ratio_embedder.linear_2"),
    ("t_block.1", "adaln_single.linear"),
    ("y_embedder.y_proj.fc1", "caption_projection.linear_1"),
    ("y_embedder.y_proj.fc2", "caption_projection.linear_2"),
    ("blocks.{i}.scale_shift_table", "transformer_blocks.{i}.scale_shift_table"),
    ("blocks.{i}.attn.proj", "transformer_blocks.{i}.attn1.to_out.0"),
    ("blocks.{i}.cross_attn.q_linear", "transformer_blocks.{i}.attn2.to_q"),
    ("blocks.{i}.cross_attn.proj", "transformer_blocks.{i}.attn2.to_out.0"),
    ("blocks.{i}.mlp.fc1", "transformer_blocks.{i}.ff.net.0.proj"),
    ("blocks.{i}.mlp.fc2", "transformer_blocks.{i}.ff.net.2"),
    ("final_layer.scale_shift_table", "scale_shift_table"),
    ("final_layer.linear", "proj_out"),
]
# Fused original projections split into diffusers' separate ones.
_SPLITS = [
    ("blocks.{i}.attn.qkv", ("transformer_blocks.{i}.attn1.to_q", "transformer_blocks.{i}.attn1.to_k",
                             "transformer_blocks.{i}.attn1.to_v")),
    ("blocks.{i}.cross_attn.kv_linear", ("transformer_blocks.{i}.attn2.to_k", "transformer_blocks.{i}.attn2.to_v")),
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model; the message names file and key."""


def _pattern(p: str) -> re.Pattern:
    return re.compile("^" + re.escape(p).replace(r"\{i\}", r"(\d+)") + r"(\.weight|\.bias)?$")


_FWD = [(_pattern(o), d) for o, d in _RENAMES]
_BWD = [(_pattern(d), o) for o, d in _RENAMES]


def _rename(key: str, table: list[tuple[re.Pattern, str]], why: str) -> str:
    """``key`` renamed by the first matching (pattern, target) of ``table``; {i} carries the block index."""
    for pat, dst in table:
        m = pat.match(key)
        if m:
            idx = m.group(1) if "{i}" in dst else None
            return dst.format(i=idx) + (m.groups()[-1] or "")
    raise CheckpointError(f"{key}: {why}")


def to_diffusers_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Original PixArt keys -> diffusers ``PixArtTransformer2DModel`` keys (KV-compressed layers refused)."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if _IGNORED.match(key):
            continue
        if KV_KEYS.match(key):
            raise CheckpointError(f"{key}: a KV-compressed model cannot run in diffusers (PixArtTransformer2DModel "
                                  "has no KV compression); keep it in the original layout and run it with pixsigma")
        for src, names in _SPLITS:
            m = _pattern(src).match(key)
            if m:
                for name, part in zip(names, value.chunk(len(names), dim=0)):
                    out[name.format(i=m.group(1)) + (m.group(2) or "")] = part.clone()
                break
        else:
            out[_rename(key, _FWD, "no diffusers equivalent for this original key")] = value
    return out


def from_diffusers_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers ``PixArtTransformer2DModel`` keys -> original PixArt keys (fusing q/k/v back)."""
    out: dict[str, Tensor] = {}
    pending: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        for src, names in _SPLITS:
            hit = None
            for j, name in enumerate(names):
                m = _pattern(name).match(key)
                if m:
                    hit = (j, m)
                    break
            if hit:
                j, m = hit
                fused = src.format(i=m.group(1)) + (m.group(2) or "")
                pending.setdefault(fused, {})[j] = value
                if len(pending[fused]) == len(names):
                    parts = pending.pop(fused)
                    out[fused] = torch.cat([parts[k] for k in range(len(names))], dim=0)
                break
        else:
            out[_rename(key, _BWD, "not a PixArtTransformer2DModel key")] = value
    if pending:
        raise CheckpointError(f"incomplete projections in diffusers weights: {sorted(pending)[0]} lacks q, k or v")
    return out


def diffusers_config(config: DiTConfig) -> dict[str, Any]:
    """The diffusers ``PixArtTransformer2DModel`` config of a DiTConfig."""
    if config.kv_compress.active:
        raise CheckpointError("a KV-compressed model cannot run in diffusers (PixArtTransformer2DModel has no KV "
                              "compression); keep the pixsigma/original layout")
    if config.mlp_ratio != 4.0:
        raise CheckpointError(f"diffusers' PixArt fixes mlp_ratio at 4, this model has {config.mlp_ratio}")
    return {
        "_class_name": "PixArtTransformer2DModel", "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim, "in_channels": config.in_channels,
        "out_channels": config.out_channels, "num_layers": config.depth, "dropout": 0.0, "norm_num_groups": 32,
        "cross_attention_dim": config.hidden_size, "attention_bias": True, "sample_size": config.sample_size,
        "patch_size": config.patch_size, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
        "upcast_attention": False, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
        "norm_eps": 1e-6, "interpolation_scale": config.pe_interpolation,
        "use_additional_conditions": config.micro_condition, "caption_channels": config.caption_channels,
        "attention_type": "default",
    }


def config_from_diffusers(cfg: dict[str, Any]) -> DiTConfig:
    """DiTConfig of a diffusers transformer ``config.json`` (same defaults diffusers applies)."""
    sample = int(cfg.get("sample_size", 128))
    interp = cfg.get("interpolation_scale")
    micro = cfg.get("use_additional_conditions")
    heads, head_dim = int(cfg.get("num_attention_heads", 16)), int(cfg.get("attention_head_dim", 72))
    return DiTConfig(depth=int(cfg.get("num_layers", 28)), hidden_size=heads * head_dim, num_heads=heads,
                     patch_size=int(cfg.get("patch_size", 2)), in_channels=int(cfg.get("in_channels", 4)),
                     out_channels=int(cfg.get("out_channels") or cfg.get("in_channels", 4)),
                     caption_channels=int(cfg.get("caption_channels") or 4096), sample_size=sample,
                     pe_interpolation=float(interp) if interp is not None else float(max(sample // 64, 1)),
                     micro_condition=bool(micro) if micro is not None else sample == 128)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a checkpoint file, unwrapping ``{'state_dict': …}``; never unpickles beyond tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; accepted: {'; '.join(LAYOUTS)}")
    try:
        if path.suffix == ".safetensors":
            sd: Any = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or pickles more than tensors
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:300]}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_diffusers_weights(folder: Path) -> dict[str, Tensor]:
    index = folder / (DIFFUSERS_WEIGHTS + ".index.json")
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, Tensor] = {}
        for shard in shards:
            sd.update(load_state_dict_file(folder / shard))
        return sd
    for name in (DIFFUSERS_WEIGHTS, "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return load_state_dict_file(folder / name)
    raise FileNotFoundError(f"{folder} has a config.json but no {DIFFUSERS_WEIGHTS} (or .bin / sharded index)")


_RES_HINTS = [("4K", 4096), ("4096", 4096), ("2K", 2048), ("2048", 2048), ("1024", 1024), ("512", 512),
              ("256", 256)]


def infer_config(sd: dict[str, Tensor], base_resolution: int | None = None, name: str = "",
                 like: DiTConfig | None = None) -> DiTConfig:
    """Architecture from tensor shapes. Where they agree with ``like`` (the config of the pipeline the weights
    run in), heads, head dim, base size and PE interpolation are ``like``'s: shapes cannot tell them. The base
    resolution is then the argument, else the file name's hint (``-2K-`` -> 2048; PE interpolation scales with
    it), else ``like``'s, else 1024."""
    try:
        proj = sd["x_embedder.proj.weight"]  # (D, C_in, p, p)
        hidden, in_ch, patch = proj.shape[0], proj.shape[1], proj.shape[2]
        out_ch = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
        cap = sd["y_embedder.y_proj.fc1.weight"].shape[1]
        mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{name or 'checkpoint'}: missing key {e.args[0]}; not an original-layout PixArt "
                              "checkpoint") from None
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    kv_layers = sorted(int(k.split(".")[1]) for k in sd if re.match(r"^blocks\.\d+\.attn\.sr\.weight$", k))
    ratio = sd[f"blocks.{kv_layers[0]}.attn.sr.weight"].shape[-1] if kv_layers else 1
    if base_resolution is None:
        base_resolution = next((r for hint, r in _RES_HINTS if hint in Path(name).name), None)
    heads = hidden // HEAD_DIM if hidden % HEAD_DIM == 0 else max(1, hidden // 64)
    shaped = DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, in_channels=in_ch,
                       out_channels=out_ch, caption_channels=cap, mlp_ratio=mlp_hidden / hidden,
                       micro_condition="csize_embedder.mlp.0.weight" in sd,
                       kv_compress=KVCompress(ratio=ratio, layers=tuple(kv_layers)))
    if like is not None and _same_shapes(shaped, like):
        shaped = replace(shaped, num_heads=like.num_heads, sample_size=like.sample_size,
                         pe_interpolation=like.pe_interpolation)
    else:
        shaped = shaped.at_resolution(1024)  # the released models' base where nothing says otherwise
    return shaped.at_resolution(base_resolution) if base_resolution else shaped


_SHAPE_FIELDS = ("depth", "hidden_size", "patch_size", "in_channels", "out_channels", "caption_channels",
                 "mlp_ratio", "micro_condition")


def _same_shapes(a: DiTConfig, b: DiTConfig) -> bool:
    """Whether two configs give every weight the same shape (heads and resolution do not shape weights)."""
    return all(getattr(a, f) == getattr(b, f) for f in _SHAPE_FIELDS)


def folder_config(path: str | os.PathLike) -> DiTConfig | None:
    """The DiT config a pipeline, diffusers transformer or pixsigma folder states, without loading weights;
    None where ``path`` is not such a folder."""
    p = Path(path)
    if p.is_dir() and (p / MODEL_INDEX).is_file():
        p = p / "transformer"
    if p.is_dir() and (p / PIXSIGMA_CONFIG).is_file():
        return DiTConfig.from_dict(json.loads((p / PIXSIGMA_CONFIG).read_text())["dit"])
    if p.is_dir() and (p / "config.json").is_file():
        return config_from_diffusers(json.loads((p / "config.json").read_text()))
    return None


def read_checkpoint(path: str | os.PathLike, base_resolution: int | None = None,
                    like: str | os.PathLike | None = None) -> tuple[DiTConfig, dict]:
    """(config, original-layout state dict) of any accepted layout. ``like``: a folder whose DiT config a single
    checkpoint file takes where its shapes agree (``infer_config``); folders state their own."""
    p = Path(path)
    if p.is_dir() and (p / MODEL_INDEX).is_file():
        p = p / "transformer"
    if p.is_dir() and (p / PIXSIGMA_CONFIG).is_file():
        return folder_config(p), load_state_dict_file(p / PIXSIGMA_WEIGHTS)
    if p.is_dir() and (p / "config.json").is_file():
        return folder_config(p), from_diffusers_state_dict(_load_diffusers_weights(p))
    if p.is_file():
        sd = load_state_dict_file(p)
        if any(k.startswith("transformer_blocks.") for k in sd):
            sd = from_diffusers_state_dict(sd)
        return infer_config(sd, base_resolution, str(p), folder_config(like) if like else None), sd
    raise FileNotFoundError(f"model {path} not found or not a known layout; accepted: {'; '.join(LAYOUTS)}")


def load_report(model: torch.nn.Module, sd: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """(missing, unexpected) key names of ``sd`` against ``model``, ignoring known non-weight extras."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not _IGNORED.match(k)]
    return missing, unexpected


def load_weights(model: PixArtDiT, sd: dict[str, Tensor], source: str = "checkpoint",
                 allow_missing: re.Pattern | None = None, allow_unexpected: re.Pattern | None = None) -> None:
    """Strict load naming the file and the first offending key; patterns allow known differences."""
    missing, unexpected = load_report(model, sd)
    missing = [k for k in missing if not (allow_missing and allow_missing.match(k))]
    unexpected = [k for k in unexpected if not (allow_unexpected and allow_unexpected.match(k))]
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointError(f"{source}: key {k!r} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(own[k].shape)}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def load_dit(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             kv: KVCompress | None = None, base_resolution: int | None = None,
             like: str | os.PathLike | None = None) -> PixArtDiT:
    """Build a PixArtDiT from any accepted layout. ``kv`` overrides the checkpoint's KV compression:
    newly compressed conv layers start from the average init, removed ones drop their weights. ``like``: the
    folder whose architecture a checkpoint file takes (``read_checkpoint``)."""
    config, sd = read_checkpoint(path, base_resolution, like)
    if kv is not None:
        config = config.with_kv(kv)
    model = PixArtDiT(config)
    load_weights(model, sd, str(path), allow_missing=KV_KEYS if kv is not None else None,
                 allow_unexpected=KV_KEYS if kv is not None else None)
    return model.to(device=device, dtype=dtype).eval()


def _tensors(model: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, Tensor]:
    sd = model.state_dict()
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in sd.items()}


def save_dit(model: PixArtDiT, folder: str | os.PathLike, dtype: torch.dtype | None = None,
             extra: dict[str, Any] | None = None) -> Path:
    """A pixsigma folder: ``pixsigma.json`` (asdict config + extra) and original-layout safetensors, atomically."""
    folder = Path(folder)
    meta = {"dit": model.config.to_dict(), **(extra or {})}
    atomic_write(folder / PIXSIGMA_WEIGHTS, lambda t: save_file(_tensors(model, dtype), t))
    atomic_write_json(meta, folder / PIXSIGMA_CONFIG, indent=2)
    return folder


def save_original(model: PixArtDiT, path: str | os.PathLike) -> Path:
    """One original-layout file (``.safetensors``, or ``.pth`` as ``{'state_dict': …}``)."""
    path = Path(path)
    sd = _tensors(model, None)
    if path.suffix == ".safetensors":
        atomic_write(path, lambda t: save_file(sd, t, metadata={"pixsigma": json.dumps(model.config.to_dict())}))
    else:
        atomic_write(path, lambda t: torch.save({"state_dict": sd}, t))
    return path


def save_diffusers_transformer(model: PixArtDiT, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """A diffusers ``transformer/`` folder loadable by ``PixArtTransformer2DModel.from_pretrained``."""
    folder = Path(folder)
    cfg = {**diffusers_config(model.config), "_diffusers_version": diffusers.__version__}
    sd = to_diffusers_state_dict(_tensors(model, dtype))
    atomic_write(folder / DIFFUSERS_WEIGHTS, lambda t: save_file(sd, t, metadata={"format": "pt"}))
    atomic_write_json(cfg, folder / "config.json", indent=2)
    return folder
