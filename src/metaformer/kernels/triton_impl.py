"""Launch code of the Triton kernels for the fused PoolFormer token-mixer half-block.

The kernels themselves (and the description of what each computes) are in ``triton_kernels``.
Forward: two launches. Backward: two launches plus one small reduction for the weight gradient
(and one for the residual scale's, when it needs one). Without anything to differentiate the
forward runs outside ``torch.autograd.Function`` and saves nothing.

Tile, part and split sizes live in one :class:`TritonConfig`; :func:`set_config` /
:func:`configured` change them (tests use tiny sizes so that the multi-tile, multi-part and
multi-split paths run on small tensors; the GPU session sweeps them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import numpy as np
import torch
import triton.language as tl

from . import triton_kernels as tk
from .tile_config import ConfigSlot, cdiv, next_power_of_2, validate
from .torch_impl import wants_grad

__all__ = ["TritonConfig", "configured", "get_config", "launch_sizes", "pool_mixer_residual_triton", "set_config",
           "unsupported_reason"]

_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Tile and launch sizes of the Triton pooling kernels.

    Attributes:
        tile: Elements per program in the stencil kernels (power of two).
        max_block_c: Most channels per program for channels_last inputs (power of two).
        stats_block: Elements per step of the statistics kernel (power of two).
        max_stats_parts: Most statistics partials per sample (merged by every stencil program).
        bwd_iters: Pixel tiles per program of the backward reduction (at least).
        max_bwd_parts: Most rstd-gradient partials per sample (merged by every dx program), unless
            the channel blocks alone are more.
        num_warps: Warps per program of the stencil kernels.
        stats_num_warps: Warps per program of the statistics kernel.
    """

    tile: int = 1024
    max_block_c: int = 64
    stats_block: int = 4096
    max_stats_parts: int = 128
    bwd_iters: int = 4
    max_bwd_parts: int = 256
    num_warps: int = 4
    stats_num_warps: int = 8

    def __post_init__(self):
        validate(self, ("tile", "max_block_c", "stats_block", "num_warps", "stats_num_warps"))


_slot = ConfigSlot(TritonConfig())
get_config, set_config, configured = _slot.functions()


# --------------------------------------------------------------------------------------------
# layout and sizes
# --------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _strides(t: torch.Tensor):
    """(stride_b, stride_c, stride_w) if t is addressable as base + c*sc + (h*W + w)*sw, else None."""
    _, _, H, W = t.shape
    sb, sc, sh, sw = t.stride()
    if W == 1:
        sw = sh
    return (sb, sc, sw) if H == 1 or sh == W * sw else None


def _dense(x: torch.Tensor):
    """(x, channels_last?): x itself when contiguous or channels_last, else a contiguous copy."""
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def launch_sizes(shape, channels_last: bool, config: TritonConfig | None = None) -> dict:
    """The launch geometry for an input of ``shape`` (what the kernels will split it into).

    Args:
        shape: (B, C, H, W).
        channels_last: The memory layout.
        config: Tile sizes (default: the current configuration).

    Returns:
        A dict: ``block_c``, ``block_p`` (channels and pixels per stencil program),
        ``pixel_tiles``, ``channel_blocks``, ``stats_parts``, ``stats_iters`` (blocks per part),
        ``bwd_splits``, ``bwd_iters`` (pixel tiles per backward-reduction program).
    """
    return dict(_launch_sizes(tuple(shape), bool(channels_last), config or _slot.current))


