"""Pure-PyTorch fused formulation of the PoolFormer token-mixer half-block.

Uses the identity (count_include_pad=False pooling weights sum to one at every position)::

    pool(GN(x)) - GN(x) == gamma[c] * rstd[b] * (pool(x) - x)

so the half-block needs the per-sample ``rstd`` and one pooling pass over ``x`` itself; the
normalised tensor is never materialised. Only standard ops are used (mean, sub, square, rsqrt,
avg_pool2d, lerp, mul/add), so the function works under autograd, ``torch.compile(fullgraph=True)``,
``torch.export`` and ONNX export, in both contiguous and channels_last memory formats.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..tracing import is_eager, sample_rows

__all__ = ["pool_mixer_residual_torch", "pool_mixer_residual_reference", "sample_rstd", "sample_moments",
           "avg_pool_same", "cuda_channels_last_pool_backward_ok", "wants_grad",
           "writable_temporary"]

_DIMS = (1, 2, 3)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the statistics are accumulated in: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _moment_rows(x: torch.Tensor) -> Optional[torch.Tensor]:
    """:func:`sample_rows` where :func:`sample_moments` takes the statistics from ATen's GroupNorm: an eager
    CPU fp32/fp64 ``x`` that needs no gradient, laid out in one of the two layouts."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or wants_grad(x) \
            or not is_eager(x):
        return None
    return sample_rows(x)


def sample_moments(x: torch.Tensor, eps: float):
    """Per-sample ``(mean, rstd)`` over (C, H, W), as one-group GroupNorm computes them; both (B,).

    In the statistics' dtype (fp32, fp64 for fp64 inputs). For an eager CPU fp32/fp64 input that needs no
    gradient, ATen's GroupNorm kernel on :func:`sample_rows` (its Welford moments; the normalised tensor it
    also writes is dropped): 0.5-0.65x the time of the two passes below on the blocks' shapes (a 2-core
    Xeon, fp32, batch 16). Otherwise two passes: the mean, then the mean of squared deviations (as accurate as
    ``torch.var``; ``torch.var_mean``'s Welford loop does not vectorise for this reduction on CPU and took
    3.6-5.4x as long). Half-precision inputs are promoted to fp32 by the subtraction, without a cast pass.
    """
    rows = _moment_rows(x)
    if rows is not None:
        b = x.shape[0]
        _, mean, rstd = torch.native_group_norm(rows, None, None, b, 1, rows.shape[2], 1, eps)
        return mean.view(b), rstd.view(b)
    acc = _acc_dtype(x.dtype)
    mean = x.mean(_DIMS, keepdim=True, dtype=acc)
    var = (x - mean).square_().mean(_DIMS)
    return mean.view(-1), torch.rsqrt(var + eps)


