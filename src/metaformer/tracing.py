"""Whether code runs eagerly, or under one of PyTorch's tracers and compilers.

Input checks (shapes, dtypes, a mixer's output shape) speak only in eager calls: under FX symbolic
tracing the tensors are proxies, and under ``torch.jit.trace``, ONNX export and ``torch.compile`` a
Python-level check would print tracer warnings or add guards for nothing. TorchScript skips them
through ``torch.jit.is_scripting()`` at the call site.

Whether autocast is on, and its dtype, per device, on every PyTorch the library supports (the device
argument of ``torch.is_autocast_enabled`` and ``torch.get_autocast_dtype`` is new in 2.4).

:func:`group_norm`: ``F.group_norm``, working around a crash of PyTorch's CPU GroupNorm backward before 2.14 and
the lost digits of its channels_last kernel (:func:`sample_rows`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

__all__ = ["is_eager", "autocast_enabled", "autocast_dtype", "fp32_list_dtype", "group_norm", "channels_last_only",
           "sample_rows", "from_sample_rows"]


def _release(version: str) -> tuple:
    """``(major, minor)`` of a version string (PyTorch's ``"2.13.0+cpu"``, ``"2.15.0a0+git..."``; Triton's)."""
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


_TORCH_RELEASE = _release(torch.__version__)
# Decided once from the release rather than by catching an error: under torch.compile a call that PyTorch 2.3
# refuses raises Dynamo's own error, not the TypeError that an eager call raises.
# torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device): new in 2.4.
PER_DEVICE_AUTOCAST = _TORCH_RELEASE >= (2, 4)
# torch.compile reads a module's instance __dict__ (guards.module_hooked): from 2.4.
DYNAMO_READS_DICT = _TORCH_RELEASE >= (2, 4)


def is_eager(x: Any) -> bool:
    """True unless ``x`` is an FX proxy or a jit trace, an ONNX export or torch.compile is running."""
    return not (isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or torch.compiler.is_compiling())


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``"cuda"`` or ``"cpu"``)."""
    if PER_DEVICE_AUTOCAST:
        return torch.is_autocast_enabled(device_type)
    # torch < 2.4: one function per device, the plain one for CUDA
    return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype autocast casts to on ``device_type`` (``"cuda"`` or ``"cpu"``)."""
    if PER_DEVICE_AUTOCAST:
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def fp32_list_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype an op on CUDA autocast's float32 list (``layer_norm``, ``group_norm``) returns for an input of
    ``dtype``: float32 under CUDA autocast (fp64 stays fp64), else ``dtype`` (CPU autocast lists neither)."""
    if device_type == "cuda" and dtype != torch.float64 and autocast_enabled("cuda"):
        return torch.float32
    return dtype


# PyTorch before 2.14 crashes the process (SIGSEGV) in the CPU backward of ``F.group_norm`` on a channels_last
# input that needs no gradient while the weight or bias needs one (measured: 2.3.1, 2.4.1, 2.5.1, 2.6.0, 2.9.1
# and 2.13.0 crash; 2.14.0 and 2.14.1 do not). Fine-tuning the later stages of a model whose earlier ones are
# frozen meets exactly that, and on CPU the fast paths run the blocks in channels_last.
GROUP_NORM_BACKWARD_CRASHES = _TORCH_RELEASE < (2, 14)


def channels_last_only(t: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels_last and not also NCHW-contiguous (as a map of one pixel or channel is)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def sample_rows(x: torch.Tensor) -> Optional[torch.Tensor]:
    """Each sample's elements as one row, a (B, 1, C*H*W) view in ``x``'s memory order (no copy), or None.

    A view exists for an NCHW-contiguous or a channels_last ``x``. One-group GroupNorm without an affine
    is the same on any order of a sample's elements, so it may run on this view: ATen's CPU GroupNorm
    takes its contiguous kernel there, whose Welford moments are exact to rounding, where its channels_last
    kernel takes the variance as ``E[x^2] - E[x]^2`` in fp32 and loses digits to cancellation when a sample's
    mean is large against its spread (relative error of rstd 4e-4 at mean 100, spread 3; 3.5e-3 at 300).
    """
    b, c, h, w = x.shape
    if x.is_contiguous():
        return x.view(b, 1, c * h * w)
    if channels_last_only(x):
        return x.permute(0, 2, 3, 1).view(b, 1, c * h * w)
    return None


def from_sample_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The (B, C, H, W) map of ``rows`` (B, 1, C*H*W) laid out as :func:`sample_rows` of ``like`` (a view)."""
    b, c, h, w = like.shape
    if like.is_contiguous():
        return rows.view(b, c, h, w)
    return rows.view(b, h, w, c).permute(0, 3, 1, 2)


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float, guard: bool = GROUP_NORM_BACKWARD_CRASHES, affine_in_place: bool = False) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)``, in ``x``'s layout, working around two faults of ATen's
    CPU GroupNorm on channels_last inputs:

    - one group: the channels_last kernel takes the variance as ``E[x^2] - E[x]^2`` in fp32 and loses digits
      where a sample's mean is large against its spread (max abs error 1.6e-3 at mean 100, spread 3, on a
      (16, 64, 56, 56) map; PyTorch 2.14). The norm without its affine runs on :func:`sample_rows`, whose
      contiguous kernel (Welford moments) is exact to rounding, and the per-channel affine follows
      (``addcmul``): one more pass, and no crash below either. With ``affine_in_place`` (a caller that needs
      no graph) the affine is written over the norm's output rather than into a new tensor;
    - on a PyTorch whose CPU backward would crash (:data:`GROUP_NORM_BACKWARD_CRASHES`: a 4-D CPU ``x`` that is
      not contiguous and needs no gradient, with a weight or bias that needs one), more groups are computed
      on a contiguous copy of ``x`` and returned channels_last where ``x`` is.

    TorchScript compiles it too: ``guard`` (the flag, as a default argument, because TorchScript reads no global
    variable) is a constant of the scripted code.
    """
    if num_groups == 1 and isinstance(x, torch.Tensor) and x.device.type == "cpu" and channels_last_only(x):
        # ATen's channels_last CPU kernel loses digits (sample_rows): its contiguous one, on each sample's row
        rows = sample_rows(x)
        assert rows is not None
        n = from_sample_rows(F.group_norm(rows, 1, None, None, eps), x)
        if weight is not None and bias is not None:
            w, b = weight.view(1, -1, 1, 1), bias.view(1, -1, 1, 1)
            return torch.addcmul(b, n, w, out=n) if affine_in_place else torch.addcmul(b, n, w)
        if weight is not None:
            return n.mul_(weight.view(1, -1, 1, 1)) if affine_in_place else n * weight.view(1, -1, 1, 1)
        if bias is not None:
            return n.add_(bias.view(1, -1, 1, 1)) if affine_in_place else n + bias.view(1, -1, 1, 1)
        return n
    if (guard and isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu"
            and not x.is_contiguous() and torch.is_grad_enabled() and not x.requires_grad
            and ((weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad))):
        y = F.group_norm(x.contiguous(), num_groups, weight, bias, eps)
        cl = x.is_contiguous(memory_format=torch.channels_last)
        return y.contiguous(memory_format=torch.channels_last) if cl else y
    return F.group_norm(x, num_groups, weight, bias, eps)
