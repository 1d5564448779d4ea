"""Launch code and autograd of the Triton kernels for channel LayerNorm, the residual update fused
with it, and StarReLU (the kernels and what each computes: ``triton_ln_kernels``).

Memory traffic (passes over a (B, C, H, W) tensor; eager PyTorch in brackets):

- ``layernorm_channels``: forward 2 (read x, write n) [NCHW: 4, the layout copy before
  ``F.layer_norm``; under autocast the fp32 output costs 2 more on the next convolution's cast];
  backward 3 (read x and gn, write dx) plus a per-channel partial sum.
- ``residual_layernorm``: ``z = r x + ls s y`` and ``n = LN(z)`` in one pass: forward 4 (read x, y;
  write z, n) [7 to 11: the scalings, the add, then the norm]; backward 4 to 6 (read z, gn, gz, and x or
  y when a scale needs its gradient; write dx, dy).
- ``star_relu``: forward 2 [8: relu, square, mul, add], backward 3 [about 10], and autograd keeps only x
  [relu(x) and relu(x)^2 as well].

Without anything to differentiate, the forwards run outside ``torch.autograd.Function`` and save
nothing. Tile sizes live in one :class:`LNConfig` (tests use tiny ones so that the multi-tile and
multi-split paths run on small tensors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

from . import triton_ln_kernels as tk
from .tile_config import ConfigSlot, cdiv, next_power_of_2, validate
from .torch_impl import wants_grad
from .triton_impl import _acc, _dense, _eps_parts, _strides

__all__ = ["LNConfig", "configured", "get_config", "launch_sizes", "layernorm_triton", "set_config",
           "star_relu_triton", "unsupported_reason"]

_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class LNConfig:
    """Tile and launch sizes of the LayerNorm and StarReLU kernels.

    Attributes:
        tile: Elements (positions x padded channels) per LayerNorm program (power of two).
        nchw_min_positions: Fewest positions per LayerNorm program in NCHW, where positions are the
            contiguous axis (power of two; longer runs coalesce better).
        max_block_c: Most channels (rounded up to a power of two) the LayerNorm kernels take in
            registers; wider inputs take the PyTorch path (or raise under a forced ``"triton"``).
        bwd_iters: Position tiles per program of the LayerNorm backward (at least).
        num_warps: Warps per LayerNorm program (forward).
        bwd_num_warps: Warps per LayerNorm program (backward).
        ew_block: Elements per StarReLU program and loop step (power of two).
        ew_bwd_iters: Steps per StarReLU backward program (each writes one partial sum).
        ew_num_warps: Warps per StarReLU program.
    """

    tile: int = 4096
    nchw_min_positions: int = 16
    max_block_c: int = 16384
    bwd_iters: int = 4
    num_warps: int = 4
    bwd_num_warps: int = 8
    ew_block: int = 2048
    ew_bwd_iters: int = 8
    ew_num_warps: int = 4

    def __post_init__(self):
        validate(self, ("tile", "nchw_min_positions", "max_block_c", "num_warps", "bwd_num_warps", "ew_block",
                        "ew_num_warps"))


_slot = ConfigSlot(LNConfig())
get_config, set_config, configured = _slot.functions()


def launch_sizes(shape, channels_last: bool, config: LNConfig | None = None) -> dict:
    """How the LayerNorm kernels split an input of ``shape`` (B, C, H, W).

    Returns:
        A dict: ``block_c`` (padded channels), ``block_p`` (positions per tile), ``pos_tiles`` (per
        sample), ``bwd_splits`` (backward programs per sample) and ``bwd_iters`` (tiles per program).
    """
    return dict(_launch_sizes(tuple(shape), bool(channels_last), config or _slot.current))


@functools.lru_cache(maxsize=256)
def _launch_sizes(shape: tuple, channels_last: bool, cfg: LNConfig) -> dict:
    """:func:`launch_sizes`, cached per shape, layout and configuration (every launch asks it)."""
    _, C, H, W = shape
    HW = H * W
    block_c = next_power_of_2(C)
    block_p = max(1, cfg.tile // block_c)
    if not channels_last:
        block_p = max(block_p, cfg.nchw_min_positions)
    block_p = min(block_p, next_power_of_2(HW))
    npt = cdiv(HW, block_p)
    nsplit = cdiv(npt, cfg.bwd_iters)
    iters = cdiv(npt, nsplit)
    return dict(block_c=block_c, block_p=block_p, pos_tiles=npt, bwd_splits=cdiv(npt, iters), bwd_iters=iters)


def unsupported_reason(x: torch.Tensor) -> str | None:
    """Why the LayerNorm kernels cannot take ``x`` (too many channels, a sample past int32 offsets), or None."""
    B, C, H, W = x.shape
    if next_power_of_2(C) > _slot.current.max_block_c:
        return (f"{C} channels are more than the Triton LayerNorm kernels hold in registers "
                f"(LNConfig.max_block_c = {_slot.current.max_block_c})")
    if C * H * W > _INT32_MAX:
        return (f"a sample of {C}x{H}x{W} = {C * H * W} elements is too large for the Triton kernels' 32-bit "
                "offsets (at most 2**31 - 1 elements per sample)")
    return None


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` addressable like a (B, C, H*W) tensor; copied into ``ref``'s layout if not (transposed, sliced)."""
    if _strides(t) is not None:
        return t
    return t.contiguous(memory_format=torch.channels_last if not ref.is_contiguous() else torch.contiguous_format)


