"""The demo LoRA ``demo-tiny-huge``: teaches the shipped Σ the size words "tiny" and "huge".

The demo T5's vocabulary has "tiny" and "huge" (prompt words of the world's vocabulary), but no caption the
DiT trained on used them, so the shipped Σ draws a random size for them. The LoRA's data are the world's
scenes with dense captions in which every "small" reads "tiny" and every "large" reads "huge" (half the
records; the other half keep the world's words, so those keep their meaning). Measured on ``BENCH_N`` held-out
dense prompts whose every object is tiny or huge, before and after, same seeds, by ShapesBench's detector.

    python -m shapes.lora_demo data data/shapes_tiny_huge          # the training images + metadata.jsonl
    python -m train.extract configs/lora_tiny_huge.yaml
    python -m train configs/lora_tiny_huge.yaml --set stage.load_from=assets/demo/sigma/transformer
    python -m shapes.lora_demo measure runs/lora_tiny_huge/final   # before/after table (markdown)
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import numpy as np

from .shapesbench import detect, score
from .world import Scene, long_caption, make_dataset, parse_prompt, sample_scene, scene_rng

WORDS = {"small": "tiny", "large": "huge"}
SIZES = ((256, 256), (224, 288), (288, 224))
BENCH_N = 48
BENCH_SEED = 19  # the held-out domain: scenes no training record holds


def size_words(caption: str) -> str:
    """The caption with the world's size words replaced by the new ones ("A small red star" -> "A tiny …")."""
    return re.sub(r"\b(small|large)\b", lambda m: WORDS[m.group(1)], caption)


def make_data(folder: str | Path, n: int, seed: int = 5) -> Path:
    """``n`` world scenes (``world.make_dataset``); even records speak of tiny/huge, odd ones of small/large."""
    return make_dataset(folder, n, seed=seed, sizes=SIZES,
                        recaption=lambda i, caption: size_words(caption) if i % 2 == 0 else caption)


def bench_scenes(n: int = BENCH_N) -> list[Scene]:
    """Held-out scenes of 1-3 objects, each object small or large (so every prompt says tiny or huge)."""
    scenes = []
    for i in range(n):
        rng = scene_rng("heldout", BENCH_SEED, i)
        scene = sample_scene(rng, n_objects=int(rng.integers(1, 4)))
        objs = tuple(dataclasses.replace(o, size=("small", "large")[int(rng.integers(2))]) for o in scene.objects)
        scenes.append(Scene(objs, scene.background))
    return scenes


def measure(pipe, loras: str | None, n: int = BENCH_N, new_words: bool = True) -> dict:
    """Mean size accuracy and attribute score of ``pipe`` (with ``loras``) on the held-out prompts, with the new
    words (tiny/huge) or the world's own (small/large: what the LoRA must not break)."""
    from pixsigma.pipeline import GenerationRequest

    pipe.set_loras(loras)
    rows = []
    for i, scene in enumerate(bench_scenes(n)):
        truth = long_caption(scene)
        prompt = size_words(truth) if new_words else truth
        image = pipe.generate(GenerationRequest(prompt, seed=i, expand_prompt=False)).images[0]
        rows.append(score(detect(image), parse_prompt(truth)))
    pipe.set_loras(None)
    return {m: float(np.mean([r[m] for r in rows if r[m] is not None])) for m in ("size", "attribute")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shapes.lora_demo", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write the LoRA's training images")
    d.add_argument("folder")
    d.add_argument("--n", type=int, default=2000)
    m = sub.add_parser("measure", help="before/after on the held-out tiny/huge prompts")
    m.add_argument("lora", help="a LoRA file or folder (or a shipped name)")
    m.add_argument("--n", type=int, default=BENCH_N)
    m.add_argument("--scale", type=float, default=1.0, help="the LoRA's scale (multiplies lora_alpha / r)")
    args = p.parse_args(argv)
    if args.command == "data":
        print(make_data(args.folder, args.n))
        return 0
    from pixsigma.pipeline import PixSigmaPipeline

    pipe = PixSigmaPipeline.from_pretrained("demo", device="cpu")
    print(f"| {args.n} held-out prompts | model | size accuracy | attribute |\n|---|---|---|---|")
    tuned = f"demo Σ + demo-tiny-huge at {args.scale:g}"
    for words, new in (("with tiny/huge", True), ("with small/large", False)):
        for name, lora in (("demo Σ", None), (tuned, f"{args.lora}:{args.scale}")):
            r = measure(pipe, lora, args.n, new)
            print(f"| {words} | {name} | {100 * r['size']:.1f} % | {100 * r['attribute']:.1f} % |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
