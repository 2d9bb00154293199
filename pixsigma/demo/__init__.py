"""The "shapes" demo: a procedural captioned world, its frozen text encoder and VAEs, and ShapesBench.

Only paths live here (no side effects): the shipped demo models and parts sit under
``assets/demo`` next to the package.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo"
DEMO_SIGMA = DEMO_DIR / "sigma"  # the PixArt-Σ-style demo pipeline folder (model name "demo")
DEMO_ALPHA = DEMO_DIR / "alpha"  # the PixArt-α-style baseline (model name "demo-alpha")

__all__ = ["DEMO_ALPHA", "DEMO_DIR", "DEMO_SIGMA"]
