"""What the fast paths recognise in a block, and the folded weights they run with.

Recognition is by exact type (a subclass may change the maths): one-group :class:`~metaformer.layers.GroupNorm1`
or channel :class:`~metaformer.layers.LayerNorm2d` norms, :class:`~metaformer.layers.Scale` or identity
scales, GELU / ReLU / :class:`~metaformer.layers.StarReLU` / :class:`~metaformer.layers.SquaredReLU`
activations. The folds, computed in float64 and cast back (see ``docs/kernels.md``)::

    fc1(gamma * n + beta)            = (W1 * gamma) n + (W1 beta + b1)          norm affine -> next conv
    ls * fc2(s * relu(h)**2 + b)     = (ls * s * W2) relu(h)**2 + ls * (W2 b 1 + b2)
                                                                             layer scale, StarReLU -> fc2

Everything here is evaluation-time maths on parameters; the results are cached per block by
:func:`metaformer.kernels.cache.derived` (refolded whenever a parameter changes).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..tracing import fp32_list_dtype, group_norm
from .torch_impl import wants_grad, writable_temporary

__all__ = ["norm_kind", "act_kind", "scale_of", "half_kind", "normalise", "group_norm1", "group_norm1_pays", "ln_weight",
           "fold_in", "fold_out", "Folded", "NORM_TYPES", "plain_1x1", "plain_depthwise", "plain_sepconv"]


# The modules whose classes the fast paths recognise, imported at the first look-up (they import the kernels, so
# not at the top). A plain dict rather than functools.cache, and an import statement rather than
# importlib.import_module: torch.compile warns about tracing through a cache wrapper, and breaks its graph at
# import_module where a model's first call is compiled.
_MODULES: dict = {}


def _module(name: str):
    """``metaformer.<name>`` (``layers``, ``mixers`` or ``blocks``), imported once."""
    module = _MODULES.get(name)
    if module is None:
        from .. import blocks, layers, mixers

        # (item by item: torch.compile before PyTorch 2.4 cannot trace dict.update on a global)
        _MODULES["layers"], _MODULES["mixers"], _MODULES["blocks"] = layers, mixers, blocks
        module = _MODULES[name]
    return module


def _layers():
    return _module("layers")


def _mixers():
    return _module("mixers")


def _blocks():
    return _module("blocks")


def norm_kind(norm: nn.Module) -> Optional[str]:
    """``"gn"`` (one-group GroupNorm1), ``"ln"`` (channel LayerNorm2d), or None for anything else."""
    layers = _layers()
    if type(norm) is layers.GroupNorm1:
        return "gn"
    if type(norm) is layers.LayerNorm2d:
        return "ln"
    return None


NORM_TYPES = ("gn", "ln")


def act_kind(act: nn.Module) -> Optional[str]:
    """``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"star"`` (StarReLU), ``"square"`` (SquaredReLU) or None."""
    layers = _layers()
    if type(act) is nn.GELU:
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if type(act) is nn.ReLU:
        return "relu"
    if type(act) is layers.StarReLU:
        return "star"
    if type(act) is layers.SquaredReLU:
        return "square"
    return None


def scale_of(module: nn.Module) -> Optional[torch.Tensor]:
    """The (C,) parameter of a :class:`Scale`; None for an identity. Raises TypeError for anything else."""
    layers = _layers()
    if type(module) is layers.Scale:
        return module.scale
    if type(module) is nn.Identity:
        return None
    raise TypeError(type(module).__name__)


def scales_known(*modules: nn.Module) -> bool:
    """Whether every module is a :class:`Scale` or an identity."""
    layers = _layers()
    return all(type(m) in (layers.Scale, nn.Identity) for m in modules)


def half_kind(norm: nn.Module, drop_path: nn.Module, *scales: nn.Module) -> Optional[str]:
    """The kind of a half's ``norm`` (:func:`norm_kind`) where its ``scales`` are known (:func:`scales_known`)
    and its ``drop_path`` is a :class:`~metaformer.layers.DropPath` or an identity; None otherwise."""
    if not scales_known(*scales) or type(drop_path) not in (_layers().DropPath, nn.Identity):
        return None
    return norm_kind(norm)


def ln_weight(weight: Optional[torch.Tensor], x: torch.Tensor, c: int) -> Optional[torch.Tensor]:
    """``weight``, or for a LayerNorm without one on CPU a weight of ones (the same values, bit for bit).

    PyTorch's CPU LayerNorm forward runs a scalar loop when it has no weight, and a vectorised one when it
    has: at (16, 56, 56, 64) fp32 on AVX-512, 2.2 ms against 1.1 ms. Its backward and GroupNorm have no
    such difference (``benchmarks/bench_cpu_layernorm.py``). The ones are made once per width and dtype and
    shared (read only): a fresh tensor per call cost an allocation and a fill at every norm, 60 per
    convformer_s18 forward at batch 16.
    """
    if weight is not None or x.device.type != "cpu":
        return weight
    if torch.compiler.is_compiling():
        return x.new_ones(c)
    ones = _ONES.get((c, x.dtype))
    if ones is None:  # made once per width and dtype (a block's norms ask at every call)
        with torch.inference_mode(False):  # an ordinary tensor: usable in and out of inference mode
            ones = _ONES[(c, x.dtype)] = torch.ones(c, dtype=x.dtype)
    return ones


# (channels, dtype) -> a CPU tensor of ones that nothing writes to: the weight of ln_weight's LayerNorms
_ONES: dict = {}


def normalise(kind: str, x: torch.Tensor, eps: float, weight: Optional[torch.Tensor] = None,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The norm of ``x`` (``kind`` as :func:`norm_kind`), with an optional per-channel affine.

    The channel LayerNorm works on the NHWC view of ``x``: for a channels_last ``x`` that is a
    contiguous view (no copy) and the result is channels_last too; so is the GroupNorm's (ATen's on CPU,
    :func:`group_norm1` in CUDA inference, see :func:`group_norm1_pays`). For a channels_last CPU ``x``,
    ATen's GroupNorm runs on each sample's contiguous row (:func:`metaformer.tracing.group_norm`), where its
    channels_last kernel would lose digits; with the affine in place where no graph is needed.
    """
    if kind == "gn":
        if x.is_cuda and group_norm1_pays(x, weight, bias):
            return group_norm1(x, weight, bias, eps)
        return group_norm(x, 1, weight, bias, eps, affine_in_place=writable_temporary(x, weight, bias))
    c = x.shape[1]
    y = F.layer_norm(x.permute(0, 2, 3, 1), (c,), ln_weight(weight, x, c), bias, eps)
    return y.permute(0, 3, 1, 2)


