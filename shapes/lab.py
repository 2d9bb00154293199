"""The shapes world as the trainer's lab sees it (``train.worlds``): data on demand, chain presets, ShapesBench.

Registered under the ``pixsigma.worlds`` entry point (``pyproject.toml``), so ``train.prepare`` and
``train.chain`` reach it without importing ``shapes`` by name.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import DEMO_ALPHA, DEMO_SIGMA
from .plan import LabPlan, lab_plan

# The configs' data.source names this world makes (configs/_shapes_base.yaml, shapes_sigma_complete.yaml),
# with the short-caption style and the seed their headers give.
SOURCES = {"shapes": ("raw", 0), "shapes_complete": ("complete", 3)}
# Every scored point samples alike: DPM-Solver++ at guidance 4.5 (shapes.report's curves). The pipeline's own
# expander is always off: with ``expand`` the world's expander rewrites the prompts for every model alike (α's
# folder names none, so its own setting would score α and Σ on different prompts).
BENCH_SAMPLING = {"sampler": "dpm-solver", "guidance": 4.5, "expand_prompt": False}
EXPANDER = "shapes"
SCORE_KEYS = ("attribute", "count", "colour", "shape", "position")


@lru_cache(maxsize=2)
def _pipeline(folder: str):
    """One loaded pipeline per folder (its VAE and T5 shared by every point scored through it)."""
    from pixsigma.pipeline import PixSigmaPipeline

    return PixSigmaPipeline.from_pretrained(folder, device="auto")


class ShapesWorld:
    name = "shapes"
    bench = "ShapesBench"

    def pipelines(self) -> dict[str, Path]:
        return {"alpha": DEMO_ALPHA, "sigma": DEMO_SIGMA}

    def can_make(self, source: str | Path) -> bool:
        p = Path(source)
        return p.name in SOURCES and p.parent.name in ("data", "")

    def make_data(self, folder: Path, n: int, source: str | Path | None = None,
                  progress: Callable[[int, int], None] | None = None) -> Path:
        from pixsigma.io import new_folder

        from .build import TRAIN_SIZES
        from .world import make_dataset

        folder = Path(folder)
        meta = folder / "metadata.jsonl"
        if meta.is_file() and sum(1 for line in meta.read_text().splitlines() if line.strip()) >= n:
            return folder  # records are a pure function of their index: a larger folder starts with the same ones
        short, seed = SOURCES.get(Path(source).name if source else "shapes", SOURCES["shapes"])
        with new_folder(folder) as tmp:  # complete or absent: a killed run makes it again
            make_dataset(tmp, n, seed=seed, sizes=TRAIN_SIZES, short=short, progress=progress)
        return folder

    def preset(self, name: str, start_from: str) -> LabPlan:
        return lab_plan(name, start_from)

    def sampling(self, steps: int, expand: bool = False) -> dict[str, Any]:
        """How every point is sampled: the protocol's sampler, guidance, steps and expander."""
        return {**BENCH_SAMPLING, "steps": steps, "expander": EXPANDER if expand else None}

    def score(self, pipeline: Path, transformer: Path | Any, resolution: int, n: int, steps: int,
              seed: int = 0, expand: bool = False, sampling: dict[str, Any] | None = None) -> dict[str, Any]:
        """ShapesBench on the first ``n`` held-out prompts (batch ``b`` drawn from seed ``seed + b``):
        ``attribute, count, colour, shape, position, n`` and ``per_prompt`` (each prompt's attribute score, in
        bench order: what an interval resamples). ``expand``: the prompts rewritten by the world's expander
        first (scored against the prompt as typed). ``sampling``: sampler, guidance and expand_prompt (None:
        ``BENCH_SAMPLING``; a consistency model's: 4 LCM steps at guidance 1)."""
        from pixsigma.model.dit import PixArtDiT
        from pixsigma.registry import load_expander
        from pixsigma.weights import load_dit

        from . import shapesbench
        from .report import generate_fn

        pipe = _pipeline(str(pipeline))
        net = transformer if isinstance(transformer, PixArtDiT) else load_dit(transformer)
        pipe.transformer = net.to(pipe.device, pipe.dtype).eval()
        gen = generate_fn(pipe, resolution, steps=steps, **(sampling or BENCH_SAMPLING))
        if expand:
            rewrite = load_expander(EXPANDER)
            typed = gen
            gen = lambda prompts, s: typed([rewrite(p, s + i) for i, p in enumerate(prompts)], s)  # noqa: E731
        r = shapesbench.evaluate(gen, n=n, width=resolution, height=resolution, batch_size=min(n, 16), seed=seed)
        return {**{k: round(float(r[k]), 4) for k in SCORE_KEYS}, "n": n,
                "per_prompt": [round(float(row["attribute"]), 4) for row in r["per_prompt"]]}


WORLD = ShapesWorld()
