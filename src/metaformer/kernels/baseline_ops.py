"""Channel LayerNorm, the residual update fused with it, and StarReLU, behind the kernel backends.

The memory-bound glue of the MetaFormer baselines' blocks (the convolutions and GEMMs between them
stay with cuDNN / cuBLAS):

- :func:`layernorm_channels`: ``LayerNorm2d`` (a LayerNorm over the channels at every position).
- :func:`residual_layernorm`: the residual update ``z = res_scale * x + layer_scale * (sample_scale * y)``
  and the next LayerNorm of ``z``, returning both: one read of ``x`` and ``y`` writes the new residual
  stream and its normalised copy.
- :func:`star_relu`: ``scale * relu(x) ** 2 + bias`` in one pass.

Backends as for :func:`~metaformer.kernels.pool_mixer_residual`: ``"triton"`` runs the Triton kernels
(CUDA, or CPU under ``TRITON_INTERPRET=1``); ``"torch"`` and ``"reference"`` the plain composition;
``"auto"`` the kernels for CUDA tensors outside torch.compile tracing, self-checked against the
composition on first use per configuration (a failure warns and falls back for that configuration).

Dtypes follow the composition: the residual stream ``z`` has the promoted dtype of ``x``, ``y``,
``res_scale`` and ``layer_scale`` (``sample_scale``, a drop-path factor, is applied in ``y``'s dtype);
the normalised output has ``F.layer_norm``'s (under CUDA autocast: float32); StarReLU's output the
promoted dtype of ``x``, ``scale`` and ``bias``. ``out_dtype`` overrides the normalised / activated
output's dtype: a caller whose next op casts anyway (an autocast convolution) saves a pass and half the bytes.
Statistics and arithmetic are in fp32 (fp64 for fp64).
"""

from __future__ import annotations

import functools

import torch

from ..tracing import fp32_list_dtype
from . import _interpreting, get_backend, resolve_backend, selfcheck
from .baseline_checks import check_ln, check_star, layout_name
from .torch_ln import layernorm_channels_torch, residual_layernorm_torch, star_relu_torch

try:
    from . import triton_ln
except Exception:  # Triton missing or broken: the "auto" backend never picks it
    triton_ln = None

