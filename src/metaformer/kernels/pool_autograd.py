"""The fused pooling half with a written-out backward (CPU training).

``y = res_scale[c] * x + weight[c] * rstd[b] * sample_scale[b] * (pool(x) - x)`` (see
:func:`metaformer.kernels.pool_mixer_residual`). Autograd through the PyTorch formulation keeps the
centred input, the pooled tensor and the intermediates of ``lerp`` and ``addcmul``, and its backward
makes a dozen passes; this node keeps only ``x`` (the block's input, alive anyway) and two numbers
per sample, and its backward recomputes ``d = pool(x - mean) - (x - mean)`` (centred: see "Precision"
in ``docs/kernels.md``) and writes::

    S[b, c]  = sum_hw dy * d                           (one product, one reduction)
    d weight = sum_b S * rstd * sample,   d res_scale = sum_bhw dy * x,   d sample = rstd * sum_c weight * S
    dx = pool^T(coef * dy) + (res_scale - coef) * dy + k[b] * (x - mean),
         coef = weight * rstd * sample,   k[b] = -rstd^3 / N * sample * sum_c weight * S

with ``pool^T`` the adjoint of the count_include_pad=False pooling (``avg_pool2d_backward``) and the
last term the path through ``rstd`` (``d rstd / dx = -rstd^3 (x - mean) / N``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .torch_impl import _acc_dtype, avg_pool_same, pool_mixer_residual_reference, sample_moments
from .twice import grads_through

__all__ = ["PoolHalfFunction", "pool_half_autograd"]


class PoolHalfFunction(torch.autograd.Function):
    """One autograd node for the fused pooling half; use :func:`pool_half_autograd`."""

    @staticmethod
    def forward(ctx, x, weight, res_scale, sample_scale, eps, pool_size):
        acc = _acc_dtype(x.dtype)
        mean, rstd = sample_moments(x, eps)
        mean = mean.view(-1, 1, 1, 1)
        coef_b = rstd if sample_scale is None else rstd * sample_scale.to(acc)
        coef = (coef_b[:, None] * weight.to(acc)[None, :]).to(x.dtype)[:, :, None, None]
        y = torch.lerp(x, avg_pool_same(x, pool_size), coef)
        if res_scale is not None:
            y = torch.addcmul(y, x, (res_scale.to(acc) - 1).to(y.dtype)[:, None, None])
        ctx.eps, ctx.pool_size = eps, pool_size
        ctx.save_for_backward(x, weight, res_scale, sample_scale, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, res_scale, sample_scale, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        k = ctx.pool_size
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients (kernels/twice.py)
            plain = lambda x, w, r, s: pool_mixer_residual_reference(  # noqa: E731
                x, w, eps=ctx.eps, pool_size=k, res_scale=r, sample_scale=s)
            return grads_through(plain, (x, weight, res_scale, sample_scale), need, dy, 6)
        acc = _acc_dtype(x.dtype)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
            else torch.contiguous_format
        dy = dy.contiguous(memory_format=fmt)
        xm = (x - mean).to(x.dtype)  # centred input, in x's layout
        d = avg_pool_same(xm, k).sub_(xm)
        s = (dy * d).sum((2, 3), dtype=acc)  # (B, C)
        del d
        ss = sample_scale.to(acc) if sample_scale is not None else None
        w = weight.to(acc)
        ws = (s * w).sum(1)  # sum_c weight * S, (B,)
        grads = [None] * 6
        if need[1]:
            grads[1] = (s * (rstd if ss is None else rstd * ss)[:, None]).sum(0).to(weight.dtype)
        if need[3]:
            grads[3] = (rstd * ws).to(sample_scale.dtype)
        if need[2]:
            grads[2] = (dy * x).sum((0, 2, 3), dtype=acc).to(res_scale.dtype)
        if need[0]:
            coef_b = rstd if ss is None else rstd * ss
            coef = coef_b[:, None] * w[None, :]
            u = dy * coef.to(dy.dtype)[:, :, None, None]
            pad = k // 2
            dx = torch.ops.aten.avg_pool2d_backward(u, xm, [k, k], [1, 1], [pad, pad], False, False, None)
            rs = res_scale.to(acc)[None, :] if res_scale is not None else 1.0
            dx = dx.contiguous(memory_format=fmt).addcmul_(dy, (rs - coef).to(dy.dtype)[:, :, None, None])
            n = x[0].numel()
            kb = -(rstd ** 3) / n * ws * (1.0 if ss is None else ss)
            grads[0] = dx.addcmul_(xm, kb.to(x.dtype)[:, None, None, None])
        return tuple(grads)


def pool_half_autograd(x: torch.Tensor, weight: torch.Tensor, *, eps: float, pool_size: int = 3,
                       res_scale: Optional[torch.Tensor] = None,
                       sample_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`metaformer.kernels.pool_mixer_residual` as one autograd node (inputs already validated)."""
    return PoolHalfFunction.apply(x, weight, res_scale, sample_scale, eps, pool_size)