@functools.lru_cache(maxsize=256)
def _launch_sizes(shape: tuple, channels_last: bool, cfg: TritonConfig) -> dict:
    """:func:`launch_sizes`, cached per shape, layout and configuration (every block's launch asks it)."""
    _, C, H, W = shape
    HW = H * W
    if channels_last:
        block_c = min(next_power_of_2(C), cfg.max_block_c)
        block_p = max(1, min(cfg.tile // block_c, next_power_of_2(HW)))
    else:
        block_p = min(next_power_of_2(HW), cfg.tile)
        block_c = max(1, min(cfg.tile // block_p, next_power_of_2(C)))
    npt, ncb = cdiv(HW, block_p), cdiv(C, block_c)
    blocks = cdiv(C * HW, cfg.stats_block)
    stats_iters = cdiv(blocks, min(blocks, cfg.max_stats_parts))
    nsplit = min(cdiv(npt, cfg.bwd_iters), max(1, cfg.max_bwd_parts // ncb))
    bwd_iters = cdiv(npt, nsplit)
    return dict(block_c=block_c, block_p=block_p, pixel_tiles=npt, channel_blocks=ncb,
                stats_parts=cdiv(blocks, stats_iters), stats_iters=stats_iters,
                bwd_splits=cdiv(npt, bwd_iters), bwd_iters=bwd_iters)


def unsupported_reason(x: torch.Tensor, pool_size: int) -> str | None:
    """Why the kernels cannot take ``x`` (offsets within a sample are int32), or None."""
    B, C, H, W = x.shape
    N = C * H * W
    reach = N + (pool_size // 2 + 1) * (W + 1) * C + _slot.current.stats_block * 2
    if reach > _INT32_MAX:
        return (f"a sample of {C}x{H}x{W} = {N} elements is too large for the Triton kernels' 32-bit "
                f"offsets (at most about 2**31 elements per sample)")
    return None


@functools.lru_cache(maxsize=64)
def _eps_parts(eps: float):
    """``eps`` as an fp32 pair ``hi + lo`` (the kernels add both; cached: a model has a few values, and the
    numpy conversions cost the host a few microseconds per launch)."""
    hi = float(np.float32(eps))
    return hi, float(np.float32(eps - hi))


# --------------------------------------------------------------------------------------------
# forward / backward
# --------------------------------------------------------------------------------------------
def _forward(x, weight, res_scale, sample_scale, eps, pool_size):
    """(x as used, y, mean, rstd); x is made dense first."""
    cfg = _slot.current
    x, cl = _dense(x)
    B, C, H, W = x.shape
    N = C * H * W
    tl_acc, acc = _acc(x.dtype)
    sb, sc, sw = _strides(x)
    sz = launch_sizes(x.shape, cl, cfg)
    nparts, iters = sz["stats_parts"], sz["stats_iters"]
    pmean = torch.empty((B, nparts), device=x.device, dtype=acc)
    pm2 = torch.empty_like(pmean)
    mean = torch.empty((B,), device=x.device, dtype=acc)
    rstd = torch.empty_like(mean)
    y = torch.empty_like(x)
    tk.stats_kernel[(B * nparts,)](x, pmean, pm2, N, nparts, iters, BLOCK=cfg.stats_block, ACC=tl_acc,
                                   num_warps=cfg.stats_num_warps)
    block_c, block_p, npt, ncb = sz["block_c"], sz["block_p"], sz["pixel_tiles"], sz["channel_blocks"]
    eps_hi, eps_lo = _eps_parts(eps)
    tk.fwd_kernel[(npt * ncb * B,)](
        x, y, weight, res_scale if res_scale is not None else weight,
        sample_scale if sample_scale is not None else weight, pmean, pm2, mean, rstd,
        C, H, W, N, nparts, iters * cfg.stats_block, eps_hi, eps_lo, npt, ncb, sb, sc, sw,
        K=pool_size, HAS_R=res_scale is not None, HAS_S=sample_scale is not None,
        BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_R=next_power_of_2(nparts), ACC=tl_acc,
        num_warps=cfg.num_warps,
    )
    return x, y, mean, rstd


def _backward(x, mean, rstd, weight, res_scale, sample_scale, grad_y, pool_size, needs):
    cfg = _slot.current
    need_x, need_w, need_r, need_s = needs
    B, C, H, W = x.shape
    N = C * H * W
    tl_acc, acc = _acc(x.dtype)
    cl = not x.is_contiguous()
    sb, sc, sw = _strides(x)
    g_strides = _strides(grad_y)
    if g_strides is None:  # e.g. a transposed gradient: one copy into x's layout
        grad_y = grad_y.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        g_strides = _strides(grad_y)
    sz = launch_sizes(x.shape, cl, cfg)
    block_c, block_p, npt, ncb = sz["block_c"], sz["block_p"], sz["pixel_tiles"], sz["channel_blocks"]
    nsplit, iters = sz["bwd_splits"], sz["bwd_iters"]
    tw = torch.empty((B, C, nsplit), device=x.device, dtype=acc)
    twb = torch.empty((B, ncb, nsplit), device=x.device, dtype=acc)
    gx = torch.empty_like(tw) if need_r else tw
    s_arg = sample_scale if sample_scale is not None else weight
    has_s = sample_scale is not None
    tk.bwd_reduce_kernel[(nsplit * ncb * B,)](
        x, grad_y, tw, twb, gx, weight, s_arg, mean, rstd,
        C, H, W, nsplit, iters, ncb, sb, sc, sw, *g_strides,
        K=pool_size, HAS_S=has_s, NEED_R=bool(need_r), BLOCK_C=block_c, BLOCK_P=block_p, ACC=tl_acc,
        num_warps=cfg.num_warps,
    )
    grad_x = grad_w = grad_r = grad_s = None
    if need_w:
        grad_w = tw.sum((0, 2)).to(weight.dtype)
    if need_s:
        grad_s = (twb.sum((1, 2)) * rstd).to(sample_scale.dtype)
    if need_r:
        grad_r = gx.sum((0, 2)).to(res_scale.dtype)
    if need_x:
        grad_x = torch.empty_like(x)
        ntw = ncb * nsplit
        tk.bwd_dx_kernel[(npt * ncb * B,)](
            x, grad_y, grad_x, weight, res_scale if res_scale is not None else weight, s_arg, twb, mean, rstd,
            C, H, W, N, npt, ncb, ntw, sb, sc, sw, *g_strides,
            K=pool_size, HAS_R=res_scale is not None, HAS_S=has_s, BLOCK_C=block_c, BLOCK_P=block_p,
            BLOCK_T=min(next_power_of_2(ntw), 1024), ACC=tl_acc, num_warps=cfg.num_warps,
        )
    return grad_x, grad_w, grad_r, grad_s


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
        grads = _backward(x, mean, rstd, weight, res_scale, sample_scale, grad_y, ctx.pool_size,
                          ctx.needs_input_grad[:4])
        return (*grads, None, None)


class _Empty(torch.autograd.Function):
    """An empty input: nothing to launch (the launch arithmetic would divide by zero)."""

    @staticmethod
    def forward(ctx, x, weight, res_scale, sample_scale):
        ctx.save_for_backward(x, weight, res_scale, sample_scale)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad_y):
        return tuple(None if t is None or not need else torch.zeros_like(t)
                     for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad))


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

    Raises:
        RuntimeError: If a sample is too large for the kernels' 32-bit offsets (see
            :func:`unsupported_reason`).
    """
    reason = unsupported_reason(x, pool_size)
    if reason is not None:
        raise RuntimeError(reason + "; use set_backend('auto') or set_backend('torch') for such inputs")
    weight = weight.contiguous()
    res_scale = res_scale.contiguous() if res_scale is not None else None
    sample_scale = sample_scale.contiguous() if sample_scale is not None else None
    if x.numel() == 0:
        return _Empty.apply(x, weight, res_scale, sample_scale)
    grad = wants_grad(x, weight, res_scale, sample_scale)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if not grad:
            return _forward(x, weight, res_scale, sample_scale, float(eps), int(pool_size))[1]
        return _PoolMixerResidual.apply(x, weight, res_scale, sample_scale, float(eps), int(pool_size))
