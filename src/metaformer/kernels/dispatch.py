"""The one place where a block leaves its plain composition for fused paths.

:class:`~metaformer.MetaFormerBlock` is the plain maths (``mixer_half`` then ``mlp_half``); in eager
mode its ``forward`` hands itself to :func:`block_forward`, which picks, for each half, a fused path
when one computes exactly the same function, or the block's own half otherwise:

- token-mixer half: :class:`~metaformer.mixers.Pooling` after a one-group
  :class:`~metaformer.layers.GroupNorm1` runs as :func:`~metaformer.kernels.pool_mixer_residual`
  (PyTorch or Triton; both have autograd, so this also serves training);
- MLP half: on CPU, in fp32, where autograd needs no graph, an ``Mlp`` with GELU runs as two oneDNN
  primitives (:mod:`metaformer.kernels.onednn`);
- on CPU a fused block works in channels_last, where oneDNN and ATen's pooling are fastest; the layout
  then carries through the following blocks (values are unchanged).

Nothing here runs under TorchScript (the block skips it), FX symbolic tracing, ``torch.jit.trace`` or
ONNX export, or with the ``"reference"`` backend: those see the plain composition.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# The package defines these before it imports this module (at its end).
from . import get_backend, onednn, pool_mixer_residual

__all__ = ["block_forward", "fast_paths_active", "pool_mixer_fusable"]


def fast_paths_active(x) -> bool:
    """Whether fused paths may run for ``x``: a real tensor, eager or torch.compile, not the reference backend."""
    if not isinstance(x, torch.Tensor) or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return get_backend() != "reference"


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of a :class:`~metaformer.MetaFormerBlock`, through fused paths where they apply."""
    if not fast_paths_active(x):
        return block.mlp_half(block.mixer_half(x))
    fused_mixer = pool_mixer_fusable(block)
    if fused_mixer and x.device.type == "cpu" and _nchw_contiguous(x):
        x = x.contiguous(memory_format=torch.channels_last)
    x = _fused_pool_half(block, x) if fused_mixer else block.mixer_half(x)
    y = _onednn_mlp_half(block, x)
    return y if y is not None else block.mlp_half(x)


def _nchw_contiguous(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous()


def pool_mixer_fusable(block: nn.Module) -> bool:
    """Whether the block's token-mixer half is the pooling identity's case (Pooling after GroupNorm1)."""
    from ..layers import DropPath, GroupNorm1, Scale
    from ..mixers import Pooling

    # The identity pool(GN(x)) - GN(x) = w * rstd * (pool(x) - x) needs count_include_pad=False pooling
    # (exactly our Pooling) after a one-group GroupNorm; a subclass of either may change the maths.
    return (type(block.token_mixer) is Pooling and type(block.norm1) is GroupNorm1
            and type(block.layer_scale1) in (Scale, nn.Identity) and type(block.res_scale1) in (Scale, nn.Identity)
            and type(block.drop_path1) in (DropPath, nn.Identity))


def _fused_pool_half(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from ..layers import Scale

    weight = block.norm1.weight
    if type(block.layer_scale1) is Scale:
        weight = weight * block.layer_scale1.scale
    bias = block.norm1.bias
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        # The norm's bias cancels exactly (its true gradient is zero); keep it in the graph so that it
        # gets that zero gradient, as DistributedDataParallel expects of every parameter.
        weight = weight + 0.0 * bias
    res_scale = block.res_scale1.scale if type(block.res_scale1) is Scale else None
    sample_scale = _drop_path_scale(block, x)
    return pool_mixer_residual(x, weight, eps=block.norm1.eps, pool_size=block.token_mixer.pool_size,
                               res_scale=res_scale, sample_scale=sample_scale)


def _drop_path_scale(block: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The per-sample factor of the block's stochastic depth in training (keep mask / keep prob), or None."""
    rate = float(getattr(block.drop_path1, "drop_prob", 0.0) or 0.0)
    if not block.training or rate <= 0.0:
        return None
    keep = 1.0 - rate
    return x.new_empty(x.shape[0], dtype=torch.float32).bernoulli_(keep).div_(keep)


def _onednn_mlp_half(block: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """Eval-mode CPU MLP half as two oneDNN primitives (GELU and residual add fused), else None."""
    from ..layers import Mlp, Scale

    mlp, ls, rs = block.mlp, block.layer_scale2, block.res_scale2
    if (block.training or type(mlp) is not Mlp or type(mlp.act) is not nn.GELU
            or type(ls) not in (Scale, nn.Identity) or type(rs) not in (Scale, nn.Identity)
            or not onednn.onednn_usable(x, block.parameters())):
        return None
    w2, b2 = mlp.fc2.weight, mlp.fc2.bias
    if type(ls) is Scale:  # fold layer scale 2 into fc2 (a few KB of weights per call)
        w2 = w2 * ls.scale.view(-1, 1, 1, 1)
        b2 = None if b2 is None else b2 * ls.scale
    res = x if type(rs) is nn.Identity else rs(x)
    return onednn.mlp_residual_onednn(block.norm2(x), res, mlp.fc1.weight, mlp.fc1.bias, w2, b2,
                                      mlp.act.approximate)
