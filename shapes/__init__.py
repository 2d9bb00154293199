"""The "shapes" world: a procedural captioned world, its prompt expander, its frozen text encoder and VAEs,
ShapesBench, and the build that trains the embedded demo pair in ``assets/demo``.

It uses ``pixsigma`` and ``train``; nothing in either imports it. Only paths live here (no side effects).
"""

from __future__ import annotations

from pixsigma.registry import DEMO_DIR, MODEL_ALIASES

DEMO_SIGMA = MODEL_ALIASES["demo"]  # the PixArt-Σ-style demo pipeline folder
DEMO_ALPHA = MODEL_ALIASES["demo-alpha"]  # the PixArt-α-style baseline
REPO = DEMO_DIR.parents[1]  # the checkout holding assets/demo: the build runs its steps from here
CONFIGS = REPO / "configs"  # the training recipes a build's stages name

__all__ = ["CONFIGS", "DEMO_ALPHA", "DEMO_DIR", "DEMO_SIGMA", "REPO"]
