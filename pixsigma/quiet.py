"""Quiet imports: torchao's first import (transformers, diffusers and peft make it, when torchao is installed, with
their models) logs each CUDA kernel library a CPU build cannot load; none of it concerns pixsigma. A leaf, so a
module can import its models quietly at its top."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

# Where torchao's first import logs (transformers and diffusers import it, when installed, with their models).
_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


@contextmanager
def quiet_torchao() -> Iterator[None]:
    """torchao's first import logs each CUDA kernel library a CPU build cannot load, and diffusers that some
    torchao tensor types moved; neither concerns pixsigma, so that import is made quiet."""
    loggers = [logging.getLogger(n) for n in _IMPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