# ------------------------------------------------------------------------------------- LayerNorm
def _ln_forward(x, y, weight, bias, r, ls, s, eps, z_dtype, n_dtype):
    """(x as used, y as used, z or None, n); x made dense, y made addressable."""
    x, cl = _dense(x)
    B, C, H, W = x.shape
    sz = launch_sizes(x.shape, cl)
    y = None if y is None else _like(y, x)
    z = None if y is None else torch.empty_like(x, dtype=z_dtype)
    n = torch.empty_like(x, dtype=n_dtype)
    tl_acc, _ = _acc(x.dtype if y is None else z_dtype)
    some = x  # stands in for absent tensors (never read: the flags say so)
    tk.ln_fwd_kernel[(B * sz["pos_tiles"],)](
        x, some if y is None else y, n if z is None else z, n, *(some if t is None else t for t in (weight, bias, r, ls, s)),
        C, H * W, sz["pos_tiles"], *_eps_parts(eps), *_strides(x), *_strides(x if y is None else y),
        HAS_Y=y is not None, HAS_R=r is not None, HAS_LS=ls is not None, HAS_S=s is not None,
        HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_P=sz["block_p"], BLOCK_C=sz["block_c"], ACC=tl_acc,
        num_warps=_slot.current.num_warps,
    )
    return x, y, z, n


