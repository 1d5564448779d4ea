"""Token-mixer halves in standard PyTorch ops, with fewer passes than the plain composition.

They have autograd through the ops themselves, so they also serve training (with stochastic depth)
and run under torch.compile:

- identity mixer ``rs * x + ls * norm(x)``: the norm with ``ls`` folded into its affine
  (``ls * (gamma * n + beta) = (ls * gamma) * n + ls * beta``, computed inside the norm kernel), then one
  addition (``torch.addcmul`` with the res scale): two kernels instead of four;
- random mixing ``rs * x + ls * (norm(x) R^T over positions)``: the same norm, then one batched matrix
  product on the channels_last rows that adds the residual as it goes (``baddbmm``); no layout copy.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .folding import half_kind, normalise, scale_of
from .torch_impl import writable_temporary

__all__ = ["identity_half", "random_mixing_half", "identity_mix", "random_mix"]


def _parts(block: nn.Module):
    return half_kind(block.norm1, block.drop_path1, block.layer_scale1, block.res_scale1)


def _scaled_affine(block: nn.Module):
    norm, ls = block.norm1, scale_of(block.layer_scale1)
    weight = norm.weight if ls is None else norm.weight * ls
    bias = norm.bias if ls is None or norm.bias is None else norm.bias * ls
    return weight, bias


def identity_half(block: nn.Module, x: torch.Tensor,
                  draw_sample: Callable[[], Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """``rs1 * x + ls1 * DropPath(norm1(x))`` for an identity mixer, or None if the parts are not known ones.

    ``draw_sample`` returns the stochastic-depth factor (B, 1, 1, 1) or None; it is called once, after
    the checks, where the plain composition draws it.
    """
    kind = _parts(block)
    if kind is None:
        return None
    weight, bias = _scaled_affine(block)
    return identity_mix(x, kind, block.norm1.eps, weight, bias, scale_of(block.res_scale1), draw_sample)


def identity_mix(x, kind, eps, weight, bias, res_scale, draw_sample=lambda: None) -> torch.Tensor:
    """``res_scale * x + sample * norm(x; weight, bias)``."""
    mixed = normalise(kind, x, eps, weight, bias)
    sample = draw_sample()
    if sample is not None:
        mixed = mixed * sample
    if writable_temporary(x, weight, bias, res_scale):  # add into the norm's output: no new tensor
        return mixed.add_(x) if res_scale is None else mixed.addcmul_(x, res_scale.view(1, -1, 1, 1))
    return x + mixed if res_scale is None else torch.addcmul(mixed, x, res_scale.view(1, -1, 1, 1))


def random_mixing_half(block: nn.Module, x: torch.Tensor,
                       draw_sample: Callable[[], Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """``rs1 * x + ls1 * DropPath(RandomMixing(norm1(x)))`` on the channels_last rows, or None.

    Applies to a channels_last ``x`` (the dispatch converts CPU inputs) of the mixer's spatial size.
    """
    kind = _parts(block)
    mixer = block.token_mixer
    if kind is None or not x.is_contiguous(memory_format=torch.channels_last) \
            or tuple(mixer.spatial_size) != tuple(x.shape[2:]) or mixer.random_matrix.dtype != x.dtype:
        return None
    weight, bias = _scaled_affine(block)
    return random_mix(x, kind, block.norm1.eps, weight, bias, mixer.random_matrix, scale_of(block.res_scale1),
                      draw_sample)


def random_mix(x, kind, eps, weight, bias, matrix, res_scale, draw_sample=lambda: None) -> torch.Tensor:
    """``res_scale * x + sample * (norm(x; weight, bias) mixed over positions by matrix)``, channels_last."""
    b, c, h, w = x.shape
    n = normalise(kind, x, eps, weight, bias).contiguous(memory_format=torch.channels_last)
    tokens = n.permute(0, 2, 3, 1).reshape(b, h * w, c)
    matrix = matrix.expand(b, h * w, h * w)
    sample = draw_sample()
    res = x if res_scale is None else x * res_scale.view(1, -1, 1, 1)
    res_rows = res.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(b, h * w, c)
    if sample is None:
        y = torch.baddbmm(res_rows, matrix, tokens)
    else:
        y = torch.addcmul(res_rows, torch.bmm(matrix, tokens), sample.view(b, 1, 1))
    return y.view(b, h, w, c).permute(0, 3, 1, 2)
