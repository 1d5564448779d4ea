"""The MLP half in training on CPU: one ``autograd.Function`` with a written-out backward.

The MLP half is ``y = rs * x + sample * ls * fc2(act(fc1(norm(x))))``: ``rs`` the res scale (or 1),
``sample`` the stochastic-depth factor of each sample (or 1), ``act`` ReLU, StarReLU or SquaredReLU.
Autograd through the plain composition keeps the norm's output, the hidden tensor before and after the
activation, StarReLU's intermediates and the products of the layer scale; this node keeps the normalised
input, the norm's statistics and the one hidden tensor the backward reads, ``relu(h)``. For StarReLU and
SquaredReLU, fc2's input ``relu(h) ** 2`` (StarReLU's scale and bias folded into fc2) is computed again in
the backward, one multiply with the forward's bits. (The node kept ``relu(h) ** 2`` and took ``relu(h)``
back as its square root until PyTorch's CPU ``sqrt`` measured 7-10x slower than a multiply: 6% of a
convformer_s18 training step.) A GELU MLP (PoolFormer v1, the v1 hybrids) trains through the plain
composition: with this node (which kept GELU's pre-activation and output) a poolformer_s12 step was 4.5%
slower in wall time (interleaved, 10 rounds, memory kept), for 2.7% less peak memory; for convformer_s18 the
node is 1.04x faster. Its forward runs the oneDNN primitives of inference (fp32) or matrix products on the channels_last rows (fp64); the backward is
matrix products on the same rows, with the small gradients (norm affine, layer and res scales,
StarReLU's scale and bias, biases) reduced from those products where possible::

    dW2 = ls * (G^T a),  d ls = rowsum(W2 * (G^T a)) + b2 * colsum(G),  d(StarReLU b) = colsum(G) . rowsum(ls W2),
    d(StarReLU s) = sum((ls W2) * (G^T relu(h)**2))

Every gradient equals the plain composition's (``tests/test_fastpaths.py``, fp32 and fp64). SepConv's half
(a depthwise convolution between the two) had such a node too; it measured no faster than the plain
composition on CPU, which it now runs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..tracing import from_sample_rows, sample_rows
from . import onednn
from .folding import _layers, act_kind, half_kind, ln_weight, normalise, plain_1x1, scale_of
from .twice import grads_through

__all__ = ["mlp_half", "PointwiseHalfFunction"]

_CL = torch.channels_last


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The (B*H*W, C) rows of a channels_last (B, C, H, W) tensor (a view)."""
    return rearrange(t, "b c h w -> (b h w) c")


def _rows_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The (B, C', H, W) channels_last map of rows ``t`` (B*H*W, C') laid out like ``x`` (a view)."""
    b, _, h, w = x.shape
    return rearrange(t, "(b h w) c -> b c h w", b=b, h=h, w=w)


def _norm_forward(kind: str, x: torch.Tensor, eps: float):
    """``(normalised x as rows, mean, rstd)`` without affine."""
    b, c, h, w = x.shape
    if kind == "ln":
        return torch.native_layer_norm(_rows(x), (c,), ln_weight(None, x, c), None, eps)
    # on each sample's row in memory order: ATen's channels_last kernel loses digits (tracing.sample_rows)
    rows = sample_rows(x)
    if rows is None:
        n, mean, rstd = torch.native_group_norm(x, None, None, b, c, h * w, 1, eps)
    else:
        n, mean, rstd = torch.native_group_norm(rows, None, None, b, 1, rows.shape[2], 1, eps)
        n = from_sample_rows(n, x)
    return _rows(n.contiguous(memory_format=_CL)), mean, rstd


def _norm_backward(kind: str, dn: torch.Tensor, x: torch.Tensor, mean, rstd) -> torch.Tensor:
    b, c, h, w = x.shape
    if kind == "ln":
        dx = torch.ops.aten.native_layer_norm_backward(dn, _rows(x), (c,), mean, rstd, None, None,
                                                       [True, False, False])[0]
        return _rows_like(dx, x)
    rows, dn = sample_rows(x), _rows_like(dn, x)
    if rows is None:
        return torch.ops.aten.native_group_norm_backward(dn, x, mean, rstd, None, b, c, h * w, 1,
                                                         [True, False, False])[0]
    dn = sample_rows(dn.contiguous(memory_format=torch.contiguous_format if x.is_contiguous() else _CL))  # x's order
    dx = torch.ops.aten.native_group_norm_backward(dn, rows, mean, rstd, None, b, 1, rows.shape[2], 1,
                                                   [True, False, False])[0]
    return from_sample_rows(dx, x)


def _rowmm(a: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """``a @ w.T + b`` on rows."""
    return torch.addmm(b, a, w.t()) if b is not None else a @ w.t()


# Rows from which the backward's data gradients (``G @ W``) run as oneDNN 1x1 convolutions on the channels_last
# map rather than as ``mm`` on its rows: 1.2-1.8x faster from poolformer_s12's third stage at batch 16 (3,136
# rows) up, slower at its fourth (784 rows), where oneDNN reorders a large weight for few rows.
_ONEDNN_GRAD_ROWS = 2048


def _data_grad(g: torch.Tensor, w: torch.Tensor, like: torch.Tensor, use_onednn: bool) -> torch.Tensor:
    """``g @ w`` for rows ``g`` (B*H*W, C_out) of a map laid out like ``like`` and a weight ``w`` (C_out, C_in):
    the gradient of a 1x1 convolution's input, as rows."""
    if use_onednn and g.shape[0] >= _ONEDNN_GRAD_ROWS and onednn.onednn_ok(g):
        out = onednn.conv(_rows_like(g, like), w.t().contiguous()[:, :, None, None], None)
        if out is not None:
            return _rows(out)
    return g @ w


