"""SepConv's half in training on CPU: a StarReLU node and a depthwise convolution with a faster weight gradient.

**The depthwise convolution.** A depthwise k x k convolution's weight gradient is, for each channel, the
correlation of the padded input with the output gradient, summed over the batch::

    dW[c, i, j] = sum_b sum_(y, x) x_pad[b, c, y + i, x + j] * g[b, c, y, x]

PyTorch's CPU ``convolution_backward`` computes it ~10x slower than the forward convolution (convformer_s18 at
batch 16: 50 against 5.5 ms at stage 1; 390 of a 2,900 ms training step for the 18 depthwise convolutions). The
same sum is, for one sample, a *forward* depthwise convolution of that sample's input (C channels, padding p)
with its output gradient as the kernel (C, 1, H, W), whose output is k x k; a channels_last sample is already
the input's layout, and the forward primitive runs at the speed of the forward. So the backward here runs that
convolution for each sample and sums them: 3.3-3.7x faster than ``convolution_backward``'s weight gradient at
every ConvFormer stage at 224x224. On small maps (fewer than 196 positions) one call per sample costs more than
it computes: there the whole batch runs as one convolution of B x C groups (:func:`depthwise_weight_grad`), and
below 16 positions the node runs ``convolution_backward`` itself. The input gradient is the forward convolution of the output gradient with the flipped
kernel (stride 1; padding k - 1 - p, where that is not negative).

**StarReLU** ``s * relu(x) ** 2 + b`` as one node: the forward computes the plain composition's own ops (the same
bits) and keeps only ``relu(x)``; the backward is four passes over the tensor (``sum(g)``, ``t = g * relu(x)``,
``dot(t, relu(x))``, ``2 s t``), where autograd through the composition runs about twice as many and keeps
``relu(x) ** 2`` as well: 1.9-2.0x faster at ConvFormer's SepConv shapes.

Everything else in the half (the norm, the pointwise convolutions, the scales and stochastic depth) runs through
the parts themselves, as in the plain composition, so the random stream and autograd are theirs. The forwards are
the modules' ops (the same bits); the gradients equal the plain composition's to rounding
(``tests/test_fastpaths.py``, fp32 and fp64), also with ``create_graph=True`` (:mod:`~metaformer.kernels.twice`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import onednn
from .folding import _layers, _mixers, plain_depthwise
from .twice import grads_through

__all__ = ["DepthwiseConvFunction", "StarReLUFunction", "depthwise_weight_grad", "sepconv_half"]

_CL = torch.channels_last


# Output-gradient maps of at least this many positions take the weight gradient one sample at a time; smaller
# ones from at least _BATCHED_POSITIONS as one convolution of the whole batch (B x C groups, both tensors copied
# to NCHW, cheap at that size), where one call per sample would cost more than it computes (convformer_s18 at
# 32x32, batch 128: a training step 0.75x of the module's); below that the node runs PyTorch's own backward,
# where the flipped kernel's convolution is also slow (a 1x1 map, batch 128, 1,024 channels: 39 against 0.15 ms).
# Medians of the weight gradient alone, 7x7, against ``convolution_backward``'s, batch 16 to 128: per sample
# 1.6-3.4x at 14x14 and up, 0.6-3.0x below; the whole batch 2.1-6.3x from 4x4 to 13x13, 0.26-1.4x at 2x2.
_PER_SAMPLE_POSITIONS = 196
_BATCHED_POSITIONS = 16


def depthwise_weight_grad(x: torch.Tensor, grad_output: torch.Tensor, padding: Tuple[int, int],
                          kernel_size: Tuple[int, int]) -> torch.Tensor:
    """The weight gradient (C, 1, kh, kw) of a stride-1 depthwise convolution of ``x`` (B, C, H, W) with
    ``padding``, given the gradient of its output: a forward convolution per sample (module docstring), or for a
    map of fewer than ``_PER_SAMPLE_POSITIONS`` positions one of the whole batch as B x C groups."""
    b, c = x.shape[:2]
    if grad_output.shape[-2] * grad_output.shape[-1] >= _PER_SAMPLE_POSITIONS:
        total = None
        for s in range(b):
            part = F.conv2d(x[s:s + 1], grad_output[s].unsqueeze(1), padding=padding, groups=c)
            total = part if total is None else total.add_(part)
        return total.view(c, 1, *kernel_size)
    xs = x.contiguous().view(1, b * c, *x.shape[-2:])
    g = grad_output.contiguous().view(b * c, 1, *grad_output.shape[-2:])
    return F.conv2d(xs, g, padding=padding, groups=b * c).view(b, c, *kernel_size).sum(0).unsqueeze(1)


def _conv(x, weight, bias, padding):
    return F.conv2d(x, weight, bias, padding=padding, groups=weight.shape[0])


class DepthwiseConvFunction(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, padding=padding, groups=C)`` (stride 1, no dilation) with the backward of
    the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.padding = padding
        ctx.save_for_backward(x, weight, bias)
        return _conv(x, weight, bias, padding)

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias = ctx.saved_tensors
        need, padding = ctx.needs_input_grad, ctx.padding
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients (kernels/twice.py)
            return grads_through(lambda *t: _conv(*t, padding), (x, weight, bias), need, gy, 4)
        kh, kw = weight.shape[-2:]
        flipped = (kh - 1 - padding[0], kw - 1 - padding[1])
        if gy.shape[-2] * gy.shape[-1] < _BATCHED_POSITIONS or min(flipped) < 0:
            # a small map, or a padding wider than the kernel (the flipped kernel's would be negative): PyTorch's
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gy, x, weight, None if bias is None else [bias.shape[0]], [1, 1], list(padding), [1, 1], False,
                [0, 0], weight.shape[0], [need[0], need[1], need[2] and bias is not None])
            return gx, gw, gb, None
        gx = _conv(gy, weight.flip(-2, -1), None, flipped) if need[0] else None
        gw = depthwise_weight_grad(x, gy, padding, (kh, kw)) if need[1] else None
        gb = gy.sum((0, 2, 3)) if need[2] and bias is not None else None
        return gx, gw, gb, None


def _star(x, s, b):
    return s * torch.relu(x) ** 2 + b


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The sum of ``a * b`` for two maps of the same shape, without a temporary where both are channels_last
    or both contiguous."""
    if a.dim() == 4 and not (a.is_contiguous() and b.is_contiguous()) \
            and a.is_contiguous(memory_format=_CL) and b.is_contiguous(memory_format=_CL):
        a, b = a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)  # both (B, H, W, C) contiguous
    return torch.dot(a.reshape(-1), b.reshape(-1))


