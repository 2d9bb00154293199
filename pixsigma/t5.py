"""The T5 text encoder: the precision it is loaded at (fp32, bf16, or 8-bit weights) and, offloaded, its home on
the host.

``int8`` is weight-only 8-bit quantisation through transformers' quantisation integration: torchao's
``Int8WeightOnlyConfig`` (runs on the CPU and on GPUs), or bitsandbytes' ``load_in_8bit`` where CUDA is present,
bitsandbytes is installed and T5 stays on the GPU (a bitsandbytes model cannot be moved between devices).
Linear weights are stored in int8 with one scale per output channel; embeddings, norms and activations stay in
the compute dtype. torchao is imported only when int8 is asked (its import is slow and logs about CUDA kernels).

An offloaded T5 (``offload_t5``) lives on the CPU, in pinned memory where CUDA is available so that moving it to
the GPU is a fast DMA copy; moving it back restores the pinned tensors instead of copying the weights again.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import BitsAndBytesConfig

from pixsigma.quiet import quiet_torchao

with quiet_torchao():  # transformers imports torchao, when installed, with its models
    from transformers import T5EncoderModel

__all__ = ["T5_PRECISIONS", "check_t5_precision", "int8_backend", "keep_on_host", "load_t5", "module_bytes",
           "quantised_linears", "quantization_config", "quiet_torchao", "t5_compute_dtype", "tensor_bytes", "to_device",
           "to_host"]  # quiet_torchao: pixsigma.quiet's, read from here too

T5_PRECISIONS = ("fp32", "bf16", "int8")
_FLOAT = {"fp32": torch.float32, "bf16": torch.bfloat16}
_HOST = "_pixsigma_host"  # attribute of an offloaded encoder: its host tensors, slot by slot


def check_t5_precision(precision: str | None) -> str | None:
    """``precision`` if it is one of ``T5_PRECISIONS`` (None: the pipeline's dtype), else a ValueError naming
    ``--t5`` and the accepted values."""
    if precision is not None and precision not in T5_PRECISIONS:
        raise ValueError(f"unknown T5 precision --t5 {precision!r}; accepted: {', '.join(T5_PRECISIONS)} "
                         "(default: the pipeline's --dtype)")
    if precision == "int8" and not any(importlib.util.find_spec(m) for m in ("torchao", "bitsandbytes")):
        raise ValueError("--t5 int8 needs torchao (pip install 'pixsigma[int8]', or torchao from requirements.txt)")
    return precision


def t5_compute_dtype(precision: str | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype T5 computes in: ``precision``'s float type; for int8 (and None) the pipeline's ``dtype``, but
    bf16 for fp16, in which T5's activations overflow."""
    if precision in _FLOAT:
        return _FLOAT[precision]
    if precision == "int8" and dtype == torch.float16:
        return torch.bfloat16
    return dtype


def int8_backend(device: torch.device, offload: bool) -> str:
    """``bitsandbytes`` on CUDA when installed and T5 stays there, else ``torchao``."""
    if device.type == "cuda" and not offload and importlib.util.find_spec("bitsandbytes") is not None:
        return "bitsandbytes"
    return "torchao"


def quantization_config(backend: str):
    """transformers' quantisation config of 8-bit weight-only ``backend``."""
    if backend == "bitsandbytes":
        return BitsAndBytesConfig(load_in_8bit=True)
    if importlib.util.find_spec("torchao") is None:
        raise ValueError("--t5 int8 here needs torchao (bitsandbytes serves only a CUDA T5 that is not offloaded): "
                         "pip install 'pixsigma[int8]'")
    with quiet_torchao():  # transformers imports torchao on first use of its config
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(quant_type=Int8WeightOnlyConfig())


def load_t5(folder: str | os.PathLike, precision: str | None, dtype: torch.dtype, device: torch.device,
            offload: bool = False) -> torch.nn.Module:
    """The ``T5EncoderModel`` of ``folder`` at ``precision`` (None: ``dtype``), in eval mode, on ``device`` or,
    with ``offload``, on the CPU (pinned where CUDA is available: ``keep_on_host``)."""
    check_t5_precision(precision)
    home = torch.device("cpu") if offload else device
    compute = t5_compute_dtype(precision, dtype)
    if precision != "int8":
        model = T5EncoderModel.from_pretrained(Path(folder), dtype=compute).to(home)
    else:
        backend = int8_backend(device, offload)
        model = T5EncoderModel.from_pretrained(Path(folder), dtype=compute, device_map={"": str(home)},
                                               quantization_config=quantization_config(backend))
    model.eval()
    return keep_on_host(model) if offload else model


def _slots(module: torch.nn.Module):
    """(owner, '_parameters' | '_buffers', name, tensor) of every tensor a module holds."""
    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(owner, kind).items():
                if t is not None:
                    yield owner, kind, name, t


def _pinned(t: torch.Tensor) -> torch.Tensor:
    try:
        p = t.detach().pin_memory()
    except (RuntimeError, NotImplementedError, TypeError):  # a tensor subclass without pinning stays pageable
        return t
    return torch.nn.Parameter(p, requires_grad=False) if isinstance(t, torch.nn.Parameter) else p


def keep_on_host(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` (on the CPU) with its tensors in pinned memory where CUDA is available (without CUDA there is
    no pinned memory: nothing changes), remembered as its host copy for ``to_host``."""
    if not torch.cuda.is_available():
        return module
    moved: dict[int, torch.Tensor] = {}  # tied weights (T5's shared embedding) stay one tensor
    host = []
    for owner, kind, name, t in list(_slots(module)):
        p = moved.setdefault(id(t), _pinned(t))
        getattr(owner, kind)[name] = p
        host.append((owner, kind, name, p))
    setattr(module, _HOST, host)
    return module


def to_device(module: torch.nn.Module, device: torch.device) -> None:
    """An offloaded encoder onto ``device`` for an encoding (its host copy stays)."""
    host = getattr(module, _HOST, None)
    if host is None:
        module.to(device)
        return
    moved: dict[int, torch.Tensor] = {}
    for owner, kind, name, t in host:
        if id(t) not in moved:
            d = t.detach().to(device, non_blocking=True)
            moved[id(t)] = torch.nn.Parameter(d, requires_grad=False) if isinstance(t, torch.nn.Parameter) else d
        getattr(owner, kind)[name] = moved[id(t)]


def to_host(module: torch.nn.Module) -> None:
    """An offloaded encoder back to its pinned host copy (no copy of the weights), else to the CPU."""
    host = getattr(module, _HOST, None)
    if host is None or any(t.device.type != "cpu" for *_, t in host):
        module.to("cpu")
        if host is not None:  # moved behind our back: pin afresh
            delattr(module, _HOST)
            keep_on_host(module)
        return
    for owner, kind, name, t in host:
        getattr(owner, kind)[name] = t


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, through tensor subclasses (an int8 weight: its int8 data and its scales)."""
    if hasattr(t, "__tensor_flatten__"):  # plain tensors and parameters have none
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def module_bytes(module: torch.nn.Module) -> int:
    """Parameter and buffer memory of ``module``, each tied tensor counted once."""
    seen: dict[int, int] = {}
    for *_, t in _slots(module):
        seen.setdefault(id(t), tensor_bytes(t))
    return sum(seen.values())


def quantised_linears(module: torch.nn.Module) -> list[str]:
    """Names of the linear layers whose weight is stored in 8 bits."""
    out = []
    for name, m in module.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Linear8bitLt":
            if w is not None and (w.dtype == torch.int8 or type(w).__name__ in ("Int8Tensor", "Int8Params")
                                  or "int8" in type(w).__name__.lower()):
                out.append(name)
    return out
