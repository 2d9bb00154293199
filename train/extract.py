"""``python -m train.extract CONFIG [--set k=v ...] [--overwrite]``: pre-compute a run's features.

Writes T5 features (fp16, the real tokens of at most ``max tokens``) of the short and long captions and
the VAE posterior (mean, std) of each image at its bucket of the stage's resolution into ``data.cache``
(see ``train.cache`` for the layout). ``accelerate launch -m train.extract CONFIG`` splits the images
over processes; each writes its own shards and rank 0 writes ``index.json`` last, so a cache with an
index is complete.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import PartialState
from torch.utils.data import DataLoader

from pixsigma.config import DiTConfig
from pixsigma.io import atomic_write_json

from . import encoders
from .cache import EXTRAS, FORMAT, INDEX, trim
from .checkpoint import target_model_config
from .config import TrainConfig, load_config
from .controlnet import control_from_pixels
from .data import DataStats, ImageCaptionDataset, collate_images, read_records
from .fileio import atomic_save_tensors


def _bucket_chunks(buckets: list[tuple[int, int]], size: int) -> list[list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(buckets):
        groups.setdefault(b, []).append(i)
    return [idx[i:i + size] for _, idx in sorted(groups.items()) for i in range(0, len(idx), size)]


def _encode_all(text: encoders.TextEncoder, captions: list[str]) -> tuple[list[torch.Tensor], int]:
    """Trimmed fp16 features of each caption, and how many were cut at max tokens."""
    if not captions:
        return [], 0
    y, mask, cut = text(captions)
    return [trim(y[i], mask[i]) for i in range(len(captions))], cut


def extract(cfg: TrainConfig, overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the feature cache of ``cfg`` into ``cfg.data.cache``; returns the folder. ``progress(done, total)``
    is called after each batch with this process's images encoded so far."""
    if not cfg.data.cache or not cfg.data.source or not cfg.data.text_encoder or not cfg.data.vae:
        raise ValueError("extraction needs data.source, data.cache, data.text_encoder and data.vae set")
    folder = Path(cfg.data.cache)
    state = PartialState()
    if (folder / INDEX).is_file() and not overwrite:
        raise FileExistsError(f"{folder / INDEX} exists; pass --overwrite to rebuild the cache")
    dit: DiTConfig = target_model_config(cfg)
    max_tokens = cfg.data.max_tokens or dit.max_tokens
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / INDEX).unlink(missing_ok=True)  # the cache is incomplete until the new index is written
        for old in folder.glob("shard_r*.safetensors"):
            old.unlink()
    state.wait_for_everyone()

    stats = DataStats()
    # every process lists all records; only the main one counts those without a caption
    records = read_records(cfg.data.source, stats if state.is_main_process else DataStats())
    records = records[:cfg.data.max_images][state.process_index::state.num_processes]
    dataset = ImageCaptionDataset(records, dit.resolution, 0.0, cfg.seed, stats)
    text = encoders.build_text_encoder(cfg.data.text_encoder, state.device, max_tokens)
    vae = encoders.build_vae(cfg.data.vae, state.device)
    control = cfg.stage.controlnet.control_type if cfg.stage.controlnet is not None else None  # controlnet stage
    loader = DataLoader(dataset, batch_sampler=_bucket_chunks(dataset.buckets, cfg.data.extract_batch_size),
                        collate_fn=collate_images, num_workers=cfg.data.num_workers)
    samples, shard, shard_no = [], {}, 0
    prefix = f"shard_r{state.process_index}"

    def flush() -> None:
        nonlocal shard, shard_no
        if shard:
            atomic_save_tensors(shard, folder / f"{prefix}_{shard_no:05d}.safetensors")
            shard, shard_no = {}, shard_no + 1

    for batch in loader:
        stats.skipped_images += batch["failed"]
        mean, std = vae.posterior(batch["pixels"])  # (B, C, h/8, w/8) each
        cmean = control_from_pixels(vae, batch["pixels"], control) if control else None
        recs = [dataset.records[i] for i in batch["index"].tolist()]
        short, cut_short = _encode_all(text, [r.caption for r in recs])
        long, cut_long = _encode_all(text, [r.long_caption for r in recs if r.long_caption])
        stats.truncated_captions += cut_short + cut_long
        long_feats = iter(long)
        for j, (i, rec) in enumerate(zip(batch["index"].tolist(), recs)):
            key = f"r{state.process_index}_{len(samples)}"
            shard.update({f"{key}.mean": mean[j].half(), f"{key}.std": std[j].half(), f"{key}.short": short[j]})
            if rec.long_caption:
                shard[f"{key}.long"] = next(long_feats)
            if cmean is not None:
                shard[f"{key}.control"] = cmean[j].half()
            samples.append({"shard": f"{prefix}_{shard_no:05d}.safetensors", "key": key,
                            "bucket": list(dataset.buckets[i]), "long": bool(rec.long_caption),
                            "source": str(rec.path)})
            if len(samples) % cfg.data.shard_size == 0:
                flush()
        if progress is not None:
            progress(len(samples), len(dataset))
    flush()
    atomic_write_json({"samples": samples, "stats": stats.as_dict()}, folder / f"part_r{state.process_index}.json")
    state.wait_for_everyone()
    if state.is_main_process:
        parts = [json.loads((folder / f"part_r{r}.json").read_text()) for r in range(state.num_processes)]
        extras = {"null": _encode_all(text, [""])[0][0]}
        extras.update({f"prompt.{i}": f for i, f in enumerate(_encode_all(text, list(cfg.sample_prompts))[0])})
        atomic_save_tensors(extras, folder / EXTRAS)
        total = {k: sum(p["stats"][k] for p in parts) for k in stats.as_dict()}
        index = {"format": FORMAT, "resolution": dit.resolution, "samples": [s for p in parts for s in p["samples"]],
                 "vae": {"path": str(cfg.data.vae), "scaling_factor": vae.scaling, "shift_factor": vae.shift,
                         "latent_channels": vae.channels},
                 "text": {"path": str(cfg.data.text_encoder), "max_tokens": max_tokens, "channels": text.channels},
                 "prompts": list(cfg.sample_prompts), "stats": total, "control": control}
        atomic_write_json(index, folder / INDEX)
        for r in range(state.num_processes):
            (folder / f"part_r{r}.json").unlink()
        print(f"feature cache {folder}: {len(index['samples'])} samples, {total}")
    state.wait_for_everyone()
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.extract",
                                 description="Pre-compute T5 features and VAE latents of a training config.")
    ap.add_argument("config", help="training config (.yaml or .py) whose data.cache to fill")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--overwrite", action="store_true", help="rebuild an existing cache")
    args = ap.parse_args(argv)
    extract(load_config(args.config, args.overrides), overwrite=args.overwrite)


if __name__ == "__main__":
    main()
