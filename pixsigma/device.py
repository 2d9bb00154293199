"""Devices and dtypes by name: what ``--device``/``--dtype`` and diffusers' ``.to()``/``torch_dtype`` mean."""

from __future__ import annotations

import torch

from pixsigma.constants import DTYPE_NAMES

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N, mps") from None


def default_dtype(device: torch.device) -> str:
    """The dtype a model runs in when none is asked (the CLI, the app, ``from_pretrained``): bf16 on CUDA (half
    the memory of fp32, without fp16's T5 overflow), fp32 elsewhere (CPUs and MPS are slow or unsupported in bf16)."""
    return "bf16" if device.type == "cuda" else "fp32"


def dtype_name(dtype: str | None, torch_dtype: torch.dtype | None) -> str | None:
    """The pipeline's dtype name from ``dtype`` and diffusers' ``torch_dtype`` (either may be given)."""
    if torch_dtype is None:
        return dtype
    if torch_dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown torch_dtype {torch_dtype!r}; accepted: torch.float32, torch.bfloat16, "
                         f"torch.float16")
    name = TORCH_DTYPES[torch_dtype]
    if dtype is not None and dtype != name:
        raise ValueError(f"dtype {dtype!r} and torch_dtype {torch_dtype} disagree: give one of them")
    return name
