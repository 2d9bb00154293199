"""The pixsigma web app: an engine holding the loaded models (``engine``) and one module per tab.

``app.py`` at the repository root loads the models and launches; nothing here loads a model
or touches the disk at import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def gpu_decorator(duration: int = 120) -> Callable[[F], F]:
    """``spaces.GPU(duration=...)`` where the Hugging Face ``spaces`` package is installed (ZeroGPU Spaces
    attach a GPU only inside functions so marked), else the identity."""
    try:
        import spaces
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)