def sample_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample reciprocal standard deviation over (C, H, W), as one-group GroupNorm computes it.

    Args:
        x: (B, C, H, W) tensor.
        eps: Added to the (biased) variance before the reciprocal square root.

    Returns:
        (B,) tensor in fp32 (fp64 for fp64 inputs); see :func:`sample_moments` for how it is computed.
    """
    return sample_moments(x, eps)[1]


def _centred_stats(x: torch.Tensor, eps: float):
    """``(mean, rstd, x - mean)``: the sample mean (B, 1, 1, 1), rstd (B,) and the centred input.

    Computed as in ``sample_rstd``; the centred input is in the statistics' dtype (fp32 for half
    inputs) and kept, so the variance needs a temporary of its own. The mean is detached: any
    per-sample constant may be subtracted before pooling (the pooling weights sum to one), and the
    variance's gradient through the mean is zero (the deviations sum to zero), so the gradients are
    exact without differentiating through it.
    """
    mean = x.detach().mean(_DIMS, keepdim=True, dtype=_acc_dtype(x.dtype))
    xm = x - mean
    var = xm.square().mean(_DIMS)
    return mean, torch.rsqrt(var + eps), xm


def avg_pool_same(x: torch.Tensor, pool_size: int) -> torch.Tensor:
    """Stride-1 'same' average pooling with count_include_pad=False, in x's memory format.

    On CPU, ATen's NCHW avg_pool2d kernel is several times slower than its channels_last one
    (measured ~16 ms vs ~3 ms on a (16, 64, 56, 56) fp32 tensor, 2 threads), and the two layout
    conversions cost less than the difference, so contiguous CPU inputs are pooled in
    channels_last. The branch depends only on the device and strides, which torch.compile
    and torch.export treat as static.

    On CUDA, some PyTorch releases compute the channels_last backward of a padded avg_pool2d wrong
    (pytorch/pytorch#188344: the NHWC backward kernel omits the padding offset; silently wrong input
    gradients). Where :func:`cuda_channels_last_pool_backward_ok` finds that on the device, a
    channels_last input that needs a gradient is pooled in NCHW (correct there) and the result turned
    back into channels_last.
    """
    pad = pool_size // 2
    if x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous() and x.shape[1] > 1:
        xc = x.contiguous(memory_format=torch.channels_last)
        return F.avg_pool2d(xc, pool_size, 1, pad, count_include_pad=False).contiguous()
    if (x.device.type == "cuda" and x.requires_grad and torch.is_grad_enabled() and not x.is_contiguous()
            and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling() and not cuda_channels_last_pool_backward_ok(x.device)):
        y = F.avg_pool2d(x.contiguous(), pool_size, 1, pad, count_include_pad=False)
        return y.contiguous(memory_format=torch.channels_last)
    return F.avg_pool2d(x, pool_size, 1, pad, count_include_pad=False)


_POOL_BACKWARD_OK: dict = {}


def cuda_channels_last_pool_backward_ok(device) -> bool:
    """Whether this PyTorch computes the channels_last CUDA backward of a padded, count_include_pad=False
    avg_pool2d right on ``device`` (pytorch/pytorch#188344), probed once per device on a small tensor
    against the NCHW backward. During CUDA-graph capture nothing is probed and False is returned (the
    NCHW detour is right either way)."""
    device = torch.device(device)
    key = (device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key in _POOL_BACKWARD_OK:
        return _POOL_BACKWARD_OK[key]
    if torch.cuda.is_current_stream_capturing():
        return False
    with torch.enable_grad(), torch.autocast("cuda", enabled=False):
        x = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32, device=device).reshape(2, 3, 5, 4)
        g = torch.linspace(-1.0, 1.0, x.numel(), device=device).reshape(x.shape)
        grads = []
        for fmt in (torch.contiguous_format, torch.channels_last):
            leaf = x.contiguous(memory_format=fmt).requires_grad_(True)
            y = F.avg_pool2d(leaf, 3, 1, 1, count_include_pad=False)
            (gx,) = torch.autograd.grad(y, leaf, g.contiguous(memory_format=fmt))
            grads.append(gx)
        ok = bool(torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6))
    _POOL_BACKWARD_OK[key] = ok
    return ok


def wants_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd needs a graph through any of ``tensors`` (None entries allowed): gradients are on
    and one of them requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def writable_temporary(*inputs: Optional[torch.Tensor]) -> bool:
    """Whether a new tensor that a fast path made (a norm's or pooling's output) may be written in place to
    save allocating another: in eager mode (traced graphs expect the ops out of place) and where no gradient
    is wanted of any of ``inputs`` (an in-place op could overwrite what the backward reads)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return not wants_grad(*inputs)


def pool_mixer_residual_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float,
    pool_size: int = 3,
    res_scale: torch.Tensor | None = None,
    sample_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused token-mixer half-block in plain PyTorch ops (see ``pool_mixer_residual``).

    Computes ``res_scale[c] * x + weight[c] * rstd[b] * sample_scale[b] * (avgpool(x) - x)``.
    Inputs are assumed validated by the caller.
    """
    acc = _acc_dtype(x.dtype)
    grad = wants_grad(x, weight, res_scale, sample_scale)
    if grad:
        # Pool the centred input: pool(x) - x == pool(x - m) - (x - m) for any per-sample m, and
        # without the centring the weight gradient sum(g * (pool(x) - x)) cancels: both terms carry
        # the rounding error of |mean| (at x ~ 300 + 3 randn, fp32, it lost two digits).
        mean, rstd, src = _centred_stats(x, eps)
    else:
        # Forward only: uncentred pooling is exact to the rounding of y itself (the error of
        # pool(x) ~ ulp(|x|) is multiplied by c < 1) and saves two passes over x on CPU.
        mean, rstd, src = None, sample_rstd(x, eps), x
    if sample_scale is not None:
        rstd = rstd * sample_scale.to(acc)
    # (unsqueeze, not `rstd[:, None]`: PyTorch 2.6's torch.export guards a sliced batch axis against 2**63 - 1,
    # which a dynamic batch dimension then violates)
    coef = (rstd.unsqueeze(1) * weight.to(acc).unsqueeze(0)).to(src.dtype).unsqueeze(-1).unsqueeze(-1)
    # lerp(s, p, c) = s + c * (p - s) in a single pass; it evaluates c * (p - s) directly for c < 0.5
    # (always the case with layer-scale-sized weights), so it is exact to rounding, and its weight
    # gradient is sum(g * (p - s)), free of the cancellation of sum(g * p) - sum(g * s).
    pooled = avg_pool_same(src, pool_size)
    # The result is written over the pooled tensor (a temporary of ours) where that may be: it saves
    # allocating a block-sized output.
    inplace = not grad and writable_temporary() and pooled.dtype == src.dtype
    y = torch.lerp(src, pooled, coef, out=pooled) if inplace else torch.lerp(src, pooled, coef)
    if mean is not None:
        y = y.add_(mean)  # in place is safe: lerp does not save its output for backward
    if res_scale is not None:
        rs1 = (res_scale.to(acc) - 1).to(y.dtype)[:, None, None]
        y = y.addcmul_(x, rs1) if inplace else torch.addcmul(y, x, rs1)
    return y.to(x.dtype)


def pool_mixer_residual_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float,
    pool_size: int = 3,
    res_scale: torch.Tensor | None = None,
    sample_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain, unfused composition: GroupNorm(1) then AvgPool2d, minus the normalised input.

    Mathematically equal to ``pool_mixer_residual_torch``; the GroupNorm is applied without affine
    (the bias cancels and the per-channel gain is already folded into ``weight``).
    """
    n = F.group_norm(x, 1, None, None, eps)
    mix = F.avg_pool2d(n, pool_size, 1, pool_size // 2, count_include_pad=False) - n
    w = weight.to(x.dtype)[None, :, None, None]
    if sample_scale is not None:
        w = w * sample_scale.to(x.dtype)[:, None, None, None]
    res = x if res_scale is None else x * res_scale.to(x.dtype)[:, None, None]
    return res + w * mix
