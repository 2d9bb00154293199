"""Where pixsigma's own files are: a clone of the repository, or an installed wheel.

In a clone the training code, the shapes world, the demo pair and the configs are the folders beside the package
(``train/``, ``shapes/``, ``assets/demo/``, ``configs/``) and are imported by those names. An installed wheel
claims only pixsigma's names: it carries them as ``pixsigma.train``, ``pixsigma.shapes`` and the data folder
``pixsigma/data/`` (``assets/demo``, ``configs``), found through ``importlib.resources`` (pyproject.toml maps them).
This module only names places; it imports none of them (the engine imports no training or world code).
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
COMPANIONS = ("train", "shapes")  # the repository's top-level packages the wheel installs under pixsigma.*
DATA_PACKAGE = "data"  # the wheel's pixsigma/data: a copy of the clone's assets/demo and configs/


def _checkout() -> Path | None:
    """The clone holding this package (its pyproject.toml and train/ beside it), or None when installed."""
    root = PACKAGE_DIR.parent
    if (root / "pyproject.toml").is_file() and (root / "train" / "__init__.py").is_file():
        return root
    return None


def _data_root() -> Path:
    if CHECKOUT is not None:
        return CHECKOUT
    data = files("pixsigma") / DATA_PACKAGE
    if not isinstance(data, Path):  # wheels install unpacked; a zipped install has no folder diffusers can read
        raise RuntimeError(f"pixsigma's data is not a folder on disk ({data!r}): install the wheel unpacked (pip)")
    return data


CHECKOUT = _checkout()
DATA_ROOT = _data_root()  # holds assets/demo and configs in either layout: relative config paths resolve here


def companion(module: str) -> str:
    """The importable name of ``train…`` / ``shapes…``: as written in a clone, under ``pixsigma.`` when installed."""
    head = module.split(".", 1)[0]
    if head not in COMPANIONS:
        raise ValueError(f"companion module must start with one of {', '.join(COMPANIONS)}, got {module!r}")
    return module if CHECKOUT is not None else f"pixsigma.{module}"


def child_env(environ: dict[str, str]) -> dict[str, str]:
    """The environment of a ``python -m train…`` child: a clone's root on PYTHONPATH (run from any folder);
    an install's packages are found as they are."""
    if CHECKOUT is None:
        return dict(environ)
    return {**environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(CHECKOUT), environ.get("PYTHONPATH")]))}


def local_target(value: str) -> str:
    """An entry point's ``module:attr`` as this layout imports it: pyproject names the wheel's
    ``pixsigma.shapes…``; a clone imports the same file as ``shapes…`` (one module object, not two copies)."""
    head, _, rest = value.partition(".")
    if CHECKOUT is not None and head == "pixsigma" and rest.split(".", 1)[0].split(":", 1)[0] in COMPANIONS:
        return rest
    return value
