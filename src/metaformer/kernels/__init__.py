"""Fused kernels for MetaFormer blocks, behind one dispatch.

The baselines' memory-bound glue, channel LayerNorm (``layernorm_channels``, and
``residual_layernorm`` with the residual update before it) and ``star_relu``, runs behind the same
backends (see ``baseline_ops``).

``pool_mixer_residual`` computes the PoolFormer token-mixer half-block
``x + ls * (AvgPool(GN(x)) - GN(x))`` without materialising ``GN(x)``, using the identity
``pool(GN(x)) - GN(x) == gamma[c] * rstd[b] * (pool(x) - x)`` (count_include_pad=False pooling
weights sum to one everywhere, so the GroupNorm mean and bias cancel).

Backends:

- ``"torch"``: pure-PyTorch formulation (autograd, torch.compile, torch.export, ONNX).
- ``"triton"``: Triton kernels (CUDA; CPU only under ``TRITON_INTERPRET=1``).
- ``"reference"``: the plain GroupNorm + AvgPool2d composition; models do not fuse at all.
- ``"auto"`` (default): ``"triton"`` for CUDA tensors when Triton imports, else ``"torch"``;
  always ``"torch"`` while torch.compile / torch.export is tracing. On a GPU the kernels are
  self-checked against ``"torch"`` on first use per configuration (``selfcheck``): a failure or
  a wrong result warns and falls back to ``"torch"`` for that configuration.

The initial backend comes from the ``METAFORMER_BACKEND`` environment variable (read on first
use); ``set_backend`` overrides it.
"""

from __future__ import annotations

import os

import torch

from ..tracing import _release
from . import selfcheck
from .pool_autograd import pool_half_autograd
from .torch_impl import pool_mixer_residual_reference, pool_mixer_residual_torch

__all__ = [
    "BACKENDS",
    "TRITON_AVAILABLE",
    "block_forward",
    "converts_to_channels_last",
    "downsample_forward",
    "fast_paths_active",
    "get_backend",
    "in_input_layout",
    "layernorm_channels",
    "pool_mixer_residual",
    "residual_layernorm",
    "resolve_backend",
    "set_backend",
    "star_relu",
    "stem_forward",
    "working_layout",
]

BACKENDS = ("auto", "torch", "triton", "reference")
ENV_VAR = "METAFORMER_BACKEND"

# The oldest Triton the kernels are written for: Triton 2.x (PyTorch 2.3's) refuses them (``tl.arange`` of a
# constexpr function's result, measured under its interpreter), and the PyTorch paths then run instead.
TRITON_MIN_VERSION = (3, 0)

try:  # Triton is optional: any failure (missing, broken install, no driver, too old) disables it.
    import triton as _triton

    if _release(getattr(_triton, "__version__", "0")) < TRITON_MIN_VERSION:
        raise ImportError(f"Triton {_triton.__version__} is older than 3.0, which metaformer's kernels need (it "
                          "comes with PyTorch 2.4 and later); the PyTorch paths run instead")
    from . import triton_impl
    from .triton_impl import pool_mixer_residual_triton

    TRITON_AVAILABLE = True
    TRITON_IMPORT_ERROR: BaseException | None = None
except Exception as err:
    triton_impl = pool_mixer_residual_triton = None
    TRITON_AVAILABLE = False
    TRITON_IMPORT_ERROR = err

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_backend: str | None = None


