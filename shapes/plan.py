"""The demo build's stage plan: the training runs ``shapes.build`` makes, in order, and how they are recorded.

α from scratch, then PixArt-Σ's three stages (VAE swap, res-up, KV compression), each a tenth of α's steps,
then optionally a ``finetune`` polish, a mid-noise band run and a complete-caption run. The build records its
plan in its work folder (``build.json``) before it trains; the report reads it from there and stores it with
the results (``shapesbench.json``, key ``"plan"``), so a re-score scores what was built, never a plan
re-derived from flags. ``shapes.build`` and ``shapes.report`` both import this module, never each other.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .world import SHORT_STYLES

# The build's defaults: its work folder, α's steps and the table's prompts (the first and last the report's too).
WORK, ALPHA_STEPS, BENCH_N = "runs/demo_build", 3000, 200
SIGMA_FRACTION = 0.1  # each Σ stage's share of α's steps: the paper's stages adapt in few steps
POLISH_IMAGES = 6400  # world images the optional polish run revisits: encoding more costs CPU time up front
PIPELINES = ("alpha", "sigma")


@dataclass(frozen=True)
class StageRun:
    """One training run of the build: its config, where it reads and writes, and its length."""

    name: str  # run folder name
    config: str  # file in configs/
    cache: str  # feature cache name
    steps: int
    pipeline: str  # "alpha" or "sigma": which VAE / pipeline folder it trains against
    resolution: int
    batch_size: int
    images: int | None = None  # first N world images its cache holds (None: all); a short stage sees each once
    short: str = "raw"  # its data's short captions (world.dataset_caption): "raw", or "complete"
    sets: tuple[str, ...] = ()  # more "key=value" overrides of its config (a schedule; a whole-DiT student)

    def __post_init__(self) -> None:
        for name in ("steps", "resolution", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"stage {self.name!r}: {name} must be an integer >= 1, got {v!r}")
        if self.images is not None and (not isinstance(self.images, int) or self.images < 1):
            raise ValueError(f"stage {self.name!r}: images must be an integer >= 1 or null (all), got {self.images!r}")
        if self.pipeline not in PIPELINES:
            raise ValueError(f"stage {self.name!r}: pipeline must be one of {', '.join(PIPELINES)}, "
                             f"got {self.pipeline!r}")
        if isinstance(self.sets, str) or not all(isinstance(x, str) and "=" in x for x in self.sets):
            raise ValueError(f"stage {self.name!r}: sets must be a list of 'key=value' strings, got {self.sets!r}")
        object.__setattr__(self, "sets", tuple(self.sets))
        if self.short not in SHORT_STYLES:
            raise ValueError(f"stage {self.name!r}: short must be one of {', '.join(SHORT_STYLES)}, got {self.short!r}")


def stage_plan(alpha_steps: int, alpha_batch_scale: int = 1, sigma_batch_scale: int = 1, polish_steps: int = 0,
               polish_images: int = POLISH_IMAGES, band_steps: int = 0, complete_steps: int = 0) -> list[StageRun]:
    """α, then the three Σ stages of ``SIGMA_FRACTION`` of α's steps each. ``alpha_batch_scale`` multiplies α's
    batch and ``sigma_batch_scale`` the Σ stages' (a GPU runs 4× the CPU batch of this small model in about the
    same step time); at 1 the Σ stages keep their configs' batches (32 at 128 px, 16 at 256 px), CPU-sized.
    ``polish_steps`` > 0 appends a ``finetune`` run of the finished Σ at 256 px (the same model trained longer,
    on ``polish_images`` images it revisits: its own cache, since the stages' caches hold only what they visit).
    ``band_steps`` > 0 appends one more ``finetune`` run on that cache with a share of its timesteps in the
    mid-noise band (``configs/shapes_sigma_band.yaml``). ``complete_steps`` > 0 appends one more on the same
    images with complete short captions (``configs/shapes_sigma_complete.yaml``: every caption names every
    object)."""
    for name, k in (("alpha_steps", alpha_steps), ("alpha_batch_scale", alpha_batch_scale),
                    ("sigma_batch_scale", sigma_batch_scale), ("polish_images", polish_images)):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {k}")
    for name, k in (("polish_steps", polish_steps), ("band_steps", band_steps), ("complete_steps", complete_steps)):
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"{name} must be an integer >= 0 (0: no such run), got {k}")
    s = max(10, int(alpha_steps * SIGMA_FRACTION))
    b128, b256 = 32 * sigma_batch_scale, 16 * sigma_batch_scale
    # A Σ stage's cache holds only the images it can visit: 256 px VAE encoding would dominate the build otherwise.
    plan = [StageRun("alpha", "shapes_alpha.yaml", "alpha_128", alpha_steps, "alpha", 128, 32 * alpha_batch_scale),
            StageRun("sigma_vae", "shapes_sigma_vae.yaml", "sigma_128", s, "sigma", 128, b128, s * b128),
            StageRun("sigma_resup", "shapes_sigma_resup.yaml", "sigma_256", s, "sigma", 256, b256, s * b256),
            StageRun("sigma_kv", "shapes_sigma_kv.yaml", "sigma_256", s, "sigma", 256, b256, s * b256)]
    if polish_steps:
        plan.append(StageRun("sigma_polish", "shapes_sigma_polish.yaml", "sigma_256_polish", polish_steps, "sigma",
                             256, b256, polish_images))
    if band_steps:
        plan.append(StageRun("sigma_band", "shapes_sigma_band.yaml", "sigma_256_polish", band_steps, "sigma",
                             256, b256, polish_images))
    if complete_steps:
        plan.append(StageRun("sigma_complete", "shapes_sigma_complete.yaml", "sigma_256_complete", complete_steps,
                             "sigma", 256, b256, polish_images, short="complete"))
    return plan


def plan_to_json(plan: list[StageRun]) -> list[dict[str, Any]]:
    """The plan as stored in ``shapesbench.json``: one object per run, in training order."""
    return [{k: v for k, v in asdict(st).items() if k != "sets" or v} for st in plan]  # no schedule: as before


def plan_from_json(rows: Any, where: str = "the plan") -> list[StageRun]:
    """The stored plan back as runs; a clear error naming ``where`` for anything that is not one."""
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{where} must be a non-empty list of runs, got {rows!r}")
    known = {f.name for f in fields(StageRun)}
    required = {f.name for f in fields(StageRun) if f.default is MISSING}
    plan = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) - known or required - set(row):
            raise ValueError(f"{where}: run {i} must be an object with the keys {', '.join(sorted(required))} "
                             f"(optional: images, short, sets) and no others, got {row!r}")
        plan.append(StageRun(**row))
    names = [st.name for st in plan]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: run names must be distinct (they are run folders), got {names}")
    if plan[0].pipeline != "alpha" or any(st.pipeline != "sigma" for st in plan[1:]):
        raise ValueError(f"{where}: α must be the first run and every later run a Σ one, got pipelines "
                         f"{[st.pipeline for st in plan]}")
    return plan


BUILD_RECORD = "build.json"  # in the build's work folder: its plan, command and stage times, for the report


def run_folder(work: Path, name: str) -> Path:
    """Where the build trains run ``name`` of its plan, and where the report finds it."""
    return work / "runs" / name


def write_build_record(work: Path, plan: list[StageRun], command: str, minutes: dict[str, float]) -> Path:
    """Record in ``work`` what the build trains (before it trains, so a report of a stopped build reads it too)."""
    from pixsigma.io import atomic_write_json

    return atomic_write_json({"plan": plan_to_json(plan), "command": command, "build_minutes": minutes},
                             work / BUILD_RECORD)


def read_build_record(work: Path) -> dict[str, Any]:
    """The record ``write_build_record`` left in ``work``, its plan as runs (``"plan"``)."""
    path = work / BUILD_RECORD
    if not path.is_file():
        raise ValueError(f"{path} does not exist: {work} is not the work folder of a build (python -m shapes.build "
                         f"--work {work} writes it)")
    record = json.loads(path.read_text())
    return {**record, "plan": plan_from_json(record.get("plan"), str(path))}


# The lab's chains (python -m train.chain): α (shipped, or trained from scratch) and the three Σ stages, sized
# to a budget. ``full`` is the shipped pair's recipe (assets/demo/README.md) and ends with the consistency stage;
# ``quick`` fits 2 CPU cores in about 20 minutes, ``quick-fast`` adds the consistency stage to it; ``tiny`` is
# the test suite's, seconds long and scoring only that it runs.
LAB_PRESETS = ("tiny", "quick", "quick-fast", "full")
# The lab's consistency stage (docs/fewstep.md): the whole DiT as the student, so each point is a model the chain
# scores like the others (at the 4 LCM steps its export's sampling.json names), on the KV stage's data and cache.
FEW_STEP_SETS = ("lora=", "data.source=data/shapes", "data.cache=data/cache/shapes_sigma_256")


def few_step_run(steps: int, batch: int) -> StageRun:
    """The consistency stage after the KV stage (``configs/shapes_sigma_lcm.yaml`` with ``FEW_STEP_SETS``)."""
    return StageRun("sigma_lcm", "shapes_sigma_lcm.yaml", "sigma_256", steps, "sigma", 256, batch, steps * batch,
                    sets=FEW_STEP_SETS)


LAB_STARTS = ("shipped", "scratch")


@dataclass(frozen=True)
class LabPlan:
    """A chain preset: its runs (α first), the world images made for it, and how each point is scored."""

    name: str
    start_from: str  # "shipped": α is the shipped model, not trained; "scratch": α is trained from random weights
    plan: list[StageRun]
    images: int  # world images made once for the whole chain
    bench_n: int  # held-out ShapesBench prompts per scored point (the same prompts and seeds at every point)
    bench_steps: int  # sampler steps per scored image
    evals: int  # checkpoints scored inside each stage, besides its start and its export
    checkpoint_every: int | None = None  # at most this many steps between checkpoints (None: the scored ones only)
    expand_ends: bool = True  # score α and the last export once more with the prompts through the expander


def _sized(alpha: tuple[int, int], sigma: tuple[int, int, int], b128: int, b256: int) -> list[StageRun]:
    """α (steps, batch) and the Σ stages' steps at batches ``b128`` (128 px) and ``b256`` (256 px)."""
    vae, resup, kv = sigma
    return [StageRun("alpha", "shapes_alpha.yaml", "alpha_128", alpha[0], "alpha", 128, alpha[1]),
            StageRun("sigma_vae", "shapes_sigma_vae.yaml", "sigma_128", vae, "sigma", 128, b128, vae * b128),
            StageRun("sigma_resup", "shapes_sigma_resup.yaml", "sigma_256", resup, "sigma", 256, b256, resup * b256),
            StageRun("sigma_kv", "shapes_sigma_kv.yaml", "sigma_256", kv, "sigma", 256, b256, resup * b256)]


def lab_plan(name: str, start_from: str = "shipped") -> LabPlan:
    """The chain preset ``name`` (one of ``LAB_PRESETS``) starting from ``start_from`` (``LAB_STARTS``)."""
    if name not in LAB_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(LAB_PRESETS)}, got {name!r}")
    if start_from not in LAB_STARTS:
        raise ValueError(f"start_from must be one of {', '.join(LAB_STARTS)}, got {start_from!r}")
    if name == "tiny":
        return LabPlan(name, start_from, _sized((2, 2), (2, 2, 2), 2, 2), images=8, bench_n=2, bench_steps=2,
                       evals=0)
    if name in ("quick", "quick-fast"):  # quick-fast: then the consistency stage
        plan = quick_plan() + ([few_step_run(60, 8)] if name == "quick-fast" else [])
        return LabPlan(name, start_from, plan, images=QUICK_IMAGES, bench_n=BENCH_PROTOCOL[0],
                       bench_steps=BENCH_PROTOCOL[1], evals=0, checkpoint_every=25)
    # the shipped Σ's lineage: α 5000 × 128, each Σ stage a tenth of that (shapes.build --alpha-batch-scale 4), then
    # the polish and mid-noise band runs the shipped Σ had after them (its curves in assets/demo/shapesbench.json);
    # scored under the quick chain's protocol so the two chains and the shipped pair compare point for point;
    # then the consistency stage
    plan = stage_plan(5000, alpha_batch_scale=4, polish_steps=FULL_POLISH[0], band_steps=FULL_POLISH[1])
    return LabPlan(name, start_from, plan + [few_step_run(500, 16)],
                   images=16000, bench_n=BENCH_PROTOCOL[0], bench_steps=BENCH_PROTOCOL[1], evals=4, checkpoint_every=50)