__all__ = ["layernorm_channels", "residual_layernorm", "star_relu"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def layernorm_channels(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                       eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm over the channels of a (B, C, H, W) tensor at every position (``LayerNorm2d``).

    Args:
        x: (B, C, H, W) floating tensor, contiguous or channels_last (the Triton output keeps the layout).
        weight: Optional (C,) gain; may require grad.
        bias: Optional (C,) bias; may require grad.
        eps: Added to the biased variance.
        out_dtype: The output's dtype (default: ``F.layer_norm``'s).

    Returns:
        The normalised tensor, shaped like ``x``.

    Raises:
        ValueError: On shape, dtype or device mismatches.
        RuntimeError: If the ``"triton"`` backend is forced on a tensor it cannot run on.
    """
    _check_map("x", x)
    _check_vectors(x, weight=weight, bias=bias)
    _check_dtype(out_dtype)
    n_dtype = out_dtype or _ln_dtype(x.dtype, x.device)
    if resolve_backend(x) == "triton" and x.dtype in _DTYPES:
        flags = (weight is not None, bias is not None)
        n = _run_triton("layernorm_channels", x, None, flags, (x, weight, bias), (n_dtype,),
                        lambda: triton_ln.layernorm_triton(x, None, weight, bias, eps=eps, out_dtype=n_dtype),
                        functools.partial(check_ln, eps=eps, n_dtype=n_dtype))
        if n is not None:
            return n
    return layernorm_channels_torch(x, weight, bias, eps=eps, out_dtype=out_dtype)


def residual_layernorm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, *, eps: float, res_scale: torch.Tensor | None = None,
                       layer_scale: torch.Tensor | None = None, sample_scale: torch.Tensor | None = None,
                       out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual update and the channel LayerNorm after it, in one pass.

    ``z = res_scale[c] * x + layer_scale[c] * (sample_scale[b] * y)`` and
    ``n = LayerNorm_C(z) * weight[c] + bias[c]``: a block half's ending and the next half's norm
    (``res_scale1(x) + layer_scale1(drop_path1(mixer(...)))`` then ``norm2``).

    Args:
        x: (B, C, H, W) residual stream, contiguous or channels_last (``z`` and ``n`` keep its layout).
        y: The branch output, shaped like ``x`` (any layout).
        weight: Optional (C,) gain of the norm.
        bias: Optional (C,) bias of the norm.
        eps: The norm's epsilon.
        res_scale: Optional (C,) residual scale; ``None`` means 1.
        layer_scale: Optional (C,) layer scale; ``None`` means 1.
        sample_scale: Optional (B,) per-sample factor (drop-path mask / keep probability); ``None`` means 1.
        out_dtype: ``n``'s dtype (default: ``F.layer_norm``'s on ``z``).

    Returns:
        (z, n). Every input may require grad; both outputs are differentiable.

    Raises:
        ValueError: On shape, dtype or device mismatches.
        RuntimeError: If the ``"triton"`` backend is forced on a tensor it cannot run on.
    """
    _check_map("x", x)
    _check_map("y", y)
    if y.shape != x.shape or y.device != x.device:
        raise ValueError(f"y must match x's shape {tuple(x.shape)} and device {x.device}, got {tuple(y.shape)} on "
                         f"{y.device}")
    _check_vectors(x, weight=weight, bias=bias, res_scale=res_scale, layer_scale=layer_scale, sample_scale=sample_scale)
    _check_dtype(out_dtype)
    z_dtype = functools.reduce(torch.promote_types, [t.dtype for t in (x, y, res_scale, layer_scale) if t is not None])
    n_dtype = out_dtype or _ln_dtype(z_dtype, x.device)
    kwargs = dict(eps=eps, res_scale=res_scale, layer_scale=layer_scale, sample_scale=sample_scale)
    if resolve_backend(x) == "triton" and x.dtype in _DTYPES and y.dtype in _DTYPES:
        flags = tuple(t is not None for t in (weight, bias, res_scale, layer_scale, sample_scale))
        out = _run_triton("residual_layernorm", x, y, flags, (x, y, weight, bias, res_scale, layer_scale, sample_scale),
                          (z_dtype, n_dtype),
                          lambda: triton_ln.layernorm_triton(x, y, weight, bias, z_dtype=z_dtype, out_dtype=n_dtype,
                                                             **kwargs),
                          functools.partial(check_ln, eps=eps, n_dtype=n_dtype, z_dtype=z_dtype))
        if out is not None:
            return out
    return residual_layernorm_torch(x, y, weight, bias, out_dtype=out_dtype, **kwargs)


def star_relu(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, *,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """StarReLU, ``scale * relu(x) ** 2 + bias``, in one pass (backward: one pass and two sums).

    Args:
        x: Floating tensor of any shape (dense in NCHW or channels_last order is read in place).
        scale: One-element floating tensor (``StarReLU.scale``); may require grad.
        bias: One-element floating tensor (``StarReLU.bias``); may require grad.
        out_dtype: The output's dtype (default: the promoted dtype of x, scale and bias).

    Returns:
        Tensor shaped like ``x``.

    Raises:
        ValueError: On shape, dtype or device mismatches.
        RuntimeError: If the ``"triton"`` backend is forced on a tensor it cannot run on.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    for name, t in (("scale", scale), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point() or t.device != x.device:
            raise ValueError(f"{name} must be a one-element floating tensor on {x.device} (StarReLU's parameter), "
                             f"got {type(t).__name__} {tuple(getattr(t, 'shape', ()))} on {getattr(t, 'device', '')}")
    _check_dtype(out_dtype)
    step = torch.result_type(x, scale)
    y_dtype = out_dtype or torch.result_type(torch.empty((0,) if x.dim() or scale.dim() else (), dtype=step), bias)
    if resolve_backend(x) == "triton" and x.dtype in _DTYPES and x.numel() > 0:
        y = _run_triton("star_relu", x, None, (), (x, scale, bias), (y_dtype,),
                        lambda: triton_ln.star_relu_triton(x, scale, bias, out_dtype=y_dtype), check_star)
        if y is not None:
            return y
    return star_relu_torch(x, scale, bias, out_dtype=out_dtype)


# ---------------------------------------------------------------------------------------- dispatch
def _ln_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``F.layer_norm``'s output dtype: float32 under CUDA autocast (it is on autocast's float32 list)."""
    return fp32_list_dtype(dtype, device.type)


def _run_triton(op, x, y, flags, tensors, dtypes, call, check):
    """The kernels under the self-check policy (``selfcheck.guarded``); None: use the PyTorch path."""
    forced = get_backend() == "triton"
    if triton_ln is None:
        if forced:
            raise RuntimeError("kernel backend 'triton' selected but metaformer's Triton LayerNorm kernels could not "
                               "be imported; use set_backend('auto') or set_backend('torch')")
        return None
    if op != "star_relu":
        if x.numel() == 0:
            return None  # nothing to launch: the composition handles empty tensors
        reason = triton_ln.unsupported_reason(x)
        if reason is not None and not forced:
            return None
    grads = tuple(t is not None and t.requires_grad and torch.is_grad_enabled() for t in tensors)
    shape = tuple(x.shape) if op == "star_relu" else (x.shape[1], *_hw_class(x.shape[2] * x.shape[3]))
    key = (op, str(x.device), *(t.dtype if t is not None else None for t in tensors), *dtypes, layout_name(x), layout_name(y),
           flags, grads, shape if op != "star_relu" else x.numel() % 16 == 0, triton_ln.get_config())

    def description():
        return (f"{x.device} {op} on {str(x.dtype).replace('torch.', '')} {layout_name(x)} "
                f"{'C=' + str(x.shape[1]) if op != 'star_relu' else ''}")

    return selfcheck.guarded(key, call=call, check=lambda: check(tensors, dtypes, grads), forced=forced,
                             do_check=x.is_cuda and not _interpreting(), device=x.device,
                             what="the Triton LayerNorm / StarReLU kernels", description=description)


def _hw_class(hw: int) -> tuple:
    """What Triton specialises an integer argument on: equal to 1, divisible by 16."""
    return hw == 1, hw % 16 == 0


# ------------------------------------------------------------------------------------ validation
def _check_map(name, t) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating (B, C, H, W) tensor, got {type(t).__name__} "
                         f"{tuple(getattr(t, 'shape', ()))} {getattr(t, 'dtype', '')}")


def _check_vectors(x, **vectors) -> None:
    B, C = x.shape[:2]
    for name, t in vectors.items():
        if t is None:
            continue
        n = B if name == "sample_scale" else C
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,) or not t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating tensor of shape ({n},) for x of shape {tuple(x.shape)}, "
                             f"got {shape}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_dtype(out_dtype) -> None:
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise ValueError(f"out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")
