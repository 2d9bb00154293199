"""Build the demo's frozen parts: tokenizer, T5 text encoder, VAE-α and VAE-Σ.

    python -m shapes.build_parts --out assets/demo [--seed 0] [--minutes-per-part N]
    python -m shapes.build_parts --refine-decoder assets/demo/sigma/vae [--spec sigma]

Writes ``tokenizer/``, ``text_encoder/`` (+ ``metrics.json``: probe accuracy), ``vae_alpha/`` and
``vae_sigma/`` (+ ``metrics.json``: PSNR, latent std, scaling factor) under ``--out``, each folder
swapped in whole once complete. Deterministic for a seed (fixed step counts, seeded data);
``--minutes-per-part`` only caps a part's training time, and says so when it cuts one short.
``--refine-decoder`` runs only a built VAE's phase 2 (``VAESpec.decoder_steps``, decoder-only with its
encoder frozen) on that folder, in place: what the full build gives for a spec with decoder refinement.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from pixsigma.io import new_folder

from .text_encoder import build_tokenizer, train_text_encoder
from .vae import (
    VAE_SPECS,
    VAESpec,
    finish_vae,
    heldout_images,
    reconstruction_psnr,
    refine_decoder,
    save_vae,
    train_vae,
)

PARTS = ("tokenizer", "text_encoder", "vae_alpha", "vae_sigma")
T5_STEPS = 900  # enough for a probe to read every slot's attributes from the features (fewer cap the DiT)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _align_reference(spec: VAESpec, out: Path):
    """VAE-α (already built into ``out``) when ``spec`` aligns to it; else None."""
    if spec.align_weight <= 0:
        return None
    from diffusers import AutoencoderKL

    if not (out / "vae_alpha").is_dir():
        raise ValueError(f"VAE-Σ aligns its latents to VAE-α, which is not in {out}: build vae_alpha first")
    return AutoencoderKL.from_pretrained(out / "vae_alpha").eval().requires_grad_(False)


def build_parts(out: str | Path, seed: int = 0, parts: tuple[str, ...] = PARTS, t5_steps: int = T5_STEPS,
                vae_steps: dict[str, int] | None = None, decoder_steps: dict[str, int] | None = None,
                minutes_per_part: float | None = None,
                heldout: int = 64, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Build ``parts`` into ``out``; returns each part's metrics."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown part(s) {bad}; accepted: {', '.join(PARTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = None if minutes_per_part is None else 60.0 * minutes_per_part
    tokenizer = build_tokenizer()
    results: dict[str, dict] = {}
    images = heldout_images(heldout) if any(p.startswith("vae_") for p in parts) else None
    for part in parts:
        t0 = time.perf_counter()
        with new_folder(out / part) as tmp:
            if part == "tokenizer":
                tokenizer.save_pretrained(tmp)
                metrics = {"vocab_size": len(tokenizer.get_vocab())}
            elif part == "text_encoder":
                res = train_text_encoder(tokenizer, steps=t5_steps, seed=seed, max_seconds=budget, log=log)
                res.model.save_pretrained(tmp, safe_serialization=True)
                metrics = res.metrics
                _write_json(tmp / "metrics.json", metrics)
            else:
                name = part.removeprefix("vae_")
                spec = VAE_SPECS[name]
                if vae_steps and name in vae_steps:
                    spec = replace(spec, steps=vae_steps[name])
                if decoder_steps and name in decoder_steps:
                    spec = replace(spec, decoder_steps=decoder_steps[name])
                vae, info = train_vae(spec, seed=seed, max_seconds=budget, log=log,
                                      align_to=_align_reference(spec, out), heldout=images)
                metrics = finish_vae(vae, name, spec, info, images)
                save_vae(vae, tmp, metrics)
        metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
        results[part] = metrics
        log(f"{part}: done in {metrics['wall_seconds']} s {json.dumps(metrics, ensure_ascii=False)}")
    return results


def needs_refinement(folder: Path, spec: VAESpec) -> bool:
    """Whether the built VAE in ``folder`` lacks the decoder refinement that ``spec`` asks for."""
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    return spec.decoder_steps > 0 and not metrics.get("decoder_steps")


def refine_built_decoder(folder: str | Path, spec: VAESpec, seed: int = 0, heldout: int = 64,
                         log: Callable[[str], None] = print) -> dict:
    """Phase 2 (``refine_decoder``) on the VAE saved in ``folder``, swapped in whole once done; its
    ``metrics.json`` gains the phase-2 fields and the PSNR before (``psnr_db_phase1``) and after."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    if not (folder / "metrics.json").is_file():
        raise ValueError(f"{folder} is not a VAE built by build_parts (no metrics.json)")
    metrics = json.loads((folder / "metrics.json").read_text())
    if metrics.get("decoder_steps"):
        raise ValueError(f"the decoder in {folder} is already refined ({metrics['decoder_steps']} steps); "
                         f"refining twice is not what any build makes")
    if spec.decoder_steps < 1:
        raise ValueError("the spec asks for no decoder refinement (decoder_steps = 0)")
    vae = AutoencoderKL.from_pretrained(folder).float().eval()
    if tuple(vae.config.block_out_channels) != spec.block_out_channels:
        raise ValueError(f"{folder} holds a VAE with block_out_channels {tuple(vae.config.block_out_channels)}, "
                         f"the spec {spec.block_out_channels}")
    images = heldout_images(heldout)
    before = metrics.get("psnr_db")
    metrics.update(refine_decoder(vae, spec, seed=seed, log=log))
    metrics.update(psnr_db_phase1=before, psnr_db=round(reconstruction_psnr(vae, images), 3), spec=asdict(spec))
    with new_folder(folder) as tmp:
        save_vae(vae, tmp, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder for tokenizer/, text_encoder/, vae_alpha/, vae_sigma/")
    ap.add_argument("--refine-decoder", metavar="VAE_FOLDER",
                    help="only run phase 2 (decoder refinement) of --spec on the VAE built in this folder")
    ap.add_argument("--spec", choices=tuple(VAE_SPECS), default="sigma", help="the VAE spec --refine-decoder uses")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes-per-part", type=float, default=None,
                    help="cap on each part's training time (cutting one short breaks determinism)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: fastest on a shared CPU, where spinning OpenMP threads "
                         "slow each other down, and the same numbers on any machine)")
    ap.add_argument("--t5-steps", type=int, default=T5_STEPS)
    ap.add_argument("--vae-alpha-steps", type=int, default=VAE_SPECS["alpha"].steps)
    ap.add_argument("--vae-sigma-steps", type=int, default=VAE_SPECS["sigma"].steps)
    ap.add_argument("--vae-sigma-decoder-steps", type=int, default=VAE_SPECS["sigma"].decoder_steps,
                    help="phase 2: decoder-only refinement steps of VAE-Σ (0: none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.refine_decoder:
        m = refine_built_decoder(args.refine_decoder, VAE_SPECS[args.spec], seed=args.seed)
        print(f"refined {args.refine_decoder}: PSNR {m['psnr_db_phase1']} -> {m['psnr_db']} dB "
              f"in {time.perf_counter() - t0:.0f} s")
        return
    if not args.out:
        ap.error("--out is required (unless --refine-decoder)")
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    build_parts(args.out, seed=args.seed, parts=parts, t5_steps=args.t5_steps,
                vae_steps={"alpha": args.vae_alpha_steps, "sigma": args.vae_sigma_steps},
                decoder_steps={"sigma": args.vae_sigma_decoder_steps},
                minutes_per_part=args.minutes_per_part)
    print(f"built {', '.join(parts)} into {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
