"""The MetaFormer baselines' block halves through the Triton LayerNorm / StarReLU kernels (CUDA).

Each function computes exactly one half of a :class:`~metaformer.MetaFormerBlock` (or the whole
block), with autograd, or returns None when it does not apply, so that the dispatch falls back to the
block's own half:

- :func:`ln_mixer_half`: ``block.mixer_half(x)`` with ``norm1`` (a ``LayerNorm2d``) as the Triton
  kernel, or (a one-group ``GroupNorm1``, in inference) in the input's layout; the token mixer, the drop
  path and the scales are the block's own modules.
- :func:`starrelu_mlp_half`: ``block.mlp_half(x)`` with ``norm2`` (a ``LayerNorm2d`` as the Triton
  kernel, a ``GroupNorm1`` in inference in the input's layout) and the MLP's ``StarReLU`` as Triton
  kernels (either one suffices); the dropouts, drop path and scales are the block's own modules.
- :func:`ln_block`: ``block.mlp_half(block.mixer_half(x))`` with the mixer half's residual update
  (res scale, drop path, layer scale) fused with ``norm2`` (``residual_layernorm``: one pass writes
  the residual stream and its normalised copy); the drop-path mask is drawn as ``DropPath`` draws it,
  so the random stream and the values are those of the plain block.

In all three the MLP's 1x1 convolutions, and a ``SepConv`` mixer's (whose ``StarReLU`` runs as the kernel
too), run on a channels_last map as matrix products of its (B, H, W, C) view (``_pointwise``): the same
values, and cuBLAS's launch costs the host much less than cuDNN's convolution. A half's residual update with a
scale, ``res_scale(x) + layer_scale(y)``, is one ``torch.addcmul`` (``_residual``) where the block's own
modules would write and read the product.

Where autograd needs no graph (inference), ``GroupNorm1`` runs as
:func:`metaformer.kernels.folding.group_norm1`: the values of ATen's GroupNorm in the input's memory
format (ATen's CUDA GroupNorm returns a channels_last input's result in NCHW, so every following 1x1
convolution and residual addition of the MLP half ran in mixed layouts, with conversions); under autocast
it is written in the dtype the next 1x1 convolution casts to. In training ATen's GroupNorm runs
(:func:`metaformer.kernels.folding.group_norm1_pays`).

They apply to 4-D floating tensors (fp32, fp16, bf16, fp64) that the kernels take: CUDA tensors under
the ``"auto"`` or ``"triton"`` backend outside torch.compile / TorchScript / ONNX tracing, and CPU
tensors only under ``TRITON_INTERPRET=1`` with the ``"triton"`` backend forced (how the tests run
them). The kernels themselves self-check on first use per configuration and fall back to the
composition on a failure (``baseline_ops``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import DropPath, Mlp, Scale, StarReLU
from ..mixers import SepConv, check_mixer_output
from ..tracing import autocast_dtype, autocast_enabled
from . import _interpreting, resolve_backend
from .baseline_ops import layernorm_channels, residual_layernorm, star_relu
from .folding import group_norm1, group_norm1_pays, half_kind, norm_kind, plain_1x1

__all__ = ["edge_norm", "halves_apply", "ln_block", "ln_mixer_half", "starrelu_mlp_half"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def halves_apply(x) -> bool:
    """Whether the Triton block halves may run for ``x`` (a cheap test of the tensor and the backend).

    Args:
        x: The block's input.

    Returns:
        True for a 4-D tensor of a kernel dtype on CUDA (or on CPU under ``TRITON_INTERPRET=1``) whose
        backend resolves to ``"triton"``, outside tracing; False otherwise.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype not in _DTYPES:
        return False
    if not (x.is_cuda or _interpreting()):
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return False
    return resolve_backend(x) == "triton"


