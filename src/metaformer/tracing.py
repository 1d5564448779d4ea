"""Whether code runs eagerly, or under one of PyTorch's tracers and compilers.

Input checks (shapes, dtypes, a mixer's output shape) speak only in eager calls: under FX symbolic
tracing the tensors are proxies, and under ``torch.jit.trace``, ONNX export and ``torch.compile`` a
Python-level check would print tracer warnings or add guards for nothing. TorchScript skips them
through ``torch.jit.is_scripting()`` at the call site.

Whether autocast is on, and its dtype, per device, on every PyTorch the library supports (the device
argument of ``torch.is_autocast_enabled`` and ``torch.get_autocast_dtype`` is new in 2.4).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["is_eager", "autocast_enabled", "autocast_dtype", "fp32_list_dtype"]


def is_eager(x: Any) -> bool:
    """True unless ``x`` is an FX proxy or a jit trace, an ONNX export or torch.compile is running."""
    return not (isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or torch.compiler.is_compiling())


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``"cuda"`` or ``"cpu"``)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: one function per device, the plain one for CUDA
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype autocast casts to on ``device_type`` (``"cuda"`` or ``"cpu"``)."""
    try:
        return torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError):  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def fp32_list_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype an op on CUDA autocast's float32 list (``layer_norm``, ``group_norm``) returns for an input of
    ``dtype``: float32 under CUDA autocast (fp64 stays fp64), else ``dtype`` (CPU autocast lists neither)."""
    if device_type == "cuda" and dtype != torch.float64 and autocast_enabled("cuda"):
        return torch.float32
    return dtype
