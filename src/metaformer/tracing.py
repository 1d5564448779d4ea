"""Whether code runs eagerly, or under one of PyTorch's tracers and compilers.

Input checks (shapes, dtypes, a mixer's output shape) speak only in eager calls: under FX symbolic
tracing the tensors are proxies, and under ``torch.jit.trace``, ONNX export and ``torch.compile`` a
Python-level check would print tracer warnings or add guards for nothing. TorchScript skips them
through ``torch.jit.is_scripting()`` at the call site.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["is_eager"]


def is_eager(x: Any) -> bool:
    """True unless ``x`` is an FX proxy or a jit trace, an ONNX export or torch.compile is running."""
    return not (isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or torch.compiler.is_compiling())
