"""Shared checks of metaformer.kernels against the plain GroupNorm + AvgPool2d composition.

The oracle is written here from the definition, independently of the code under test. Used by
the pytest modules (test_kernels*.py) and by the Triton-interpreter script, which runs in a
subprocess (the interpreter must be switched on before triton is imported).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import metaformer.kernels as K

EPS = 1e-5


def oracle(x, w, r=None, s=None, eps=EPS, k=3):
    """res_scale * x + (w * s) * (pool(GN(x)) - GN(x)), GN = GroupNorm(1) with unit affine."""
    n = F.group_norm(x, 1, None, None, eps)
    mix = F.avg_pool2d(n, k, 1, k // 2, count_include_pad=False) - n
    scale = w[None, :, None, None]
    if s is not None:
        scale = scale * s[:, None, None, None]
    res = x if r is None else x * r[None, :, None, None]
    return res + scale * mix


def inputs(shape, dtype=torch.float32, channels_last=False, with_r=False, with_s=False, seed=0):
    """(x, weight, res_scale or None, sample_scale or None, dy), drawn in fp64 and cast."""
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.7 + 0.6).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    r = (1 + 0.3 * torch.randn(C, generator=g, dtype=torch.float64)).to(dtype) if with_r else None
    s = (torch.rand(B, generator=g, dtype=torch.float64) + 0.5).to(dtype) if with_s else None
    gy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, r, s, gy


def run(fn, x, w, r, s, gy, k=3, cast=None):
    """Output and grads (x, w, r, s) of fn; with cast, inputs are first cast to that dtype."""
    leaves = [t if t is None else t.detach().clone().requires_grad_(True) for t in (x, w, r, s)]
    ins = [t if (t is None or cast is None) else t.to(cast) for t in leaves]
    y = fn(ins[0], ins[1], r=ins[2], s=ins[3], k=k)
    gy = gy if cast is None else gy.to(cast)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], gy)
    return y, grads


def fused(x, w, r=None, s=None, k=3):
    return K.pool_mixer_residual(x, w, eps=EPS, pool_size=k, res_scale=r, sample_scale=s)


def ref(x, w, r=None, s=None, k=3):
    return oracle(x, w, r, s, EPS, k)


def check(shape, dtype, channels_last, with_r, with_s, k=3, seed=0):
    """Forward and all gradients of the selected backend against the oracle."""
    x, w, r, s, gy = inputs(shape, dtype, channels_last, with_r, with_s, seed)
    y, grads = run(fused, x, w, r, s, gy, k)
    assert y.dtype == dtype and y.shape == x.shape
    if dtype in (torch.float32, torch.float64):
        y_ref, grads_ref = run(ref, x, w, r, s, gy, k)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(y, y_ref, **tol)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    else:  # half precision: against an fp32 oracle on the same (rounded) inputs
        y_ref, grads_ref = run(ref, x, w, r, s, gy, k, cast=torch.float32)
        torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)
        for a, b in zip(grads, grads_ref):
            # reductions (weight / scale grads) are compared relative to their magnitude
            scale = max(1.0, b.abs().max().item())
            torch.testing.assert_close(a.float() / scale, b.float() / scale, rtol=3e-2, atol=3e-2)
    return y


def _errors(fn, x64, w, r, s, gy, dtype, device="cpu"):
    """Max abs error / largest magnitude of y - x and each gradient, vs the float64 oracle
    (``gy=None``: dy = 1 broadcast, all strides 0, as ``y.sum().backward()`` makes it)."""
    def outs(f, dt):
        leaves = [t.detach().to(device=device, dtype=dt).requires_grad_(True) for t in (x64, w, r, s)]
        y = f(*leaves)
        g = torch.ones((), dtype=dt, device=device).expand(y.shape) if gy is None else gy.to(device=device, dtype=dt)
        grads = torch.autograd.grad(y, leaves, g)
        return [y.detach().double() - leaves[0].detach().double(), *[g.double() for g in grads]]

    want = outs(lambda x, w, r, s: oracle(x, w, r, s), torch.float64)
    got = outs(fn, dtype)
    names = ("y - x", "dx", "d weight", "d res_scale", "d sample_scale")
    return {n: ((a - b).abs().max() / b.abs().max()).item() for n, a, b in zip(names, got, want)}


def check_large_mean(shape, offset, channels_last=False, ones_grad=True, seed=0, device="cpu"):
    """fp32 accuracy of the selected backend on x = offset + 3 randn against float64: every output
    (y - x and all gradients) must be as accurate as the plain GroupNorm + AvgPool2d composition in
    fp32 (within 4x, plus 2e-6 relative). ``ones_grad``: dy = 1 broadcast (the ``y.sum()`` gradient,
    where the weight gradient sums pool(x) - x over everything and the cancellation is worst)."""
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + offset
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, generator=g, dtype=torch.float64)
    r = 1 + 0.3 * torch.randn(C, generator=g, dtype=torch.float64)
    s = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    gy = None if ones_grad else torch.randn(shape, generator=g, dtype=torch.float64)

    def fused_fn(x, w, r, s):
        return K.pool_mixer_residual(x, w, eps=EPS, res_scale=r, sample_scale=s)

    plain = _errors(lambda x, w, r, s: oracle(x, w, r, s), x, w, r, s, gy, torch.float32, device)
    got = _errors(fused_fn, x, w, r, s, gy, torch.float32, device)
    bad = {n: (got[n], plain[n]) for n in got if not got[n] <= 4 * plain[n] + 2e-6}
    assert not bad, (f"offset {offset}: relative errors (fused, plain fp32) {bad}; all: fused {got}, "
                     f"plain {plain}")
    return got, plain