def group_norm1_pays(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> bool:
    """Whether a one-group GroupNorm of a CUDA ``x`` runs as :func:`group_norm1` rather than ATen's
    ``F.group_norm``: where autograd needs no graph (the callers check the device).

    ATen's CUDA GroupNorm returns a channels_last input's result in NCHW, and the layers after it then run
    in mixed layouts. On an H100 (bf16 autocast, batch 128, channels_last, the best of interleaved rounds)
    keeping the layout made inference 1.22x faster for poolformer_s12 and 1.32x for identityformer_s12; the
    GPU's time alone (CUDA-graph replays) 1.26x for poolformer_s12 and 1.35x for poolformerv2_s12. In
    training the composition's backward launches more kernels than ATen's and the step was slower (0.71-0.96x
    over the pooling, identity and random-mixing families), so there ATen's GroupNorm runs.
    """
    return not wants_grad(x, weight, bias)


def group_norm1(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``F.group_norm(x, 1, weight, bias, eps)`` in ``x``'s memory format, with autograd.

    Per-sample statistics in fp32 (fp64 for an fp64 ``x``), then one ``a * x + c`` with per-sample,
    per-channel ``a = weight * rstd`` and ``c = bias - mean * a``: the affine form ATen's GroupNorm kernels
    evaluate, so the same values to rounding. The (B, C, 1, 1) factors broadcast, so the result has ``x``'s
    strides: a channels_last ``x`` gives a channels_last result, where ATen's CUDA GroupNorm returns NCHW.

    Args:
        x: A (B, C, H, W) floating tensor.
        weight, bias: Per-channel affine, or None.
        eps: Added to the variance.
        out_dtype: The result's dtype (e.g. the one a following convolution casts to under autocast);
            None: the dtype ``F.group_norm`` returns (fp32 for a half-precision CUDA ``x`` under autocast,
            else ``x``'s).
    """
    stats = x if x.dtype in (torch.float32, torch.float64) else x.float()
    var, mean = torch.var_mean(stats, dim=(1, 2, 3), keepdim=True, correction=0)
    # Where no graph is needed (inference, eager): the small factors in place and the result written in its
    # dtype by the last op (launches cost the host more than these ops cost the GPU; the cast was a pass).
    fresh = writable_temporary(x, weight, bias)
    a = var.add_(eps).rsqrt_() if fresh else torch.rsqrt(var + eps)
    if weight is not None:
        a = weight.to(stats.dtype).view(1, -1, 1, 1) * a
    if bias is not None:
        c = torch.addcmul(bias.to(stats.dtype).view(1, -1, 1, 1), mean, a, value=-1)
    else:
        c = -mean * a
    dtype = out_dtype or fp32_list_dtype(x.dtype, x.device.type)
    if fresh:
        return torch.addcmul(c, x, a, out=torch.empty_like(x, dtype=dtype))
    return torch.addcmul(c, x, a).to(dtype)


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(torch.float64)


def fold_in(weight: torch.Tensor, bias: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
            beta: Optional[torch.Tensor]):
    """``(W', b')`` with ``W' x + b' = W (gamma * x + beta) + b`` for a 1x1 conv or linear weight, in float64."""
    w = _f64(weight)
    b = _f64(bias)
    if beta is not None:
        extra = w.reshape(w.shape[0], w.shape[1]) @ _f64(beta)
        b = extra if b is None else b + extra
    if gamma is not None:
        w = w * _f64(gamma).view(1, -1, *([1] * (w.dim() - 2)))
    return w, b


def fold_out(weight: torch.Tensor, bias: Optional[torch.Tensor], scale: Optional[torch.Tensor] = None,
             star: Optional[tuple] = None):
    """``(W', b')`` with ``W' a + b' = scale * (W (s * a + c) + b)``, in float64.

    ``star = (s, c)`` are StarReLU's scale and bias (absent: 1 and 0), ``scale`` a per-output-channel
    factor (a layer scale; absent: 1). ``weight`` is a conv (any kernel size is fine only without
    ``c``) or linear weight.
    """
    w = _f64(weight)
    b = _f64(bias)
    if star is not None:
        s, c = (_f64(t) for t in star)
        b_star = c * w.reshape(w.shape[0], -1).sum(1)
        b = b_star if b is None else b + b_star
        w = w * s
    if scale is not None:
        sc = _f64(scale)
        w = w * sc.view(-1, *([1] * (w.dim() - 1)))
        b = None if b is None else b * sc
    return w, b


def plain_1x1(conv: nn.Module) -> bool:
    """Whether ``conv`` is an ``nn.Conv2d`` 1x1, stride 1, no padding, one group (a matrix product per position)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding in ((0, 0), "valid") and conv.groups == 1 and conv.dilation == (1, 1))


def plain_depthwise(conv: nn.Module) -> bool:
    """Whether ``conv`` is an ``nn.Conv2d`` depthwise (one group per channel, as many out as in), stride 1, no
    dilation, zero padding given as numbers (any kernel and padding)."""
    return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple))


def plain_sepconv(m: nn.Module) -> bool:
    """Whether a :class:`~metaformer.mixers.SepConv` is pw 1x1 -> act -> depthwise k x k 'same' -> pw 1x1."""
    dw = m.dwconv
    k = dw.kernel_size[0]
    return (type(m.act2) is nn.Identity and plain_1x1(m.pwconv1) and plain_1x1(m.pwconv2) and plain_depthwise(dw)
            and k % 2 == 1 and dw.kernel_size == (k, k) and dw.padding == (k // 2, k // 2))


class Folded(NamedTuple):
    """The weights of one folded half: plain float tensors, oneDNN-packed where noted."""

    w1: torch.Tensor
    b1: Optional[torch.Tensor]
    w2: torch.Tensor
    b2: Optional[torch.Tensor]
    extra: tuple = ()


def cast(t: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """``t`` (float64) cast to ``like``'s dtype and device, contiguous."""
    return None if t is None else t.to(dtype=like.dtype, device=like.device).contiguous()