class PointwiseHalfFunction(torch.autograd.Function):
    """The MLP half as one autograd node (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, gamma, beta, w1, b1, s, c, w2, b2, ls, rs, sample, cfg):
        kind, eps, act, use_onednn = cfg
        x_in, x = x, x.contiguous(memory_format=_CL)
        w1m, w2m = w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1)
        n, mean, rstd = _norm_forward(kind, x, eps)
        w1f = w1m * gamma if gamma is not None else w1m  # the norm's affine folded into pw1
        b1f = b1 if beta is None else (w1m @ beta if b1 is None else torch.addmv(b1, w1m, beta))
        w2f, b2f = w2m, b2
        if act == "star":  # StarReLU's s and b folded into fc2
            b2f = c * w2m.sum(1) if b2 is None else b2 + c * w2m.sum(1)
            w2f = w2m * s
        if ls is not None:
            w2f, b2f = w2f * ls[:, None], None if b2f is None else b2f * ls
        hidden = onednn.conv(_rows_like(n, x), w1f[:, :, None, None], b1f, "relu") if use_onednn else None
        if hidden is None:  # matrix products on the rows (fp64)
            hidden = _rows_like(_rowmm(n, w1f, b1f).relu_(), x)
        saved = hidden  # relu(h)
        pw2_in = _activation(saved, act)  # relu(h) ** 2 where the act squares: a tensor of its own
        res = x if rs is None else x * rs.view(1, -1, 1, 1)
        y = onednn.conv_add(pw2_in, res, w2f[:, :, None, None], b2f) if sample is None and use_onednn else None
        if y is None:
            out = _rows_like(_rowmm(_rows(pw2_in.contiguous(memory_format=_CL)), w2f, b2f), x)
            y = torch.addcmul(res, out, sample) if sample is not None else out.add_(res)
        ctx.cfg = cfg
        # relu(h) ** 2 is computed again in the backward; ReLU's fc2 input is ``saved`` itself.
        ctx.save_for_backward(x_in, mean, rstd, saved, n, gamma, beta, w1, w1f, b1, s, c, w2, b2, ls, rs,
                              sample)
        return y

    @staticmethod
    def backward(ctx, gy):
        kind, eps, act, use_onednn = ctx.cfg
        x, mean, rstd, saved, n, gamma, beta, w1, w1f, b1, s, c, w2, b2, ls, rs, sample = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients (kernels/twice.py)
            inputs = (x, gamma, beta, w1, b1, s, c, w2, b2, ls, rs, sample)
            return grads_through(lambda *t: _plain(*t, ctx.cfg), inputs, need, gy, 13)
        x = x.contiguous(memory_format=_CL)
        w1m, w2m = w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1)
        grads = [None] * 13
        gy = gy.contiguous(memory_format=_CL)
        g = _rows(gy)
        gs = g if sample is None else _rows((gy * sample).contiguous(memory_format=_CL))
        col = gs.sum(0)  # colsum(G)
        w2ls = w2m * ls[:, None] if ls is not None else w2m
        saved_rows = _rows(saved)
        a = _rows(_activation(saved, act))  # fc2 input (relu(h) ** 2 computed again where the act squares)
        p = gs.t() @ a  # G^T (fc2 input), (C_out, hidden)
        if act == "star":
            if need[5]:  # sum(dA * a') with dA = G (ls W2): sum((ls W2) * G^T a'), from the product, not the map
                grads[5] = (w2ls * p).sum().view(1)
            p = p.mul_(s).add_(c * col[:, None])  # G^T a with the unfolded a = s * a' + c
        if need[7]:
            grads[7] = (p * ls[:, None] if ls is not None else p).reshape(*w2m.shape, 1, 1)
        if need[8]:
            grads[8] = col * ls if ls is not None else col.clone()
        if need[9]:
            grads[9] = (w2m * p).sum(1) + (b2 * col if b2 is not None else 0)
        da = _data_grad(gs, w2ls, x, use_onednn)  # gradient of fc2's input, rows
        if act == "star" and need[6]:
            grads[6] = torch.dot(col, w2ls.sum(1)).view(1)
        del a
        factor = None
        if act == "relu":
            dh = torch.ops.aten.threshold_backward(da, saved_rows, 0)
        else:  # d/dh relu(h)**2 = 2 relu(h); da is this function's own, not needed after this
            dh = da.mul_(saved_rows)
            factor = 2 * s if act == "star" else 2.0
        dw1f = dh.t() @ n  # dL/dW1', W1' = W1 * gamma
        dn = _data_grad(dh, w1f, x, use_onednn)  # dL/d(normalised x)
        if factor is not None:
            dw1f, dn = dw1f.mul_(factor), dn.mul_(factor)
        db1f = None
        if need[4] or need[2] or (need[3] and beta is not None):
            db1f = dh.sum(0) if factor is None else dh.sum(0).mul_(factor)
        if need[3]:
            dw1 = dw1f * gamma if gamma is not None else dw1f.clone()
            grads[3] = (dw1.addr_(db1f, beta) if beta is not None else dw1).reshape(*dw1.shape, 1, 1)
        if need[1]:
            grads[1] = (w1m * dw1f).sum(0)
        if need[2]:
            grads[2] = w1m.t() @ db1f
        if need[4]:
            grads[4] = db1f
        if need[0]:
            dx = _norm_backward(kind, dn, x, mean, rstd)
            grads[0] = dx.add_(gy * rs.view(1, -1, 1, 1)) if rs is not None else dx.add_(gy)
        if need[10]:
            grads[10] = (g * _rows(x)).sum(0)
        return tuple(grads)


def _plain(x, gamma, beta, w1, b1, s, c, w2, b2, ls, rs, sample, cfg) -> torch.Tensor:
    """The half as the plain composition of the modules' ops (for second derivatives)."""
    kind, eps, act, _ = cfg
    h = F.conv2d(normalise(kind, x, eps, gamma, beta), w1, b1)
    a = torch.relu(h) if act == "relu" else torch.relu(h) ** 2
    a = s * a + c if act == "star" else a
    out = F.conv2d(a, w2, b2)
    out = out if ls is None else out * ls.view(1, -1, 1, 1)
    out = out if sample is None else out * sample
    return (x if rs is None else x * rs.view(1, -1, 1, 1)) + out