def ln_mixer_half(block: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``block.mixer_half(x)`` with ``norm1`` as the Triton LayerNorm kernel (a ``GroupNorm1``, in inference,
    in the input's layout), or None if it does not apply.

    Args:
        block: A :class:`~metaformer.MetaFormerBlock`.
        x: Its (B, C, H, W) input.

    Returns:
        ``res_scale1(x) + layer_scale1(drop_path1(token_mixer(norm1(x))))``, or None when ``norm1`` is
        neither a ``LayerNorm2d`` nor (where autograd needs no graph) a ``GroupNorm1``, or
        :func:`halves_apply` is False.
    """
    if not halves_apply(x):
        return None
    n = _normalised(getattr(block, "norm1", None), x)
    if n is None:
        return None
    mixed = _mix(block.token_mixer, n)
    check_mixer_output(block.token_mixer, x, mixed)
    return _residual(block.res_scale1, block.layer_scale1, block.drop_path1(mixed), x)


def starrelu_mlp_half(block: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``block.mlp_half(x)`` with ``norm2`` (a ``LayerNorm2d``, or in inference a ``GroupNorm1``) and the
    MLP's StarReLU as Triton kernels, or None.

    Args:
        block: A :class:`~metaformer.MetaFormerBlock`.
        x: Its (B, C, H, W) input.

    Returns:
        ``res_scale2(x) + layer_scale2(drop_path2(mlp(norm2(x))))``, or None when the MLP is not the
        library's ``Mlp``, neither ``norm2`` is a ``LayerNorm2d`` (or, in inference, a ``GroupNorm1``) nor
        the activation a ``StarReLU``, or :func:`halves_apply` is False.
    """
    mlp = _mlp(block)
    if mlp is None or not halves_apply(x):
        return None
    n = _normalised(block.norm2, x, _cast_dtype(x, mlp.fc1))
    if n is None and not _is_star(mlp.act):
        return None
    return _mlp_tail(block, mlp, x, block.norm2(x) if n is None else n)


def ln_block(block: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The whole block, ``block.mlp_half(block.mixer_half(x))``, with the mixer half's residual update
    fused with ``norm2`` (and both norms and StarReLU as Triton kernels), or None if it does not apply.

    Args:
        block: A :class:`~metaformer.MetaFormerBlock`.
        x: Its (B, C, H, W) input.

    Returns:
        The block's output, or None unless both norms are ``LayerNorm2d``, the MLP is the library's
        ``Mlp``, the mixer half's scales are ``Scale`` or identities, its drop path a ``DropPath`` or an
        identity, and :func:`halves_apply` is True.
    """
    norm1, norm2 = _layernorm(getattr(block, "norm1", None)), _layernorm(getattr(block, "norm2", None))
    mlp = _mlp(block)
    if norm1 is None or norm2 is None or mlp is None or not halves_apply(x) \
            or half_kind(block.norm1, block.drop_path1, block.layer_scale1, block.res_scale1) is None:
        return None
    mixed = _mix(block.token_mixer, layernorm_channels(x, norm1.weight, norm1.bias, eps=norm1.eps))
    check_mixer_output(block.token_mixer, x, mixed)
    z, n = residual_layernorm(x, mixed, norm2.weight, norm2.bias, eps=norm2.eps, res_scale=_scale(block.res_scale1),
                              layer_scale=_scale(block.layer_scale1), sample_scale=_drop_mask(block.drop_path1, mixed),
                              out_dtype=_cast_dtype(x, mlp.fc1))
    return _mlp_tail(block, mlp, z, n)


def edge_norm(norm: nn.Module, x: torch.Tensor, conv: Optional[nn.Module] = None) -> Optional[torch.Tensor]:
    """``norm(x)`` through the Triton LayerNorm kernel for the norm of a :class:`~metaformer.layers.Stem` (after
    its convolution) or a :class:`~metaformer.layers.Downsample` (before it), or None if it does not apply.

    Under CUDA autocast ATen's LayerNorm (on autocast's float32 list) reads the stem convolution's bf16 output
    through an fp32 copy, and writes fp32 that the downsampling's convolution copies to bf16 again; the kernel
    reads and writes those dtypes directly. On an H100 (batch 128, channels_last, bf16 autocast; the norm
    alone) ATen's took 0.67 ms for the stem's norm and 0.59 ms for the first downsampling's, the kernel 0.06
    and 0.09 ms (``benchmarks/bench_gpu_edge_norms.py``). The values are those of the plain norm to
    rounding, in the same layout: it applies to a channels_last map only (``LayerNorm2d`` returns
    channels_last for an NCHW map too, where the kernel would keep NCHW, and the convolution after it would
    then run in the other layout).

    Args:
        norm: The module's norm.
        x: Its (B, C, H, W) input.
        conv: The convolution that reads the result (the downsampling's): under CUDA autocast the kernel
            writes the dtype it casts to. None (the stem): the dtype ``F.layer_norm`` returns (fp32 under
            CUDA autocast, the residual stream's).

    Returns:
        The normalised map, or None unless ``norm`` is exactly a ``LayerNorm2d``, ``x`` is channels_last
        and :func:`halves_apply` is True.
    """
    if _layernorm(norm) is None or not halves_apply(x) or not x.is_contiguous(memory_format=torch.channels_last):
        return None
    out_dtype = None if conv is None else _cast_dtype(x, conv)
    return layernorm_channels(x, norm.weight, norm.bias, eps=norm.eps, out_dtype=out_dtype)


# ------------------------------------------------------------------------------------ the parts
def _layernorm(norm):
    """The norm if it is exactly the library's LayerNorm2d (a subclass may change the maths), else None."""
    return norm if norm_kind(norm) == "ln" else None


def _normalised(norm, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """``norm(x)`` through the Triton LayerNorm kernel (exactly a ``LayerNorm2d``) or in ``x``'s layout
    (exactly a ``GroupNorm1``, where autograd needs no graph), written in ``out_dtype`` where given; None
    otherwise."""
    kind = norm_kind(norm)
    if kind == "ln":
        return layernorm_channels(x, norm.weight, norm.bias, eps=norm.eps, out_dtype=out_dtype)
    if kind == "gn" and group_norm1_pays(x, norm.weight, norm.bias):
        return group_norm1(x, norm.weight, norm.bias, norm.eps, out_dtype)
    return None


def _is_star(act) -> bool:
    return type(act) is StarReLU


def _mlp(block):
    mlp = getattr(block, "mlp", None)
    return mlp if type(mlp) is Mlp else None


def _scale(module) -> Optional[torch.Tensor]:
    return getattr(module, "scale", None) if not isinstance(module, nn.Identity) else None


def _drop_mask(drop_path: nn.Module, y: torch.Tensor) -> Optional[torch.Tensor]:
    """``DropPath``'s per-sample factor for ``y``, flat (its :meth:`~metaformer.layers.DropPath.sample_factor`:
    the same random stream, y's dtype), or None when it is the identity (eval, rate 0)."""
    mask = drop_path.sample_factor(y) if isinstance(drop_path, DropPath) else None
    return None if mask is None else mask.view(-1)


def _cast_dtype(x: torch.Tensor, conv: nn.Module) -> Optional[torch.dtype]:
    """Under CUDA autocast the next 1x1 convolution casts its input: the kernel writes that dtype directly."""
    if x.is_cuda and type(conv) is nn.Conv2d and autocast_enabled("cuda"):
        return autocast_dtype("cuda")
    return None


def _mlp_tail(block, mlp, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``res_scale2(x) + layer_scale2(drop_path2(fc2(act(fc1(n)))))`` with the dropouts; StarReLU as the kernel,
    the 1x1 convolutions as :func:`_pointwise`."""
    h = _pointwise(mlp.fc1, n)
    if _is_star(mlp.act):
        # Under autocast fc2 casts StarReLU's fp32 output; writing that dtype directly is the same value
        # unless a dropout sits between them (it would scale in the other dtype).
        active_drop = mlp.training and mlp.drop1.p > 0
        h = star_relu(h, mlp.act.scale, mlp.act.bias, out_dtype=None if active_drop else _cast_dtype(h, mlp.fc2))
    else:
        h = mlp.act(h)
    y = mlp.drop2(_pointwise(mlp.fc2, mlp.drop1(h)))
    return _residual(block.res_scale2, block.layer_scale2, block.drop_path2(y), x)


def _residual(res_scale: nn.Module, layer_scale: nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``res_scale(x) + layer_scale(y)`` with one scale that is exactly a :class:`~metaformer.layers.Scale`
    (PoolFormer's layer scale, the baselines' res scale) and the addition as one ``torch.addcmul``: one pass
    and one launch fewer per half (on the GPU the pass writes and reads the residual stream in fp32), the
    same values to rounding and the same dtype (addcmul promotes as the product and the sum do, also under
    autocast)."""
    if type(layer_scale) is Scale:
        return torch.addcmul(res_scale(x), y, layer_scale.scale.view(1, -1, 1, 1))
    if type(res_scale) is Scale:
        return torch.addcmul(layer_scale(y), x, res_scale.scale.view(1, -1, 1, 1))
    return res_scale(x) + layer_scale(y)


def _pointwise(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 1x1 convolution; on a channels_last CUDA map as ``F.linear`` on its (B, H, W, C) view.

    The same product (a 1x1 convolution is a matrix product over the channels) without copies: the view
    of a channels_last map is contiguous, and so is the product, whose (B, C, H, W) view is channels_last
    again. It runs as a cuBLAS GEMM, as timm's MetaFormer runs these layers (``nn.Linear`` on (B, H, W, C)),
    where cuDNN's convolution costs the host several times a GEMM's launch: on the H100 of the fourth
    session a ``conv2d`` call took about 100 us of host time under cProfile, and convformer_s18 has 94
    of them per forward, 72 of them 1x1. Anything else (another layer, a stride, groups, an NCHW map, a
    CPU tensor outside Triton's interpreter) is ``conv(x)``, and so is an fp32 product outside autocast
    where PyTorch's TF32 settings for matrix products and for cuDNN differ (by default cuDNN's convolutions
    use TF32 and matrix products do not: the layer keeps the precision and speed its convolution has).
    """
    if (plain_1x1(conv) and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and ((x.is_cuda and _gemm_precision_agrees(x)) or _interpreting())):
        weight = conv.weight  # (out, in, 1, 1): a view as (out, in) whatever its strides (the last two are 1)
        y = F.linear(x.permute(0, 2, 3, 1), weight.view(weight.shape[0], weight.shape[1]), conv.bias)
        return y.permute(0, 3, 1, 2)
    return conv(x)


def _gemm_precision_agrees(x: torch.Tensor) -> bool:
    """Whether a matrix product of ``x`` runs in the precision cuDNN's convolution would: always under
    autocast and for fp16, bf16 and fp64; for fp32 when both or neither may use TF32."""
    if x.dtype != torch.float32 or autocast_enabled("cuda"):
        return True
    return torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32


def _mix(mixer: nn.Module, n: torch.Tensor) -> torch.Tensor:
    """``mixer(n)``; exactly a :class:`~metaformer.mixers.SepConv` runs its 1x1 convolutions as
    :func:`_pointwise` and a ``StarReLU`` after the first as the kernel (written in the dtype the depthwise
    convolution casts to under autocast when nothing sits between them)."""
    if type(mixer) is not SepConv:
        return mixer(n)
    h = _pointwise(mixer.pwconv1, n)
    if _is_star(mixer.act1):
        direct = type(mixer.act2) is nn.Identity
        h = star_relu(h, mixer.act1.scale, mixer.act1.bias, out_dtype=_cast_dtype(h, mixer.dwconv) if direct else None)
    else:
        h = mixer.act1(h)
    return _pointwise(mixer.pwconv2, mixer.act2(mixer.dwconv(h)))