# The quick and full chains' protocol: (held-out prompts, sampler steps) per scored point. 96 prompts is the
# issue's floor for intervals narrow enough to tell a stage's change from noise; on 2 CPU cores scoring is
# most of the quick chain's time (9 points, 5 of them at 256 px).
BENCH_PROTOCOL = (96, 8)
FULL_POLISH = (5600, 5000)  # the shipped Σ's polish and band steps after its three stages (at batch 16)
# The quick chain's schedule (docs/lab.md has what was tried). The VAE stage is also where the dense captions
# arrive (α read short ones only): at 128 px a step costs a quarter of a 256 px one, so the chain spends its
# budget there, on fresh images, at the shipped build's LR, long enough for the DiT to learn to read long
# captions; the 256 px stages then recover the resolution change and add KV compression. Each EMA's horizon
# is a fraction of its stage, so an export is the model the stage trained and not mostly its start.
QUICK_VAE_IMAGES, QUICK_IMAGES = 6400, 1600  # world images of the VAE stage (128 px) and of the 256 px stages
QUICK_SCHEDULE = {  # stage: (steps, batch, world images it reads, its config's overrides)
    "sigma_vae": (1000, 16, QUICK_VAE_IMAGES, ["optim.lr=3.0e-4", "optim.warmup_steps=50", "optim.ema_decay=0.995"]),
    "sigma_resup": (300, 16, QUICK_IMAGES, ["optim.lr=3.0e-4", "optim.warmup_steps=30", "optim.ema_decay=0.99"]),
    "sigma_kv": (100, 16, QUICK_IMAGES, ["optim.lr=1.0e-4", "optim.warmup_steps=10", "optim.ema_decay=0.98"]),
}


def quick_plan(alpha: tuple[int, int] = (300, 16)) -> list[StageRun]:
    """The quick chain: α (steps, batch; trained only ``--from scratch``) and ``QUICK_SCHEDULE``'s Σ stages."""
    base = {st.name: st for st in _sized(alpha, (1, 1, 1), 1, 1)}
    return [base["alpha"], *(StageRun(name, base[name].config, base[name].cache, steps, base[name].pipeline,
                                      base[name].resolution, batch, images, sets=tuple(sets))
                             for name, (steps, batch, images, sets) in QUICK_SCHEDULE.items())]
