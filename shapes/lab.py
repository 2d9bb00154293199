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
# Every scored point samples alike: DPM-Solver++ at guidance 4.5, prompts as written (shapes.report's curves).
BENCH_SAMPLING = {"sampler": "dpm-solver", "guidance": 4.5, "expand_prompt": False}
SCORE_KEYS = ("attribute", "count", "colour", "shape", "position")


@lru_cache(maxsize=2)
def _pipeline(folder: str):
    """One loaded pipeline per folder (its VAE and T5 shared by every point scored through it)."""
    from pixsigma.pipeline import PixSigmaPipeline

    return PixSigmaPipeline.from_pretrained(folder, device="auto")


class ShapesWorld:
    name = "shapes"

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

    def score(self, pipeline: Path, transformer: Path | Any, resolution: int, n: int, steps: int,
              seed: int = 0, sampling: dict[str, Any] | None = None) -> dict[str, float | int]:
        """ShapesBench on the first ``n`` held-out prompts: ``attribute, count, colour, shape, position, n``.
        ``sampling``: sampler, guidance and expand_prompt (None: ``BENCH_SAMPLING``; a consistency model's: 4 LCM
        steps at guidance 1)."""
        from pixsigma.model.dit import PixArtDiT
        from pixsigma.weights import load_dit

        from . import shapesbench
        from .report import generate_fn

        pipe = _pipeline(str(pipeline))
        net = transformer if isinstance(transformer, PixArtDiT) else load_dit(transformer)
        pipe.transformer = net.to(pipe.device, pipe.dtype).eval()
        r = shapesbench.evaluate(generate_fn(pipe, resolution, steps=steps, **(sampling or BENCH_SAMPLING)), n=n,
                                 width=resolution, height=resolution, batch_size=min(n, 16), seed=seed)
        return {**{k: round(float(r[k]), 4) for k in SCORE_KEYS}, "n": n}


WORLD = ShapesWorld()
