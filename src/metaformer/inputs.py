"""Checks of a model's input batch, with errors that say what was expected and how to fix it.

They run in eager calls only: the model skips them under TorchScript, FX symbolic tracing, jit
tracing, ONNX export and ``torch.compile`` (see :mod:`metaformer.tracing`).
"""

from __future__ import annotations

import torch
from torch import nn

from .tracing import autocast_enabled

__all__ = ["check_input", "conv_out"]


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


def check_input(model: nn.Module, x) -> None:
    """Raises a clear error if ``x`` is not a batch that ``model`` (a MetaFormer) can take.

    Checks the type, rank, channel count and dtype of ``x``, and that every stage with a fixed
    spatial size (position embedding, spatial MLP, random mixing) gets exactly that size.

    Raises:
        TypeError: for a non-tensor, a non-floating tensor, or a dtype other than the weights'.
        ValueError: for a wrong rank, channel count or spatial size.
    """
    in_chans = model.in_chans
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of shape (B, {in_chans}, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input (B, {in_chans}, H, W), got shape {tuple(x.shape)}; "
                         f"add a batch dimension with x.unsqueeze(0) for a single image")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got shape {tuple(x.shape)}; "
                         f"build the model with in_chans={x.shape[1]} or convert the images")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input, got dtype {x.dtype}; "
                        f"convert with x.float() and normalise it")
    weight = model.stem.conv.weight
    if x.dtype != weight.dtype and not autocast_enabled(x.device.type):
        raise TypeError(f"input of dtype {x.dtype} but the model's weights are {weight.dtype}; convert the "
                        f"input (x.to({weight.dtype})) or the model (model.to({x.dtype})), or use torch.autocast")
    h, w = x.shape[-2:]
    if h < 3 or w < 3:
        raise ValueError(f"input of spatial size {h}x{w} is too small: the stem needs at least 3x3")
    h, w = conv_out(h, 7, 4, 2), conv_out(w, 7, 4, 2)
    for i, stage in enumerate(model.stages):
        if i > 0:
            h, w = conv_out(h, 3, 2, 1), conv_out(w, 3, 2, 1)
        need = stage.spatial_size
        if need is not None and (h, w) != tuple(need):
            side = tuple(need)
            raise ValueError(
                f"stage {i + 1} has a fixed spatial size {side[0]}x{side[1]} (position embedding or "
                f"spatial mixer) but input {tuple(x.shape[-2:])} gives {h}x{w} there; "
                f"this model only takes {model.fixed_input_size_hint()} inputs")
