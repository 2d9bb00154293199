"""The engine's registries of named things it does not own: model and LoRA aliases, and prompt expanders.

A model alias names a pipeline folder shipped beside the package (``demo`` → ``assets/demo/sigma``).
A prompt expander is a ``(prompt, seed) -> prompt`` rewrite that a folder's ``sampling.json`` names; packages
provide them through the ``pixsigma.prompt_expanders`` entry-point group (``pyproject.toml``), so the engine
imports a world's grammar only when a folder asks for it, and never a module that no installed package declared.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"  # found from the package, not the working directory
DEMO_DIR = ASSETS_DIR / "demo"
MODEL_ALIASES = {"demo": DEMO_DIR / "sigma", "demo-alpha": DEMO_DIR / "alpha"}
LORA_ALIASES = {"demo-tiny-huge": DEMO_DIR / "loras" / "tiny-huge",  # LoRAs of the demo Σ (docs/lora.md)
                "demo-lcm": DEMO_DIR / "loras" / "lcm"}  # its 4-step consistency adapter (docs/fewstep.md)
EXPANDER_GROUP = "pixsigma.prompt_expanders"


def prompt_expanders() -> dict[str, str]:
    """Installed expanders: name -> ``module:function`` (read from package metadata, nothing imported)."""
    return {ep.name: ep.value for ep in entry_points(group=EXPANDER_GROUP)}


def check_expander(name: str) -> None:
    known = prompt_expanders()
    if name not in known:
        listed = ", ".join(sorted(known)) or "none installed"
        raise ValueError(f"unknown prompt_expander {name!r}; accepted: {listed}, or null "
                         f"(expanders come from the {EXPANDER_GROUP!r} entry points; `pip install -e .` adds "
                         "this repository's)")


def load_expander(name: str) -> Callable[[str, int], str]:
    """The (prompt, seed) -> prompt function an installed package registered under ``name``."""
    check_expander(name)
    (ep,) = (ep for ep in entry_points(group=EXPANDER_GROUP) if ep.name == name)
    return ep.load()