def _activation(saved: torch.Tensor, act: str) -> torch.Tensor:
    """The activation from the saved hidden tensor (StarReLU's s and b left out: they are folded into fc2)."""
    if act in ("star", "square"):
        return saved * saved  # the same bits in the forward and the backward
    return saved


def _usable(x: torch.Tensor, norm: nn.Module, drop_path: nn.Module, *scales) -> Optional[str]:
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() != 4 \
            or torch.compiler.is_compiling():
        return None
    return half_kind(norm, drop_path, *scales)


def _apply(x, norm, pw1, act_module, act, pw2, ls, rs, sample, kind):
    star = act == "star"
    params = [norm.weight, norm.bias, pw1.weight, pw1.bias, act_module.scale if star else None,
              act_module.bias if star else None, pw2.weight, pw2.bias, scale_of(ls), scale_of(rs)]
    if any(p is not None and p.dtype != x.dtype for p in params):
        return None
    cfg = (kind, float(norm.eps), act, onednn.onednn_ok(x))
    return PointwiseHalfFunction.apply(x, *params, sample(), cfg)


def mlp_half(block: nn.Module, x: torch.Tensor,
             draw_sample: Callable[[], Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """The MLP half of ``block`` as one autograd node, or None where it does not apply.

    It applies to CPU tensors (fp32 with oneDNN, or fp64) in eager mode, an :class:`~metaformer.layers.Mlp`
    of plain 1x1 convolutions with a ReLU / StarReLU / SquaredReLU (not GELU: see the module docstring) and no
    active dropout, after a ``GroupNorm1`` or ``LayerNorm2d``, with :class:`~metaformer.layers.Scale` or identity scales.
    ``draw_sample`` draws the stochastic-depth factor, (B, 1, 1, 1), or returns None; it is called only
    when the path applies, so that the random stream is consumed as the plain composition consumes it.
    """
    mlp = block.mlp
    kind = _usable(x, block.norm2, block.drop_path2, block.layer_scale2, block.res_scale2)
    if kind is None or type(mlp) is not _layers().Mlp or not (plain_1x1(mlp.fc1) and plain_1x1(mlp.fc2)):
        return None
    act = act_kind(mlp.act)
    if act not in ("relu", "star", "square") or (block.training and (mlp.drop1.p > 0 or mlp.drop2.p > 0)):
        return None
    return _apply(x, block.norm2, mlp.fc1, mlp.act, act, mlp.fc2, block.layer_scale2, block.res_scale2,
                  draw_sample, kind)
