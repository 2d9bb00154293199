"""The pixsigma web app: an engine holding the loaded models (``engine``), one module per tab, and the server
(``server``: ``build_demo``, the flags and ``main``; started by ``python app.py``, ``pixsigma app`` or
``python -m pixsigma_ui``). Nothing here loads a model or touches the disk at import.
"""

from __future__ import annotations