class StarReLUFunction(torch.autograd.Function):
    """:class:`~metaformer.layers.StarReLU`'s ``s * relu(x) ** 2 + b`` (``s``, ``b``: one-element tensors) with the
    backward of the module docstring."""

    @staticmethod
    def forward(ctx, x, s, b):
        r = torch.relu(x)
        ctx.save_for_backward(x, r, s, b)
        return (r * r).mul_(s).add_(b)  # the composition's ops in its order: r ** 2 is r * r

    @staticmethod
    def backward(ctx, gy):
        x, r, s, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True
            return grads_through(_star, (x, s, b), need, gy, 3)
        gb = gy.sum().view(1) if need[2] else None
        gx = gs = None
        if need[0] or need[1]:
            t = gy * r
            gs = _dot(t, r).view(1) if need[1] else None
            gx = t.mul_(2 * s) if need[0] else None  # relu(x) is 0 where x <= 0: ReLU's gradient
        return gx, gs, gb


def _plain_depthwise(conv: nn.Module, x: torch.Tensor) -> bool:
    """A :func:`~metaformer.kernels.folding.plain_depthwise` convolution on as many channels as ``x`` has, of
    ``x``'s dtype."""
    return (plain_depthwise(conv) and conv.in_channels == x.shape[1] and conv.weight.dtype == x.dtype
            and (conv.bias is None or conv.bias.dtype == x.dtype))


def sepconv_half(block: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The token-mixer half of a block whose mixer is :class:`~metaformer.mixers.SepConv`, in training on CPU
    (fp32 with oneDNN, or fp64), with a StarReLU ``act1`` through :class:`StarReLUFunction` and, in fp32, its
    depthwise convolution through :class:`DepthwiseConvFunction`; or None where that does not apply (another
    mixer, another device or dtype). A depthwise convolution of another kind (a stride, a dilation, another
    padding mode), or in fp64 or with oneDNN switched off (``torch.backends.mkldnn.flags(enabled=False)``), where
    PyTorch's per-sample convolutions are slower than the module's backward, runs as its module, in an otherwise
    identical half."""
    mixer = block.token_mixer
    if type(mixer) is not _mixers().SepConv or x.dim() != 4 or x.device.type != "cpu":
        return None
    fp32_onednn = onednn.onednn_ok(x)
    if not (fp32_onednn or x.dtype == torch.float64):
        return None
    h = mixer.pwconv1(block.norm1(x))
    act = mixer.act1
    if type(act) is _layers().StarReLU and act.scale.dtype == act.bias.dtype == h.dtype:
        h = StarReLUFunction.apply(h, act.scale, act.bias)
    else:
        h = act(h)
    dw = mixer.dwconv
    # (in fp64, or with oneDNN switched off by torch.backends.mkldnn, F.conv2d's other paths make the per-sample
    # convolutions 2-4x slower than the module's backward)
    if not (fp32_onednn and torch.backends.mkldnn.enabled and _plain_depthwise(dw, h)):
        mixed = mixer.pwconv2(mixer.act2(dw(h)))
    else:
        mixed = mixer.pwconv2(mixer.act2(DepthwiseConvFunction.apply(h, dw.weight, dw.bias, dw.padding)))
    return block.res_scale1(x) + block.layer_scale1(block.drop_path1(mixed))
