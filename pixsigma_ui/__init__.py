"""The pixsigma web app: an engine holding the loaded models (``engine``) and one module per tab.

``app.py`` at the repository root loads the models and launches; nothing here loads a model
or touches the disk at import.
"""

from __future__ import annotations
