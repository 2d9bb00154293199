"""Procedural worlds the trainer can make data for and score on, found through entry points.

A world (the shapes world is the one this repository ships) registers an object under the ``pixsigma.worlds``
entry-point group (``pyproject.toml``); ``train`` reads the group and never imports a world's package by name,
so the trainer stands without any world and a world is loaded only when a stage or the chain asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from pixsigma.registry import load_target

WORLD_GROUP = "pixsigma.worlds"
DEFAULT_WORLD = "shapes"


class PlanStep(Protocol):
    """One training run of a world's chain (``shapes.plan.StageRun`` is one)."""

    name: str  # run folder name
    config: str  # file in configs/
    cache: str  # feature cache name
    steps: int
    pipeline: str  # which shipped pipeline folder (VAE, text encoder) it trains against: "alpha" or "sigma"
    resolution: int
    batch_size: int
    images: int | None


class LabPreset(Protocol):
    """A chain's size: its runs, the world images it makes, and how each point is scored."""

    name: str
    plan: list  # list[PlanStep], α first
    images: int  # world images generated (once) for the whole chain
    bench_n: int  # held-out prompts per score
    bench_steps: int  # sampler steps per scored image
    evals: int  # checkpoints per stage scored between its start and its export (the curve's inner points)
    checkpoint_every: int | None  # most steps between checkpoints (what a kill -9 loses); None: the scored ones


class World(Protocol):
    name: str

    def pipelines(self) -> dict[str, Path]:
        """The shipped pipeline folders by role (``alpha``, ``sigma``): VAE, text encoder and starting weights."""

    def can_make(self, source: str | Path) -> bool:
        """Whether ``source`` (a config's ``data.source``) names data this world generates on demand."""

    def make_data(self, folder: Path, n: int, source: str | Path | None = None,
                  progress: Callable[[int, int], None] | None = None) -> Path:
        """Write ``n`` captioned images into ``folder`` once (reused when complete); returns the folder."""

    def preset(self, name: str, start_from: str) -> LabPreset:
        """The chain of preset ``name`` (``tiny``, ``quick``, ``full``); ``start_from``: ``shipped`` or ``scratch``."""

    bench: str  # the held-out benchmark's name (ShapesBench)

    def sampling(self, steps: int, expand: bool = False) -> dict[str, Any]:
        """How every scored point samples: ``sampler``, ``guidance``, ``steps``, ``expander`` (None when off)."""

    def score(self, pipeline: Path, transformer: Path | Any, resolution: int, n: int, steps: int,
              seed: int = 0, expand: bool = False) -> dict[str, Any]:
        """The held-out benchmark of a model: ``attribute, count, colour, shape, position, n`` and
        ``per_prompt`` (each prompt's attribute score); ``expand``: prompts through the world's expander."""


def installed_worlds() -> dict[str, str]:
    """name -> ``module:attribute`` of every registered world (package metadata only, nothing imported)."""
    return {ep.name: ep.value for ep in entry_points(group=WORLD_GROUP)}


def load_world(name: str = DEFAULT_WORLD) -> World:
    """The world registered as ``name``; a ValueError listing the installed ones otherwise."""
    found = [ep for ep in entry_points(group=WORLD_GROUP) if ep.name == name]
    if not found:
        listed = ", ".join(sorted(installed_worlds())) or "none installed"
        raise ValueError(f"unknown world {name!r}; accepted: {listed} (worlds come from the {WORLD_GROUP!r} entry "
                         "points; `pip install -e .` adds this repository's)")
    return load_target(found[0].value)  # a clone's shapes.lab, an install's pixsigma.shapes.lab
