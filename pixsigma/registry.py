"""The engine's registries of named things it does not own: model and LoRA aliases, and prompt expanders.

A model alias names a pipeline folder shipped with the package (``demo`` → ``assets/demo/sigma``: in a clone
the folder beside the package, in a wheel its copy in ``pixsigma/data``; ``pixsigma.layout``).
A prompt expander is a ``(prompt, seed) -> prompt`` rewrite that a folder's ``sampling.json`` names; packages
provide them through the ``pixsigma.prompt_expanders`` entry-point group (``pyproject.toml``), so the engine
imports a world's grammar only when a folder asks for it, and never a module that no installed package declared.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from importlib.metadata import entry_points

from pixsigma.layout import DATA_ROOT, local_target

ASSETS_DIR = DATA_ROOT / "assets"  # found from the package, not the working directory
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
    return load_target(ep.value)


def load_target(value: str) -> object:
    """The object an entry point's ``module:attr`` names, imported under this layout's name for it."""
    module, _, attr = local_target(value).partition(":")
    found: object = import_module(module)
    for part in filter(None, attr.split(".")):
        found = getattr(found, part)
    return found
