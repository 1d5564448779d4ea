"""Triton kernels for the fused PoolFormer token-mixer half-block.

Forward (two launches for the statistics, one for the output):

1. ``_stats_partial_kernel``: each program loads one chunk of one sample (samples are dense in
   both contiguous and channels_last layouts) and writes the chunk's mean and sum of squared
   deviations (M2) in fp32 (fp64 for fp64 inputs).
2. ``_stats_combine_kernel``: one program per sample merges the chunk partials with Chan's
   parallel formula into ``mean[b]`` and ``rstd[b] = 1 / sqrt(M2 / N + eps)``.
3. ``_fwd_kernel``: the stencil ``y = r[c] x + w[c] rstd[b] s[b] (avgpool(x) - x)`` with the
   count_include_pad=False divisor (number of in-bounds neighbours), for any odd pool size.

Backward (two launches plus a few ops on (B, C) tensors): ``_bwd_reduce_kernel`` recomputes the
pooling and reduces ``T[b, c] = sum_hw g (avgpool(x) - x)`` and ``G[b, c] = sum_hw g x``;
``_bwd_dx_kernel`` applies the transposed stencil (each output's contribution divided by the
OUTPUT position's count) plus the term that flows through ``rstd``:
``d rstd[b] / d x = -rstd[b]^3 (x - mean[b]) / N``.

Only ``x``, ``mean``, ``rstd`` and the small vectors are saved for backward.

The kernels address elements as ``base + c * stride_c + (h * W + w) * stride_w``, which covers
both dense layouts (NCHW: stride_w = 1; channels_last: stride_c = 1, stride_h = W * stride_w);
anything else is made contiguous first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["pool_mixer_residual_triton", "sample_stats_triton"]

_STATS_CHUNK = 4096
_TILE = 1024  # elements per program in the stencil kernels
_BWD_ITERS = 4  # pixel tiles per program in the backward reduction


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _stats_partial_kernel(x_ptr, pmean_ptr, pm2_ptr, N, NCHUNK, CHUNK: tl.constexpr, ACC: tl.constexpr):
    chunk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < N
    v = tl.load(x_ptr + b * N + offs, mask=mask, other=0.0).to(ACC)
    n = tl.minimum(N - chunk * CHUNK, CHUNK).to(ACC)
    m = tl.sum(v, axis=0) / n
    d = tl.where(mask, v - m, 0.0)
    m2 = tl.sum(d * d, axis=0)
    tl.store(pmean_ptr + b * NCHUNK + chunk, m)
    tl.store(pm2_ptr + b * NCHUNK + chunk, m2)


@triton.jit
def _stats_combine_kernel(
    pmean_ptr,
    pm2_ptr,
    mean_ptr,
    rstd_ptr,
    N,
    NCHUNK,
    eps,
    CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    base = b * NCHUNK
    total = tl.zeros([BLOCK_R], dtype=ACC)
    for start in range(0, NCHUNK, BLOCK_R):
        i = start + tl.arange(0, BLOCK_R)
        mask = i < NCHUNK
        n_i = tl.minimum(N - i * CHUNK, CHUNK).to(ACC)
        m_i = tl.load(pmean_ptr + base + i, mask=mask, other=0.0)
        total += tl.where(mask, n_i * m_i, 0.0)
    mean = tl.sum(total, axis=0) / N
    m2 = tl.zeros([BLOCK_R], dtype=ACC)
    for start in range(0, NCHUNK, BLOCK_R):
        i = start + tl.arange(0, BLOCK_R)
        mask = i < NCHUNK
        n_i = tl.minimum(N - i * CHUNK, CHUNK).to(ACC)
        m_i = tl.load(pmean_ptr + base + i, mask=mask, other=0.0)
        q_i = tl.load(pm2_ptr + base + i, mask=mask, other=0.0)
        dm = m_i - mean
        m2 += tl.where(mask, q_i + n_i * dm * dm, 0.0)
    var = tl.sum(m2, axis=0) / N
    tl.store(mean_ptr + b, mean)
    tl.store(rstd_ptr + b, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _count(i, L, P: tl.constexpr):
    """Number of in-bounds positions of a window of half-width P centred at i (0 <= i < L)."""
    return tl.minimum(i + P, L - 1) - tl.maximum(i - P, 0) + 1


@triton.jit
def _fwd_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    r_ptr,
    s_ptr,
    rstd_ptr,
    C,
    H,
    W,
    stride_b,
    stride_c,
    stride_w,
    K: tl.constexpr,
    HAS_R: tl.constexpr,
    HAS_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,
):
    P: tl.constexpr = K // 2
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < H * W
    mask_c = offs_c < C
    h = offs_p // W
    w = offs_p % W
    base = b * stride_b + offs_c[:, None] * stride_c
    mask = mask_c[:, None] & mask_p[None, :]

    xc = tl.load(x_ptr + base + offs_p[None, :] * stride_w, mask=mask, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for i in tl.static_range(K):
        hh = h + (i - P)
        ok_h = mask_p & (hh >= 0) & (hh < H)
        for j in tl.static_range(K):
            ww = w + (j - P)
            ok = ok_h & (ww >= 0) & (ww < W)
            nb = offs_p + ((i - P) * W + (j - P))
            acc += tl.load(
                x_ptr + base + nb[None, :] * stride_w, mask=mask_c[:, None] & ok[None, :], other=0.0
            ).to(ACC)
    cnt = tl.where(mask_p, _count(h, H, P) * _count(w, W, P), 1).to(ACC)  # 1 off-image: no 0/0
    pooled = acc / cnt[None, :]

    rs = tl.load(rstd_ptr + b).to(ACC)
    if HAS_S:
        rs = rs * tl.load(s_ptr + b).to(ACC)
    coef = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC) * rs
    out = coef[:, None] * (pooled - xc)
    if HAS_R:
        r = tl.load(r_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        out += r[:, None] * xc
    else:
        out += xc
    tl.store(y_ptr + base + offs_p[None, :] * stride_w, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_reduce_kernel(
    x_ptr,
    g_ptr,
    t_ptr,
    gx_ptr,
    C,
    H,
    W,
    stride_b,
    stride_c,
    stride_w,
    NSPLIT,
    ITERS,
    K: tl.constexpr,
    NEED_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,
):
    """Partial sums over pixels of g * (avgpool(x) - x) and (optionally) g * x."""
    P: tl.constexpr = K // 2
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    base = b * stride_b + offs_c[:, None] * stride_c
    t_acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    g_acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for it in range(0, ITERS):
        offs_p = (pid_s * ITERS + it) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < H * W
        h = offs_p // W
        w = offs_p % W
        mask = mask_c[:, None] & mask_p[None, :]
        xc = tl.load(x_ptr + base + offs_p[None, :] * stride_w, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + base + offs_p[None, :] * stride_w, mask=mask, other=0.0).to(ACC)
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
        for i in tl.static_range(K):
            hh = h + (i - P)
            ok_h = mask_p & (hh >= 0) & (hh < H)
            for j in tl.static_range(K):
                ww = w + (j - P)
                ok = ok_h & (ww >= 0) & (ww < W)
                nb = offs_p + ((i - P) * W + (j - P))
                acc += tl.load(
                    x_ptr + base + nb[None, :] * stride_w, mask=mask_c[:, None] & ok[None, :], other=0.0
                ).to(ACC)
        cnt = tl.where(mask_p, _count(h, H, P) * _count(w, W, P), 1).to(ACC)  # 1 off-image: no 0/0
        t_acc += g * (acc / cnt[None, :] - xc)
        if NEED_G:
            g_acc += g * xc
    out = (b * C + offs_c) * NSPLIT + pid_s
    tl.store(t_ptr + out, tl.sum(t_acc, axis=1), mask=mask_c)
    if NEED_G:
        tl.store(gx_ptr + out, tl.sum(g_acc, axis=1), mask=mask_c)


@triton.jit
def _bwd_dx_kernel(
    x_ptr,
    g_ptr,
    dx_ptr,
    coef_ptr,
    r_ptr,
    k_ptr,
    mean_ptr,
    C,
    H,
    W,
    stride_b,
    stride_c,
    stride_w,
    K: tl.constexpr,
    HAS_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,
):
    """dx = r g + coef (poolT(g) - g) + k[b] (x - mean[b]); poolT divides by the output's count."""
    P: tl.constexpr = K // 2
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < H * W
    mask_c = offs_c < C
    h = offs_p // W
    w = offs_p % W
    base = b * stride_b + offs_c[:, None] * stride_c
    mask = mask_c[:, None] & mask_p[None, :]

    g = tl.load(g_ptr + base + offs_p[None, :] * stride_w, mask=mask, other=0.0).to(ACC)
    xc = tl.load(x_ptr + base + offs_p[None, :] * stride_w, mask=mask, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for i in tl.static_range(K):
        hh = h + (i - P)
        ok_h = mask_p & (hh >= 0) & (hh < H)
        ch = _count(hh, H, P)
        for j in tl.static_range(K):
            ww = w + (j - P)
            ok = ok_h & (ww >= 0) & (ww < W)
            nb = offs_p + ((i - P) * W + (j - P))
            gn = tl.load(g_ptr + base + nb[None, :] * stride_w, mask=mask_c[:, None] & ok[None, :], other=0.0)
            cnt = tl.where(ok, ch * _count(ww, W, P), 1).to(ACC)
            acc += gn.to(ACC) / cnt[None, :]

    coef = tl.load(coef_ptr + b * C + offs_c, mask=mask_c, other=0.0)
    kb = tl.load(k_ptr + b)
    mean = tl.load(mean_ptr + b)
    dx = coef[:, None] * (acc - g) + kb * (xc - mean)
    if HAS_R:
        r = tl.load(r_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        dx += r[:, None] * g
    else:
        dx += g
    tl.store(dx_ptr + base + offs_p[None, :] * stride_w, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launch helpers
# --------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _layout(x: torch.Tensor):
    """(x in a supported dense layout, stride_b, stride_c, stride_w, channels_last?)."""
    B, C, H, W = x.shape
    if x.is_contiguous():
        return x, C * H * W, H * W, 1, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, C * H * W, 1, C, True
    x = x.contiguous()
    return x, C * H * W, H * W, 1, False


def _tiles(C: int, HW: int, channels_last: bool):
    if channels_last:
        block_c = min(triton.next_power_of_2(C), 64)
        block_p = max(1, min(_TILE // block_c, triton.next_power_of_2(HW)))
    else:
        block_p = min(triton.next_power_of_2(HW), _TILE)
        block_c = max(1, min(_TILE // block_p, triton.next_power_of_2(C)))
    return block_c, block_p


def sample_stats_triton(x: torch.Tensor, eps: float):
    """Per-sample mean and rstd over (C, H, W) of a dense (contiguous or channels_last) tensor.

    Args:
        x: (B, C, H, W) tensor, contiguous or channels_last.
        eps: Added to the biased variance.

    Returns:
        ``(mean, rstd)``, two (B,) tensors in fp32 (fp64 for fp64 inputs).
    """
    B = x.shape[0]
    N = x[0].numel()
    tl_acc, torch_acc = _acc(x.dtype)
    chunk = min(_STATS_CHUNK, triton.next_power_of_2(N))
    nchunk = triton.cdiv(N, chunk)
    pmean = torch.empty((B, nchunk), device=x.device, dtype=torch_acc)
    pm2 = torch.empty_like(pmean)
    mean = torch.empty((B,), device=x.device, dtype=torch_acc)
    rstd = torch.empty_like(mean)
    _stats_partial_kernel[(nchunk, B)](x, pmean, pm2, N, nchunk, CHUNK=chunk, ACC=tl_acc, num_warps=8)
    block_r = min(triton.next_power_of_2(nchunk), 1024)
    _stats_combine_kernel[(B,)](
        pmean, pm2, mean, rstd, N, nchunk, eps, CHUNK=chunk, BLOCK_R=block_r, ACC=tl_acc, num_warps=4
    )
    return mean, rstd


def _forward(x, weight, res_scale, sample_scale, eps, pool_size):
    x, sb, sc, sw, cl = _layout(x)
    B, C, H, W = x.shape
    tl_acc, _ = _acc(x.dtype)
    mean, rstd = sample_stats_triton(x, eps)
    y = torch.empty_like(x)
    block_c, block_p = _tiles(C, H * W, cl)
    grid = (triton.cdiv(H * W, block_p), triton.cdiv(C, block_c), B)
    _fwd_kernel[grid](
        x,
        y,
        weight,
        res_scale if res_scale is not None else weight,
        sample_scale if sample_scale is not None else rstd,
        rstd,
        C,
        H,
        W,
        sb,
        sc,
        sw,
        K=pool_size,
        HAS_R=res_scale is not None,
        HAS_S=sample_scale is not None,
        BLOCK_C=block_c,
        BLOCK_P=block_p,
        ACC=tl_acc,
        num_warps=4,
    )
    return x, y, mean, rstd


class _PoolMixerResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, res_scale, sample_scale, eps, pool_size):
        x, y, mean, rstd = _forward(x, weight, res_scale, sample_scale, eps, pool_size)
        ctx.save_for_backward(x, mean, rstd, weight, res_scale, sample_scale)
        ctx.pool_size = pool_size
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, mean, rstd, weight, res_scale, sample_scale = ctx.saved_tensors
        need_x, need_w, need_r, need_s = ctx.needs_input_grad[:4]
        k = ctx.pool_size
        B, C, H, W = x.shape
        N = C * H * W
        tl_acc, acc = _acc(x.dtype)
        _, sb, sc, sw, cl = _layout(x)
        g = grad_y.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)

        block_c, block_p = _tiles(C, H * W, cl)
        n_ptiles = triton.cdiv(H * W, block_p)
        iters = min(_BWD_ITERS, n_ptiles)
        nsplit = triton.cdiv(n_ptiles, iters)
        t_part = torch.empty((B, C, nsplit), device=x.device, dtype=acc)
        gx_part = torch.empty_like(t_part) if need_r else t_part
        _bwd_reduce_kernel[(nsplit, triton.cdiv(C, block_c), B)](
            x,
            g,
            t_part,
            gx_part,
            C,
            H,
            W,
            sb,
            sc,
            sw,
            nsplit,
            iters,
            K=k,
            NEED_G=bool(need_r),
            BLOCK_C=block_c,
            BLOCK_P=block_p,
            ACC=tl_acc,
            num_warps=4,
        )
        t = t_part.sum(-1)  # (B, C): sum_hw g * (avgpool(x) - x)
        w = weight.to(acc)
        s = sample_scale.to(acc) if sample_scale is not None else None
        rs = rstd * s if s is not None else rstd
        tw = t @ w  # (B,): sum_c T[b, c] w[c]

        grad_x = grad_w = grad_r = grad_s = None
        if need_w:
            grad_w = (rs @ t).to(weight.dtype)
        if need_s:
            grad_s = (tw * rstd).to(sample_scale.dtype)
        if need_r:
            grad_r = gx_part.sum((0, 2)).to(res_scale.dtype)
        if need_x:
            grad_rstd = tw * s if s is not None else tw
            kb = (-grad_rstd * rstd.pow(3) / N).contiguous()
            coef = (rs[:, None] * w[None, :]).contiguous()
            grad_x = torch.empty_like(x)
            _bwd_dx_kernel[(n_ptiles, triton.cdiv(C, block_c), B)](
                x,
                g,
                grad_x,
                coef,
                res_scale if res_scale is not None else coef,
                kb,
                mean,
                C,
                H,
                W,
                sb,
                sc,
                sw,
                K=k,
                HAS_R=res_scale is not None,
                BLOCK_C=block_c,
                BLOCK_P=block_p,
                ACC=tl_acc,
                num_warps=4,
            )
        return grad_x, grad_w, grad_r, grad_s, None, None


def _device_ctx(x: torch.Tensor):
    if x.is_cuda:
        return torch.cuda.device(x.device)
    import contextlib

    return contextlib.nullcontext()


def pool_mixer_residual_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float,
    pool_size: int = 3,
    res_scale: torch.Tensor | None = None,
    sample_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton implementation of ``pool_mixer_residual`` (inputs assumed validated by the caller).

    The small vectors are made contiguous; ``x`` is used as is when contiguous or channels_last
    (the output keeps that layout) and made contiguous otherwise.
    """
    weight = weight.contiguous()
    res_scale = res_scale.contiguous() if res_scale is not None else None
    sample_scale = sample_scale.contiguous() if sample_scale is not None else None
    with _device_ctx(x):
        return _PoolMixerResidual.apply(x, weight, res_scale, sample_scale, float(eps), int(pool_size))