def _check_backend(name: object, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(
            f"invalid kernel backend {name!r} ({source}); valid backends are {', '.join(BACKENDS)}"
        )
    return name.strip().lower()


def set_backend(name: str) -> None:
    """Selects the kernel backend used by ``pool_mixer_residual`` (and the blocks that call it).

    Args:
        name: One of ``BACKENDS``: ``"auto"``, ``"torch"``, ``"triton"``, ``"reference"``
            (case-insensitive).

    Raises:
        ValueError: If ``name`` is not a valid backend.
    """
    global _backend
    _backend = _check_backend(name, "set_backend")


def get_backend() -> str:
    """Returns the selected backend name (not resolved for a tensor; may be ``"auto"``).

    The first call without a prior ``set_backend`` reads ``METAFORMER_BACKEND`` (default ``"auto"``); a first call
    made while torch.compile traces takes the value the variable had when ``metaformer`` was imported.

    Raises:
        ValueError: If ``METAFORMER_BACKEND`` holds an invalid value.
    """
    global _backend
    if _backend is None:
        # (a first call while torch.compile traces takes the value the variable had at import: before PyTorch 2.4
        # it cannot trace a read of os.environ)
        value = _ENV_AT_IMPORT if torch.compiler.is_compiling() else os.environ.get(ENV_VAR)
        _backend = _check_backend(value or "auto", f"environment variable {ENV_VAR}")
    return _backend


_ENV_AT_IMPORT = os.environ.get(ENV_VAR)


def _interpreting() -> bool:
    """Whether Triton runs kernels through its interpreter (``TRITON_INTERPRET=1``). Read once, when this module
    is imported: Triton reads it when its kernels are defined, so it does not change later in a process, and
    torch.compile before PyTorch 2.4 cannot trace a read of ``os.environ`` (a model's blocks ask this)."""
    return _INTERPRETING


_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(x: torch.Tensor) -> str:
    """Resolves the selected backend for a given input tensor.

    ``"auto"`` becomes ``"triton"`` when ``x`` is a CUDA tensor of a supported dtype, Triton
    imported, and no torch.compile / torch.export tracing is in progress; otherwise ``"torch"``.

    Args:
        x: The (B, C, H, W) input tensor.

    Returns:
        One of ``"torch"``, ``"triton"``, ``"reference"``.

    Raises:
        RuntimeError: If ``"triton"`` was selected but Triton is unavailable, or ``x`` is not a
            CUDA tensor (outside ``TRITON_INTERPRET=1``).
    """
    backend = get_backend()
    if backend == "auto":
        if TRITON_AVAILABLE and x.is_cuda and x.dtype in _TRITON_DTYPES and not torch.compiler.is_compiling():
            return "triton"
        return "torch"
    if backend == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError(
                f"kernel backend 'triton' selected but Triton could not be imported ({TRITON_IMPORT_ERROR!r}); "
                "install triton or use set_backend('torch')"
            )
        if not x.is_cuda and not _interpreting():
            raise RuntimeError(
                f"kernel backend 'triton' needs a CUDA tensor, got one on {x.device}; move the input to a GPU, "
                "use set_backend('torch'/'auto'), or set TRITON_INTERPRET=1 (before importing triton) to run "
                "the kernels on CPU through Triton's interpreter"
            )
    return backend


def pool_mixer_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float,
    pool_size: int = 3,
    res_scale: torch.Tensor | None = None,
    sample_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused PoolFormer token-mixer half-block.

    Returns ``res_scale[c] * x + weight[c] * rstd[b] * sample_scale[b] * (avgpool(x) - x)``, where
    ``avgpool`` is ``AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)`` and
    ``rstd[b] = 1 / sqrt(var_b + eps)`` with the biased variance of sample ``b`` over (C, H, W).
    With ``weight = norm1.weight * layer_scale`` this equals
    ``res_scale * x + sample_scale * layer_scale * (pool(GN(x)) - GN(x))`` for a one-group GroupNorm.

    Args:
        x: (B, C, H, W) floating tensor (fp32, bf16, fp16 or fp64), contiguous or channels_last
            (other layouts are accepted and made contiguous by the Triton backend).
        weight: (C,) per-channel factor (GroupNorm weight times layer scale); may require grad.
        eps: The GroupNorm epsilon.
        pool_size: Odd pooling window size.
        res_scale: Optional (C,) residual scale; ``None`` means 1.
        sample_scale: Optional (B,) per-sample factor (drop-path mask / keep_prob); ``None`` means 1.

    Returns:
        Tensor of ``x``'s shape and dtype (statistics are computed in fp32, fp64 for fp64 inputs).

    Raises:
        ValueError: On shape, dtype or pool-size mismatches.
        RuntimeError: If the ``"triton"`` backend is forced on a tensor it cannot run on.
    """
    _validate(x, weight, pool_size, res_scale, sample_scale)
    backend = resolve_backend(x)
    kwargs = dict(eps=eps, pool_size=pool_size, res_scale=res_scale, sample_scale=sample_scale)
    if backend == "triton" and x.dtype in _TRITON_DTYPES:
        y = _run_triton(x, weight, kwargs)
        if y is not None:
            return y
    if backend == "reference":
        return pool_mixer_residual_reference(x, weight, **kwargs)
    if _wants_written_backward(x, weight, res_scale, sample_scale):
        return pool_half_autograd(x, weight, **kwargs)
    return pool_mixer_residual_torch(x, weight, **kwargs)


def _wants_written_backward(x, *params) -> bool:
    """CPU fp32/fp64 in eager mode with something to differentiate: the one-node backward is faster."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or not torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return any(t is not None and t.requires_grad for t in (x, *params))


def _run_triton(x, weight, kwargs):
    """The Triton kernels under the self-check policy of ``selfcheck``; None: use the PyTorch path.

    A real GPU self-checks each configuration on first use; under "auto" inputs the kernels cannot
    take (a sample over ~2**31 elements), failures and wrong results fall back to the PyTorch path.
    """
    forced = get_backend() == "triton"
    if not forced and triton_impl.unsupported_reason(x, kwargs["pool_size"]) is not None:
        return None
    return selfcheck.run_checked(x, weight, kwargs, kernel=pool_mixer_residual_triton,
                                 reference=pool_mixer_residual_torch, forced=forced,
                                 check=x.is_cuda and not _interpreting(), extra=(triton_impl.get_config(),))


def _validate(x, weight, pool_size, res_scale, sample_scale) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"x must be a floating (B, C, H, W) tensor, got {type(x).__name__} "
            f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', '')}"
        )
    B, C = x.shape[:2]
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1 or pool_size % 2 == 0:
        raise ValueError(f"pool_size must be a positive odd integer, got {pool_size!r}")
    for name, t, n in (("weight", weight, C), ("res_scale", res_scale, C), ("sample_scale", sample_scale, B)):
        if t is None and name != "weight":
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{name} must be a tensor of shape ({n},) for x of shape {tuple(x.shape)}, got {shape}"
            )
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


from .baseline_ops import layernorm_channels, residual_layernorm, star_relu  # noqa: E402  (reads the names above)
from .dispatch import (  # noqa: E402  (it reads the names defined above)
    block_forward,
    converts_to_channels_last,
    downsample_forward,
    fast_paths_active,
    in_input_layout,
    stem_forward,
    working_layout,
)