def _ln_backward(saved, gz, gn, eps, needs, dtypes):
    """Gradients (x, y, weight, bias, res_scale, layer_scale, sample_scale); None where not needed."""
    z, x, y, weight, bias, r, ls, s = saved
    need_x, need_y, need_w, need_b, need_r, need_ls, need_s = needs
    need_w, need_b = need_w and gn is not None, need_b and gn is not None
    B, C, H, W = z.shape
    cl = not z.is_contiguous()
    sz = launch_sizes(z.shape, cl)
    nsplit = sz["bwd_splits"]
    tl_acc, acc = _acc(z.dtype)
    gn = None if gn is None else _like(gn, z)
    gz = None if gz is None else _like(gz, z)
    dx = torch.empty_like(z, dtype=dtypes[0]) if need_x else None
    dy = torch.empty_like(z if y is None else y, dtype=dtypes[1]) if need_y else None
    parts = [torch.empty((B * nsplit, C), device=z.device, dtype=acc) if need else None
             for need in (need_w, need_b, need_r, need_ls)]
    ps = torch.empty((B, nsplit), device=z.device, dtype=acc) if need_s else None
    some = z
    y_like = y if y is not None else (dy if dy is not None else z)
    tk.ln_bwd_kernel[(B * nsplit,)](
        z, *(some if t is None else t for t in (gn, gz, x, y, dx, dy, weight, r, ls, s, *parts, ps)),
        C, H * W, nsplit, sz["bwd_iters"], *_eps_parts(eps), *_strides(z), *_strides(y_like),
        *_strides(z if gn is None else gn), *_strides(z if gz is None else gz),
        HAS_Y=bool(need_y or need_ls or need_s), HAS_R=r is not None, HAS_LS=ls is not None,
        HAS_S=s is not None, HAS_W=weight is not None, HAS_GN=gn is not None, HAS_GZ=gz is not None,
        NEED_X=bool(need_x), NEED_Y=bool(need_y), NEED_W=bool(need_w), NEED_B=bool(need_b), NEED_R=bool(need_r),
        NEED_LS=bool(need_ls), NEED_S=bool(need_s), BLOCK_P=sz["block_p"], BLOCK_C=sz["block_c"], ACC=tl_acc,
        num_warps=_slot.current.bwd_num_warps,
    )
    vec = [None if p is None else p.sum(0).to(t.dtype) for p, t in zip(parts, (weight, bias, r, ls))]
    grad_s = None if ps is None else ps.sum(1).to(s.dtype)
    return dx, dy, *vec, grad_s


def _zeros_if_needed(needs, like):
    return tuple(torch.zeros_like(t) if need and t is not None else None for need, t in zip(needs, like))


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, n_dtype):
        x, _, _, n = _ln_forward(x, None, weight, bias, None, None, None, eps, None, n_dtype)
        ctx.save_for_backward(x, weight, bias)
        ctx.eps, ctx.x_dtype = eps, x.dtype
        ctx.set_materialize_grads(False)
        return n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gn):
        x, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if gn is None:
            return None, None, None, None, None
        dx, _, dw, db, *_ = _ln_backward((x, None, None, weight, bias, None, None, None), None, gn, ctx.eps,
                                         (need_x, False, need_w, need_b, False, False, False), (ctx.x_dtype, None))
        return dx, dw, db, None, None


class _ResidualLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, weight, bias, r, ls, s, eps, z_dtype, n_dtype):
        xd, yd, z, n = _ln_forward(x, y, weight, bias, r, ls, s, eps, z_dtype, n_dtype)
        need = ctx.needs_input_grad
        ctx.save_for_backward(z, xd if need[4] else None, yd if need[5] or need[6] else None, weight, bias, r, ls, s)
        ctx.eps, ctx.dtypes = eps, (x.dtype, y.dtype)
        ctx.set_materialize_grads(False)
        return z, n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz, gn):
        needs = ctx.needs_input_grad[:7]
        if gz is None and gn is None:
            return (None,) * 10
        grads = _ln_backward(ctx.saved_tensors, gz, gn, ctx.eps, needs, ctx.dtypes)
        return (*grads, None, None, None)


