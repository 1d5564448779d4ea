"""The PyTorch formulations of channel LayerNorm, the residual update before it, and StarReLU.

They are the plain compositions the MetaFormer baselines' layers run (``LayerNorm2d``: a LayerNorm
over the channels at every position, ``Scale``, ``DropPath``, ``StarReLU``), so they serve both the
``"torch"`` and the ``"reference"`` backends, and they are what the Triton kernels are checked against.
Inputs are assumed validated by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["layernorm_channels_torch", "residual_layernorm_torch", "star_relu_torch"]


def _channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def layernorm_channels_torch(x, weight=None, bias=None, *, eps: float, out_dtype=None) -> torch.Tensor:
    """``LayerNorm2d``'s forward: ``F.layer_norm`` over C of the (B, H, W, C) view, then cast to ``out_dtype``."""
    n = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps).permute(0, 3, 1, 2)
    return n if out_dtype is None else n.to(out_dtype)


def residual_layernorm_torch(x, y, weight=None, bias=None, *, eps: float, res_scale=None, layer_scale=None,
                             sample_scale=None, out_dtype=None):
    """``z = res_scale * x + layer_scale * (sample_scale * y)`` (the block's residual update, scales in the
    order ``Scale(DropPath(y))`` applies them; the drop-path factor in ``y``'s dtype) and ``LN(z)``.

    Returns:
        (z, n).
    """
    z = x if res_scale is None else x * _channel(res_scale)
    if sample_scale is not None:
        y = y * sample_scale.to(y.dtype).view(-1, 1, 1, 1)
    if layer_scale is not None:
        y = y * _channel(layer_scale)
    z = z + y
    return z, layernorm_channels_torch(z, weight, bias, eps=eps, out_dtype=out_dtype)


def star_relu_torch(x, scale, bias, *, out_dtype=None) -> torch.Tensor:
    """``StarReLU``'s forward, ``scale * relu(x) ** 2 + bias``, then cast to ``out_dtype``."""
    y = scale * torch.relu(x) ** 2 + bias
    return y if out_dtype is None else y.to(out_dtype)
