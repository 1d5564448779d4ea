"""Triton kernels of the fused PoolFormer token-mixer half-block (launched by ``triton_impl``).

Forward, two launches:

1. ``stats_kernel``: each program reduces one part of one sample (samples are dense in both
   contiguous and channels_last layouts) to its mean and sum of squared deviations (M2), merging
   its blocks with Chan's parallel formula, in fp32 (fp64 for fp64 inputs).
2. ``fwd_kernel``: each program first merges its sample's parts into ``mean[b]`` and
   ``rstd[b] = rsqrt(M2 / N + eps)`` (a few hundred bytes from L2; the first program of each
   sample stores them for backward), then applies the stencil
   ``y = r[c] x + w[c] rstd[b] s[b] (avgpool(x - mean[b]) - (x - mean[b]))`` with the
   count_include_pad=False divisor (number of in-bounds neighbours), for any odd pool size.

Backward, two launches: ``bwd_reduce_kernel`` recomputes the pooling and reduces, per program,
``rs[b] sum g (avgpool(xc) - xc)`` per channel (the weight gradient's partials),
``sum_c w[c] sum g (avgpool(xc) - xc)`` (the rstd gradient's partials) and optionally ``sum g x``
(the residual scale's); ``bwd_dx_kernel`` merges its sample's rstd-gradient partials and applies
the transposed stencil (each output's contribution divided by the OUTPUT position's count) plus
the term through ``rstd``: ``d rstd[b] / d x = -rstd[b]^3 (x - mean[b]) / N``.

Centring (``xc = x - mean[b]``) changes nothing mathematically (the pooling weights sum to one)
but keeps ``avgpool(x) - x`` free of the rounding error of a large mean.

Elements are addressed as ``base + c * stride_c + (h * W + w) * stride_w``, which covers both
dense layouts (NCHW: stride_w = 1; channels_last: stride_c = 1, stride_h = W * stride_w) and
broadcast gradients (all strides 0). The batch is folded into grid axis 0 with the pixel tiles
and channel blocks (CUDA limits axes 1 and 2 to 65,535); offsets within a sample are int32, the
sample base int64.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _count(i, L, P: tl.constexpr):
    """Number of in-bounds positions of a window of half-width P centred at i (0 <= i < L)."""
    return tl.minimum(i + P, L - 1) - tl.maximum(i - P, 0) + 1


@triton.jit
def _pool_centred(x_ptr, base, offs_p, h, w, mask_c, mask_p, mean, H, W, stride_w,
                  K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """avgpool(x - mean) at the pixels offs_p (count_include_pad=False)."""
    P: tl.constexpr = K // 2
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for i in tl.static_range(K):
        hh = h + (i - P)
        ok_h = mask_p & (hh >= 0) & (hh < H)
        for j in tl.static_range(K):
            ww = w + (j - P)
            ok = mask_c[:, None] & (ok_h & (ww >= 0) & (ww < W))[None, :]
            nb = offs_p + ((i - P) * W + (j - P))
            v = tl.load(x_ptr + base + nb[None, :] * stride_w, mask=ok, other=0.0).to(ACC)
            acc += tl.where(ok, v - mean, 0.0)
    cnt = tl.where(mask_p, _count(h, H, P) * _count(w, W, P), 1).to(ACC)  # 1 off-image: no 0/0
    return acc / cnt[None, :]


@triton.jit
def stats_kernel(x_ptr, pmean_ptr, pm2_ptr, N, NPARTS, ITERS, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Mean and M2 of elements [part * ITERS * BLOCK, (part + 1) * ITERS * BLOCK) of sample b."""
    pid = tl.program_id(0)  # b * NPARTS + part
    part = pid % NPARTS
    b = (pid // NPARTS).to(tl.int64)
    start = part * (ITERS * BLOCK)
    n = tl.zeros([1], dtype=ACC)
    mean = tl.zeros([1], dtype=ACC)
    m2 = tl.zeros([1], dtype=ACC)
    for it in range(0, ITERS):
        first = start + it * BLOCK
        offs = first + tl.arange(0, BLOCK)
        mask = offs < N
        v = tl.load(x_ptr + b * N + offs, mask=mask, other=0.0).to(ACC)
        nb = tl.minimum(tl.maximum(N - first, 0), BLOCK).to(ACC)
        mb = tl.sum(v, axis=0) / tl.maximum(nb, 1.0)
        d = tl.where(mask, v - mb, 0.0)
        tot = n + nb
        delta = mb - mean
        f = nb / tl.maximum(tot, 1.0)
        mean += delta * f
        m2 += tl.sum(d * d, axis=0) + delta * delta * n * f
        n = tot
    one = tl.arange(0, 1)
    tl.store(pmean_ptr + pid + one, mean)
    tl.store(pm2_ptr + pid + one, m2)


@triton.jit
def _combine_stats(pmean_ptr, pm2_ptr, b, N, NPARTS, SPAN, eps_hi, eps_lo,
                   BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    """Merges sample b's NPARTS (mean, M2) partials (part i holds min(SPAN, N - i SPAN) elements)."""
    i = tl.arange(0, BLOCK_R)
    m = i < NPARTS
    n_i = (N - tl.minimum(i, NPARTS - 1) * SPAN).to(ACC)
    n_i = tl.minimum(n_i, SPAN)
    pm = tl.load(pmean_ptr + b * NPARTS + i, mask=m, other=0.0)
    q = tl.load(pm2_ptr + b * NPARTS + i, mask=m, other=0.0)
    nf = tl.cast(N, ACC)  # N may be specialised to a constexpr (N == 1)
    mean = tl.sum(tl.where(m, n_i * pm, 0.0), axis=0) / nf
    dm = pm - mean
    m2 = tl.sum(tl.where(m, q + n_i * dm * dm, 0.0), axis=0)
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)  # eps in the statistics' dtype (fp32 args carry fp64 eps as hi + lo)
    return mean, tl.rsqrt(m2 / nf + eps)


@triton.jit
def _program_ids(pid, NPT, NCB):
    pid_p = pid % NPT
    rest = pid // NPT
    return pid_p, rest % NCB, (rest // NCB).to(tl.int64)


@triton.jit
def _tile(pid_p, pid_c, b, C, H, W, stride_b, stride_c, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """A program's tile: pixel and channel offsets, their masks, pixel rows/columns and sample b's base."""
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < H * W
    mask_c = offs_c < C
    base = b * stride_b + offs_c[:, None] * stride_c
    return offs_p, offs_c, mask_p, mask_c, offs_p // W, offs_p % W, base, mask_c[:, None] & mask_p[None, :]


@triton.jit
def fwd_kernel(
    x_ptr, y_ptr, w_ptr, r_ptr, s_ptr, pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr,
    C, H, W, N, NPARTS, SPAN, eps_hi, eps_lo, NPT, NCB, stride_b, stride_c, stride_w,
    K: tl.constexpr, HAS_R: tl.constexpr, HAS_S: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    pid_p, pid_c, b = _program_ids(tl.program_id(0), NPT, NCB)
    mean, rstd = _combine_stats(pmean_ptr, pm2_ptr, b, N, NPARTS, SPAN, eps_hi, eps_lo, BLOCK_R, ACC)
    if (pid_p == 0) & (pid_c == 0):
        tl.store(mean_ptr + b, mean)
        tl.store(rstd_ptr + b, rstd)
    offs_p, offs_c, mask_p, mask_c, h, w, base, mask = _tile(pid_p, pid_c, b, C, H, W, stride_b, stride_c,
                                                             BLOCK_C, BLOCK_P)

    xv = tl.load(x_ptr + base + offs_p[None, :] * stride_w, mask=mask, other=0.0).to(ACC)
    pooled = _pool_centred(x_ptr, base, offs_p, h, w, mask_c, mask_p, mean, H, W, stride_w,
                           K, BLOCK_C, BLOCK_P, ACC)
    rs = rstd
    if HAS_S:
        rs = rs * tl.load(s_ptr + b).to(ACC)
    coef = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC) * rs
    out = coef[:, None] * (pooled - (xv - mean))
    if HAS_R:
        out += tl.load(r_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[:, None] * xv
    else:
        out += xv
    tl.store(y_ptr + base + offs_p[None, :] * stride_w, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bwd_reduce_kernel(
    x_ptr, g_ptr, tw_ptr, twb_ptr, gx_ptr, w_ptr, s_ptr, mean_ptr, rstd_ptr,
    C, H, W, NSPLIT, ITERS, NCB, stride_b, stride_c, stride_w, g_sb, g_sc, g_sw,
    K: tl.constexpr, HAS_S: tl.constexpr, NEED_R: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
):
    """Per program (split of ITERS pixel tiles, channel block, sample), with T = sum g (avgpool(xc) - xc):
    tw[b, c, split] = rs[b] T[c], twb[b, cblock, split] = sum_c w[c] T[c], gx[b, c, split] = sum g x."""
    pid = tl.program_id(0)  # (b * NCB + pid_c) * NSPLIT + pid_s
    pid_s, pid_c, b = _program_ids(pid, NSPLIT, NCB)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    base = b * stride_b + offs_c[:, None] * stride_c
    g_base = b * g_sb + offs_c[:, None] * g_sc
    mean = tl.load(mean_ptr + b)
    t_acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    g_acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for it in range(0, ITERS):
        offs_p = (pid_s * ITERS + it) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < H * W
        h = offs_p // W
        w = offs_p % W
        mask = mask_c[:, None] & mask_p[None, :]
        xv = tl.load(x_ptr + base + offs_p[None, :] * stride_w, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + g_base + offs_p[None, :] * g_sw, mask=mask, other=0.0).to(ACC)
        pooled = _pool_centred(x_ptr, base, offs_p, h, w, mask_c, mask_p, mean, H, W, stride_w,
                               K, BLOCK_C, BLOCK_P, ACC)
        t_acc += g * (pooled - (xv - mean))  # g is 0 off the image
        if NEED_R:
            g_acc += g * xv
    t = tl.sum(t_acc, axis=1)
    rs = tl.load(rstd_ptr + b)
    if HAS_S:
        rs = rs * tl.load(s_ptr + b).to(ACC)
    out = (b * C + offs_c) * NSPLIT + pid_s
    tl.store(tw_ptr + out, rs * t, mask=mask_c)
    wc = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    tl.store(twb_ptr + pid, tl.sum(wc * t, axis=0))
    if NEED_R:
        tl.store(gx_ptr + out, tl.sum(g_acc, axis=1), mask=mask_c)


@triton.jit
def bwd_dx_kernel(
    x_ptr, g_ptr, dx_ptr, w_ptr, r_ptr, s_ptr, twb_ptr, mean_ptr, rstd_ptr,
    C, H, W, N, NPT, NCB, NTW, stride_b, stride_c, stride_w, g_sb, g_sc, g_sw,
    K: tl.constexpr, HAS_R: tl.constexpr, HAS_S: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, ACC: tl.constexpr,
):
    """dx = r g + coef (poolT(g) - g) + k[b] (x - mean[b]); poolT divides by the output's count;
    coef = w[c] rstd[b] s[b]; k[b] = -s[b] (sum of sample b's NTW twb partials) rstd[b]^3 / N."""
    P: tl.constexpr = K // 2
    pid_p, pid_c, b = _program_ids(tl.program_id(0), NPT, NCB)
    tot = tl.zeros([BLOCK_T], dtype=ACC)
    for start in range(0, NTW, BLOCK_T):
        i = start + tl.arange(0, BLOCK_T)
        tot += tl.load(twb_ptr + b * NTW + i, mask=i < NTW, other=0.0)
    mean = tl.load(mean_ptr + b)
    rstd = tl.load(rstd_ptr + b)
    grad_rstd = tl.sum(tot, axis=0)
    rs = rstd
    if HAS_S:
        s = tl.load(s_ptr + b).to(ACC)
        rs = rs * s
        grad_rstd = grad_rstd * s
    kb = -grad_rstd * rstd * rstd * rstd / tl.cast(N, ACC)

    offs_p, offs_c, mask_p, mask_c, h, w, base, mask = _tile(pid_p, pid_c, b, C, H, W, stride_b, stride_c,
                                                             BLOCK_C, BLOCK_P)
    g_base = b * g_sb + offs_c[:, None] * g_sc
    g = tl.load(g_ptr + g_base + offs_p[None, :] * g_sw, mask=mask, other=0.0).to(ACC)
    xv = tl.load(x_ptr + base + offs_p[None, :] * stride_w, mask=mask, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for i in tl.static_range(K):
        hh = h + (i - P)
        ok_h = mask_p & (hh >= 0) & (hh < H)
        ch = _count(hh, H, P)
        for j in tl.static_range(K):
            ww = w + (j - P)
            ok = ok_h & (ww >= 0) & (ww < W)
            nb = offs_p + ((i - P) * W + (j - P))
            gn = tl.load(g_ptr + g_base + nb[None, :] * g_sw, mask=mask_c[:, None] & ok[None, :], other=0.0)
            cnt = tl.where(ok, ch * _count(ww, W, P), 1).to(ACC)
            acc += gn.to(ACC) / cnt[None, :]

    coef = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC) * rs
    dx = coef[:, None] * (acc - g) + kb * (xv - mean)
    if HAS_R:
        dx += tl.load(r_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[:, None] * g
    else:
        dx += g
    tl.store(dx_ptr + base + offs_p[None, :] * stride_w, dx.to(dx_ptr.dtype.element_ty), mask=mask)
