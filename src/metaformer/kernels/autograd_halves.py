"""Training-mode MLP half of a block on CPU: one ``autograd.Function`` with a written-out backward.

``y = res * x + sample * ls * fc2(act(fc1(norm(x))))`` with ``res`` the res scale (or 1), ``sample``
the stochastic-depth factor of each sample (or 1) and ``act`` GELU, ReLU, StarReLU or SquaredReLU.
Autograd through the plain composition keeps four or five activation tensors per block (the norm's
output, the hidden tensor before and after the activation, StarReLU's intermediates, fc2's output for
the layer scale's gradient); this Function keeps one hidden tensor (GELU: the pre-activation; the
ReLU family: ``relu(h) ** 2``, from which ``relu(h) = sqrt(relu(h) ** 2)`` exactly) and the norm's
statistics, and recomputes the normalised input from ``x``. Its forward runs the oneDNN primitives of
inference (fp32) or matrix products on the channels_last rows (other dtypes); the backward is matrix
products on the same rows, with every small gradient (norm affine, layer and res scales, StarReLU's
scale and bias, biases) reduced from those products where possible rather than from another pass:

    dW2 = ls * (G^T a),  d ls = rowsum(W2 * (G^T a)) + b2 * colsum(G),  d(StarReLU bias) = colsum(G) . rowsum(ls W2)

Every gradient equals the plain composition's (``tests/test_fastpaths.py``, fp32 and fp64).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import onednn
from .folding import act_kind, norm_kind, scale_of, scales_known

__all__ = ["mlp_half", "MlpHalfFunction"]

_CL = torch.channels_last


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The (B*H*W, C) rows of a channels_last (B, C, H, W) tensor (a view)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _norm_forward(kind: str, x: torch.Tensor, eps: float):
    """``(normalised x as rows, mean, rstd)`` without affine."""
    b, c, h, w = x.shape
    if kind == "ln":
        n, mean, rstd = torch.native_layer_norm(_rows(x), (c,), None, None, eps)
        return n, mean, rstd
    n, mean, rstd = torch.native_group_norm(x, None, None, b, c, h * w, 1, eps)
    return _rows(n.contiguous(memory_format=_CL)), mean, rstd


def _norm_backward(kind: str, dn: torch.Tensor, x: torch.Tensor, mean, rstd) -> torch.Tensor:
    b, c, h, w = x.shape
    if kind == "ln":
        dx = torch.ops.aten.native_layer_norm_backward(dn, _rows(x), (c,), mean, rstd, None, None,
                                                       [True, False, False])[0]
        return dx.view(b, h, w, c).permute(0, 3, 1, 2)
    dn4 = dn.view(b, h, w, c).permute(0, 3, 1, 2)
    return torch.ops.aten.native_group_norm_backward(dn4, x, mean, rstd, None, b, c, h * w, 1,
                                                     [True, False, False])[0]


def _rows_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return t.view(b, h, w, -1).permute(0, 3, 1, 2)


class MlpHalfFunction(torch.autograd.Function):
    """The MLP half as one autograd node (see the module docstring); use :func:`mlp_half`."""

    @staticmethod
    def forward(ctx, x, gamma, beta, w1, b1, s, c, w2, b2, ls, rs, sample, kind, eps, act, use_onednn):
        x = x.contiguous(memory_format=_CL)
        hidden_n = w1.shape[0]
        w1m = w1.reshape(hidden_n, -1)
        w2m = w2.reshape(w2.shape[0], -1)
        n, mean, rstd = _norm_forward(kind, x, eps)
        # fc1 with the norm's affine folded in: W1' = W1 * gamma, b1' = b1 + W1 beta.
        w1f = w1m * gamma if gamma is not None else w1m
        b1f = b1
        if beta is not None:
            b1f = w1m @ beta if b1 is None else torch.addmv(b1, w1m, beta)
        # fc2 with the activation's scale and bias and the layer scale folded in.
        w2f, b2f = w2m, b2
        if act == "star":
            b_star = c * w2m.sum(1)
            b2f = b_star if b2 is None else b2 + b_star
            w2f = w2m * s
        if ls is not None:
            w2f = w2f * ls[:, None]
            b2f = None if b2f is None else b2f * ls
        res = x if rs is None else x * rs.view(1, -1, 1, 1)
        relu_family = act in ("relu", "star", "square")
        squared = act in ("star", "square")
        n4 = _rows_like(n, x)
        hidden = onednn.conv(n4, w1f[:, :, None, None], b1f, "relu" if relu_family else "none") \
            if use_onednn else None
        if hidden is None:  # matrix products on the rows (other dtypes, or no oneDNN)
            h2 = torch.addmm(b1f, n, w1f.t()) if b1f is not None else n @ w1f.t()
            hidden = _rows_like(h2.relu_() if relu_family else h2, x)
        if squared:
            hidden.square_()
        saved = hidden  # GELU: the pre-activation; ReLU family: relu(h) (** 2 where squared)
        a = F.gelu(hidden, approximate="tanh" if act == "gelu_tanh" else "none") if act.startswith("gelu") \
            else hidden
        y = None
        if sample is None and use_onednn:
            y = onednn.conv_add(a, res, w2f[:, :, None, None], b2f)
        if y is None:
            a2 = _rows(a.contiguous(memory_format=_CL))
            out = torch.addmm(b2f, a2, w2f.t()) if b2f is not None else a2 @ w2f.t()
            out4 = _rows_like(out, x)
            y = torch.addcmul(res, out4, sample) if sample is not None else out4.add_(res)
        ctx.cfg = (kind, eps, act)
        ctx.save_for_backward(x, mean, rstd, saved, gamma, beta, w1m, w1f, b1, s, c, w2m, b2, ls, rs, sample)
        return y

    @staticmethod
    def backward(ctx, gy):
        kind, eps, act = ctx.cfg
        x, mean, rstd, saved, gamma, beta, w1m, w1f, b1, s, c, w2m, b2, ls, rs, sample = ctx.saved_tensors
        need = ctx.needs_input_grad
        gy = gy.contiguous(memory_format=_CL)
        g = _rows(gy)
        gs = g if sample is None else _rows((gy * sample).contiguous(memory_format=_CL))
        a = saved
        if act.startswith("gelu"):
            a = F.gelu(saved, approximate="tanh" if act == "gelu_tanh" else "none")
        a2 = _rows(a)
        col = gs.sum(0)  # colsum(G)
        p = gs.t() @ a2  # G^T a' (C_out, hidden)
        w2ls = w2m * ls[:, None] if ls is not None else w2m
        if act == "star":
            p = p.mul_(s).add_(c * col[:, None])  # G^T a with a = s * a' + c
        grads = [None] * 16
        if need[7]:
            grads[7] = (p * ls[:, None] if ls is not None else p).reshape(*w2m.shape, 1, 1)
        if need[8]:
            grads[8] = col * ls if ls is not None else col.clone()
        if need[9]:
            grads[9] = (w2m * p).sum(1) + (b2 * col if b2 is not None else 0)
        da = gs @ w2ls  # (rows, hidden)
        if act == "star":
            if need[5]:
                grads[5] = torch.dot(da.view(-1), a2.reshape(-1)).view(1)
            if need[6]:
                grads[6] = torch.dot(col, w2ls.sum(1)).view(1)
        factor = None
        if act.startswith("gelu"):
            dh = torch.ops.aten.gelu_backward(da, _rows(saved), approximate="tanh" if act == "gelu_tanh" else "none")
        elif act == "relu":
            dh = torch.ops.aten.threshold_backward(da, a2, 0)
        else:  # d/dh relu(h)**2 = 2 relu(h), and relu(h) = sqrt(relu(h)**2) exactly
            dh = a2.sqrt().mul_(da)
            factor = 2 * s if act == "star" else 2.0
        n, _, _ = _norm_forward(kind, x, eps)
        dw1f = dh.t() @ n  # dL/dW1' (hidden, C) with W1' = W1 * gamma
        dn = dh @ w1f  # dL/d(normalised x)
        if factor is not None:
            dw1f = dw1f.mul_(factor)
            dn = dn.mul_(factor)
        db1f = None
        if need[4] or need[2] or (need[3] and beta is not None):
            db1f = dh.sum(0) if factor is None else dh.sum(0).mul_(factor)
        if need[3]:
            dw1 = dw1f * gamma if gamma is not None else dw1f.clone()
            if beta is not None:
                dw1 = dw1.addr_(db1f, beta)
            grads[3] = dw1.reshape(*dw1.shape, 1, 1)
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


def mlp_half(block: nn.Module, x: torch.Tensor,
             draw_sample: Callable[[], Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """The MLP half of ``block`` through :class:`MlpHalfFunction`, or None where it does not apply.

    It applies to CPU tensors (fp32 with oneDNN, or fp64) in eager mode, an :class:`~metaformer.layers.Mlp`
    with a GELU / ReLU / StarReLU / SquaredReLU and no active dropout, after a ``GroupNorm1`` or
    ``LayerNorm2d``, with :class:`~metaformer.layers.Scale` or identity scales. ``draw_sample`` draws the
    stochastic-depth factor, (B, 1, 1, 1), or returns None; it is called only when the path applies, so
    that the random stream is consumed exactly as the plain composition consumes it.
    """
    from ..layers import DropPath, Mlp

    mlp = block.mlp
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() != 4:
        return None
    if torch.compiler.is_compiling() or type(mlp) is not Mlp:
        return None
    if block.training and (mlp.drop1.p > 0 or mlp.drop2.p > 0):
        return None
    kind, act = norm_kind(block.norm2), act_kind(mlp.act)
    if kind is None or act is None or not scales_known(block.layer_scale2, block.res_scale2) \
            or type(block.drop_path2) not in (DropPath, nn.Identity):
        return None
    params = [block.norm2.weight, block.norm2.bias, mlp.fc1.weight, mlp.fc1.bias]
    star = act == "star"
    params += [mlp.act.scale if star else None, mlp.act.bias if star else None, mlp.fc2.weight, mlp.fc2.bias,
               scale_of(block.layer_scale2), scale_of(block.res_scale2)]
    if any(p is not None and p.dtype != x.dtype for p in params):
        return None
    use_onednn = onednn.onednn_ok(x)
    return MlpHalfFunction.apply(x, *params, draw_sample(), kind, float(block.norm2.eps), act, use_onednn)