def layernorm_triton(x, y=None, weight=None, bias=None, *, eps, res_scale=None, layer_scale=None, sample_scale=None,
                     z_dtype=None, out_dtype):
    """Triton implementation of ``layernorm_channels`` (``y`` None) and ``residual_layernorm`` (inputs
    validated by the caller; dtypes resolved: ``z_dtype`` for the residual stream, ``out_dtype`` for n).

    Returns:
        n, or (z, n) when ``y`` is given.

    Raises:
        RuntimeError: If the input is too wide or too large for the kernels (see :func:`unsupported_reason`).
    """
    reason = unsupported_reason(x)
    if reason is not None:
        raise RuntimeError(reason + "; use set_backend('auto') or set_backend('torch') for such inputs")
    weight, bias, r, ls, s = (None if t is None else t.contiguous() for t in (weight, bias, res_scale, layer_scale,
                                                                             sample_scale))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if y is None:
            if not wants_grad(x, weight, bias):
                return _ln_forward(x, None, weight, bias, None, None, None, float(eps), None, out_dtype)[3]
            return _LayerNorm.apply(x, weight, bias, float(eps), out_dtype)
        if not wants_grad(x, y, weight, bias, r, ls, s):
            return tuple(_ln_forward(x, y, weight, bias, r, ls, s, float(eps), z_dtype, out_dtype)[2:])
        return _ResidualLayerNorm.apply(x, y, weight, bias, r, ls, s, float(eps), z_dtype, out_dtype)


# -------------------------------------------------------------------------------------- StarReLU
def _flat_dense(t: torch.Tensor) -> torch.Tensor:
    """t itself if its storage is dense in NCHW or channels_last order (elementwise kernels read it flat)."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t
    return t.contiguous()


def _star_forward(x, scale, bias, out_dtype):
    x = _flat_dense(x)
    out = torch.empty_like(x, dtype=out_dtype)
    N, block = x.numel(), _slot.current.ew_block
    tk.star_relu_fwd_kernel[(cdiv(N, block),)](x, out, scale, bias, N, BLOCK=block, ACC=_acc(x.dtype)[0],
                                                       num_warps=_slot.current.ew_num_warps)
    return x, out


def _star_backward(x, scale, g, needs):
    need_x, need_s, need_b = needs
    if g.stride() != x.stride():  # e.g. a broadcast or transposed gradient: one copy into x's layout
        g = g.contiguous(memory_format=torch.contiguous_format if x.is_contiguous() else torch.channels_last)
    N, block, iters = x.numel(), _slot.current.ew_block, _slot.current.ew_bwd_iters
    nprog = cdiv(N, block * iters)
    _, acc = _acc(x.dtype)
    dx = torch.empty_like(x) if need_x else None
    ps = torch.empty(nprog, device=x.device, dtype=acc) if need_s else None
    pb = torch.empty(nprog, device=x.device, dtype=acc) if need_b else None
    tk.star_relu_bwd_kernel[(nprog,)](x, g, x if dx is None else dx, scale, x if ps is None else ps,
                                      x if pb is None else pb, N, iters, NEED_X=bool(need_x), NEED_S=bool(need_s),
                                      NEED_B=bool(need_b), BLOCK=block, ACC=_acc(x.dtype)[0],
                                      num_warps=_slot.current.ew_num_warps)
    return dx, ps, pb


class _StarReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, bias, out_dtype):
        xd, out = _star_forward(x, scale, bias, out_dtype)
        ctx.save_for_backward(xd, scale)
        ctx.x_dtype, ctx.bias_meta = x.dtype, (bias.shape, bias.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, scale = ctx.saved_tensors
        dx, ps, pb = _star_backward(x, scale, g, ctx.needs_input_grad[:3])
        ds = None if ps is None else ps.sum().reshape(scale.shape).to(scale.dtype)
        db = None if pb is None else pb.sum().reshape(ctx.bias_meta[0]).to(ctx.bias_meta[1])
        return None if dx is None else dx.to(ctx.x_dtype), ds, db, None


def star_relu_triton(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, *, out_dtype) -> torch.Tensor:
    """Triton implementation of ``star_relu`` (inputs validated, ``out_dtype`` resolved by the caller)."""
    if x.numel() > _INT32_MAX * 64:
        raise RuntimeError("the input is too large for the Triton StarReLU kernel's launch grid; use "
                           "set_backend('auto') or set_backend('torch')")
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if not wants_grad(x, scale, bias):
            return _star_forward(x, scale, bias, out_dtype)[1]
        return _StarReLU.apply(x, scale, bias, out_dtype)
