"""Triton kernels of the MetaFormer baselines' memory-bound glue (launched by ``triton_ln``).

Channel LayerNorm, optionally fused with the residual update before it (one program: a tile of
``BLOCK_P`` positions of one sample times all ``C`` channels, so every statistic stays in registers):

- ``ln_fwd_kernel``: ``z = r[c] x + ls[c] s[b] y`` (``HAS_Y``; without it ``z = x``), rounded to
  z's dtype as the plain composition materialises it, stored (``HAS_Y``), then
  ``n = (z - mean) * rstd * w[c] + bias[c]`` with ``mean`` and the biased variance over the channels
  of each position computed in two passes over registers (fp32; fp64 for fp64), eps in the
  statistics' dtype.
- ``ln_bwd_kernel``: recomputes the statistics from the saved ``z`` (cheaper than storing them:
  the whole channel vector is in registers anyway) and, per position,
  ``dz = gz + rstd (gw - mean_c(gw) - zhat mean_c(gw zhat))`` with ``gw = gn w``; then
  ``dx = r dz`` and ``dy = ls s dz``. Each program runs ``ITERS`` consecutive tiles of one sample and
  stores its partial sums of ``gn zhat`` (d weight), ``gn`` (d bias), ``x dz`` (d res_scale),
  ``s y dz`` (d layer_scale) and ``ls y dz`` (d sample_scale, one number); the launcher sums them.

StarReLU ``s relu(x)^2 + b`` over a dense tensor seen as flat memory (layout does not matter for an
elementwise map): ``star_relu_fwd_kernel``, and ``star_relu_bwd_kernel`` for ``dx = 2 s relu(x) g``
with per-program partial sums of ``g relu(x)^2`` (d s) and ``g`` (d b).

Elements of the (B, C, H, W) tensors are addressed as ``b * s_b + c * s_c + p * s_p`` with
``p = h * W + w`` (both dense layouts: NCHW has ``s_p = 1``, channels_last ``s_c = 1``; Triton
specialises a stride of 1, so loads are coalesced along whichever axis is contiguous). The sample base
is int64, offsets within a sample int32; the flat StarReLU offsets are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(t, HW, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, C):
    """(position offsets, channel offsets, 2-D mask) of position tile t of a sample (t past the end: all masked)."""
    offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    mask = (offs_p < HW)[:, None] & (offs_c < C)[None, :]
    return offs_p, offs_c, mask


@triton.jit
def _addr(b, offs_p, offs_c, s_b, s_c, s_p):
    return b * s_b + offs_p[:, None] * s_p + offs_c[None, :] * s_c


@triton.jit
def _stats(z, mask, C, eps_hi, eps_lo, ACC: tl.constexpr):
    """(z - mean, rstd) per position (rows) over the channels (columns); masked entries give 0."""
    cf = tl.cast(C, ACC)
    mean = tl.sum(z, axis=1) / cf
    zc = tl.where(mask, z - mean[:, None], 0.0)
    var = tl.sum(zc * zc, axis=1) / cf
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)  # fp64 eps reaches fp64 kernels as hi + lo
    return zc, tl.rsqrt(var + eps)


@triton.jit
def _to(v, ptr):
    """``v`` in the element type of ``ptr``; from fp64 to a 16-bit float through fp32, as PyTorch converts on CPU
    (``.to(torch.bfloat16)`` of 1 + 2**-8 + 2**-30 in fp64 gives 1.0, not the nearest bfloat16), and because
    Triton 3.0 aborts compiling a direct fp64 -> bf16 conversion."""
    if v.dtype == tl.float64:  # (nested: Triton 3.0 compiles no `and` of two compile-time bools)
        if ptr.dtype.element_ty != tl.float64:
            v = v.to(tl.float32)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _channel_vec(ptr, offs_c, C, ACC: tl.constexpr):
    return tl.load(ptr + offs_c, mask=offs_c < C, other=0.0).to(ACC)


@triton.jit
def _residual(x_ptr, y_ptr, r_ptr, ls_ptr, s_ptr, b, offs_p, offs_c, mask, C, xs_b, xs_c, xs_p, ys_b, ys_c, ys_p,
              HAS_R: tl.constexpr, HAS_LS: tl.constexpr, HAS_S: tl.constexpr, ACC: tl.constexpr):
    """(x, y, y's factor ls[c] s[b] or None-like 1): the tile's residual inputs in ACC."""
    x = tl.load(x_ptr + _addr(b, offs_p, offs_c, xs_b, xs_c, xs_p), mask=mask, other=0.0).to(ACC)
    y = tl.load(y_ptr + _addr(b, offs_p, offs_c, ys_b, ys_c, ys_p), mask=mask, other=0.0).to(ACC)
    f = tl.full([1, 1], 1.0, ACC)
    if HAS_LS:
        f = f * _channel_vec(ls_ptr, offs_c, C, ACC)[None, :]
    if HAS_S:
        f = f * tl.load(s_ptr + b).to(ACC)
    if HAS_R:
        x = x * _channel_vec(r_ptr, offs_c, C, ACC)[None, :]
    return x, y, f


@triton.jit
def ln_fwd_kernel(
    x_ptr, y_ptr, z_ptr, n_ptr, w_ptr, bias_ptr, r_ptr, ls_ptr, s_ptr,
    C, HW, NPT, eps_hi, eps_lo, xs_b, xs_c, xs_p, ys_b, ys_c, ys_p,
    HAS_Y: tl.constexpr, HAS_R: tl.constexpr, HAS_LS: tl.constexpr, HAS_S: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """z = r x + ls s y (stored; z has x's strides) and n = LN_c(z) w + bias (also x's strides)."""
    pid = tl.program_id(0)
    b = (pid // NPT).to(tl.int64)
    offs_p, offs_c, mask = _tile(pid % NPT, HW, BLOCK_P, BLOCK_C, C)
    out = _addr(b, offs_p, offs_c, xs_b, xs_c, xs_p)
    if HAS_Y:
        x, y, f = _residual(x_ptr, y_ptr, r_ptr, ls_ptr, s_ptr, b, offs_p, offs_c, mask, C,
                            xs_b, xs_c, xs_p, ys_b, ys_c, ys_p, HAS_R, HAS_LS, HAS_S, ACC)
        zq = _to(x + f * y, z_ptr)
        tl.store(z_ptr + out, zq, mask=mask)
        z = zq.to(ACC)  # normalise z as stored, as the composition does
    else:
        z = tl.load(x_ptr + out, mask=mask, other=0.0).to(ACC)
    zc, rstd = _stats(z, mask, C, eps_hi, eps_lo, ACC)
    n = zc * rstd[:, None]
    if HAS_W:
        n = n * _channel_vec(w_ptr, offs_c, C, ACC)[None, :]
    if HAS_B:
        n = n + _channel_vec(bias_ptr, offs_c, C, ACC)[None, :]
    tl.store(n_ptr + out, _to(n, n_ptr), mask=mask)


@triton.jit
def ln_bwd_kernel(
    z_ptr, gn_ptr, gz_ptr, x_ptr, y_ptr, dx_ptr, dy_ptr, w_ptr, r_ptr, ls_ptr, s_ptr,
    pw_ptr, pb_ptr, pr_ptr, pls_ptr, ps_ptr,
    C, HW, NSPLIT, ITERS, eps_hi, eps_lo,
    xs_b, xs_c, xs_p, ys_b, ys_c, ys_p, gns_b, gns_c, gns_p, gzs_b, gzs_c, gzs_p,
    HAS_Y: tl.constexpr, HAS_R: tl.constexpr, HAS_LS: tl.constexpr, HAS_S: tl.constexpr, HAS_W: tl.constexpr,
    HAS_GN: tl.constexpr, HAS_GZ: tl.constexpr, NEED_X: tl.constexpr, NEED_Y: tl.constexpr,
    NEED_W: tl.constexpr, NEED_B: tl.constexpr, NEED_R: tl.constexpr, NEED_LS: tl.constexpr, NEED_S: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Program (b, split) runs tiles split * ITERS ... of sample b; partial sums go to row b * NSPLIT + split.

    z, x and dx share x's strides; y and dy share y's; gn and gz have their own.
    """
    pid = tl.program_id(0)
    b = (pid // NSPLIT).to(tl.int64)
    split = pid % NSPLIT
    acc_w = tl.zeros([BLOCK_C], dtype=ACC)
    acc_b = tl.zeros([BLOCK_C], dtype=ACC)
    acc_r = tl.zeros([BLOCK_C], dtype=ACC)
    acc_ls = tl.zeros([BLOCK_C], dtype=ACC)
    acc_s = tl.zeros([BLOCK_C], dtype=ACC)
    for it in range(0, ITERS):
        offs_p, offs_c, mask = _tile(split * ITERS + it, HW, BLOCK_P, BLOCK_C, C)
        xo = _addr(b, offs_p, offs_c, xs_b, xs_c, xs_p)
        dz = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        if HAS_GN:
            z = tl.load(z_ptr + xo, mask=mask, other=0.0).to(ACC)
            zc, rstd = _stats(z, mask, C, eps_hi, eps_lo, ACC)
            zhat = zc * rstd[:, None]
            gn = tl.load(gn_ptr + _addr(b, offs_p, offs_c, gns_b, gns_c, gns_p), mask=mask, other=0.0).to(ACC)
            gw = gn
            if HAS_W:
                gw = gn * _channel_vec(w_ptr, offs_c, C, ACC)[None, :]
            cf = tl.cast(C, ACC)
            c1 = tl.sum(zhat * gw, axis=1) / cf
            c2 = tl.sum(gw, axis=1) / cf
            dz = tl.where(mask, rstd[:, None] * (gw - c2[:, None] - zhat * c1[:, None]), 0.0)
            if NEED_W:
                acc_w += tl.sum(gn * zhat, axis=0)
            if NEED_B:
                acc_b += tl.sum(gn, axis=0)
        if HAS_GZ:
            dz += tl.load(gz_ptr + _addr(b, offs_p, offs_c, gzs_b, gzs_c, gzs_p), mask=mask, other=0.0).to(ACC)
        if NEED_X:
            dx = dz
            if HAS_R:
                dx = dz * _channel_vec(r_ptr, offs_c, C, ACC)[None, :]
            tl.store(dx_ptr + xo, _to(dx, dx_ptr), mask=mask)
        if NEED_R:
            acc_r += tl.sum(tl.load(x_ptr + xo, mask=mask, other=0.0).to(ACC) * dz, axis=0)
        if HAS_Y:
            yo = _addr(b, offs_p, offs_c, ys_b, ys_c, ys_p)
            if NEED_Y:
                dy = dz
                if HAS_LS:
                    dy = dy * _channel_vec(ls_ptr, offs_c, C, ACC)[None, :]
                if HAS_S:
                    dy = dy * tl.load(s_ptr + b).to(ACC)
                tl.store(dy_ptr + yo, _to(dy, dy_ptr), mask=mask)
            if NEED_LS or NEED_S:
                ydz = tl.load(y_ptr + yo, mask=mask, other=0.0).to(ACC) * dz
                if NEED_LS:
                    if HAS_S:
                        acc_ls += tl.sum(ydz * tl.load(s_ptr + b).to(ACC), axis=0)
                    else:
                        acc_ls += tl.sum(ydz, axis=0)
                if NEED_S:
                    if HAS_LS:
                        acc_s += tl.sum(ydz * _channel_vec(ls_ptr, offs_c, C, ACC)[None, :], axis=0)
                    else:
                        acc_s += tl.sum(ydz, axis=0)
    row = pid.to(tl.int64) * C
    offs_c = tl.arange(0, BLOCK_C)
    mc = offs_c < C
    if NEED_W:
        tl.store(pw_ptr + row + offs_c, acc_w, mask=mc)
    if NEED_B:
        tl.store(pb_ptr + row + offs_c, acc_b, mask=mc)
    if NEED_R:
        tl.store(pr_ptr + row + offs_c, acc_r, mask=mc)
    if NEED_LS:
        tl.store(pls_ptr + row + offs_c, acc_ls, mask=mc)
    if NEED_S:
        tl.store(ps_ptr + pid, tl.sum(acc_s, axis=0))


@triton.jit
def star_relu_fwd_kernel(x_ptr, out_ptr, s_ptr, b_ptr, N, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    r = tl.maximum(tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC), 0.0)
    y = tl.load(s_ptr).to(ACC) * (r * r) + tl.load(b_ptr).to(ACC)
    tl.store(out_ptr + offs, _to(y, out_ptr), mask=mask)


@triton.jit
def star_relu_bwd_kernel(x_ptr, g_ptr, dx_ptr, s_ptr, ps_ptr, pb_ptr, N, ITERS,
                         NEED_X: tl.constexpr, NEED_S: tl.constexpr, NEED_B: tl.constexpr,
                         BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Blocks pid * ITERS ... : dx = 2 s relu(x) g; partials ps[pid] = sum g relu(x)^2, pb[pid] = sum g."""
    pid = tl.program_id(0)
    two_s = 2.0 * tl.load(s_ptr).to(ACC)
    acc_s = tl.zeros([BLOCK], dtype=ACC)
    acc_b = tl.zeros([BLOCK], dtype=ACC)
    for it in range(0, ITERS):
        offs = (pid.to(tl.int64) * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        if NEED_X or NEED_S:
            r = tl.maximum(tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC), 0.0)
            if NEED_X:
                tl.store(dx_ptr + offs, _to(two_s * r * g, dx_ptr), mask=mask)
            if NEED_S:
                acc_s += g * r * r
        if NEED_B:
            acc_b += g
    if NEED_S:
        tl.store(ps_ptr + pid, tl.sum(acc_s, axis=0))
    if NEED_B:
        tl.store(pb_ptr + pid, tl.sum(acc_b, axis=0))
