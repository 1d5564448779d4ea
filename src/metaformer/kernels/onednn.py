"""oneDNN convolution primitives with fused post-ops, for the CPU fast paths.

PyTorch's private ``torch.ops.mkldnn._convolution_pointwise`` (what Inductor itself emits on CPU) runs a
convolution as one oneDNN primitive with an element-wise post-op (``relu``, ``gelu``) or with the
addition of another tensor fused in, which saves whole passes over the activations; weights can be
pre-packed once into oneDNN's blocked layout (:func:`prepack`) instead of being reordered on every call.

These primitives have no autograd formula: :func:`onednn_usable` admits them where nothing needs a
gradient, and the training paths (:mod:`metaformer.kernels.autograd_halves`) call them only inside the
forward of an ``autograd.Function`` whose backward is written out. A build without them, or whose
private signature differs, makes every function here return None (for good, once a tiny probe call is
refused too), and the callers run standard PyTorch ops; a single refused call (out of memory, a shape the
primitive does not take) returns None for that call only.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

__all__ = ["ONEDNN_AVAILABLE", "onednn_usable", "onednn_ok", "prepack", "conv", "conv_add",
           "mlp_residual_onednn"]


def _available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except Exception:  # pragma: no cover - exotic builds
        return False


ONEDNN_AVAILABLE = _available()
_BROKEN = False  # set when the private op exists but rejects our call (another torch build)
_ONE = [1, 1]


def onednn_ok(x: torch.Tensor) -> bool:
    """Whether the primitives can run on ``x`` at all: an fp32 CPU tensor, in eager mode, on a build that has them."""
    if not (ONEDNN_AVAILABLE and not _BROKEN and x.device.type == "cpu" and x.dtype == torch.float32):
        return False
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def onednn_usable(x: torch.Tensor, params: Iterable[torch.Tensor] = ()) -> bool:
    """Whether the oneDNN primitives may run, as a module's forward, for input ``x`` and weights ``params``.

    True for an fp32 CPU tensor in eager mode where autograd needs no graph: gradients are off, or
    neither ``x`` nor any of ``params`` requires one (the fused primitives have no backward), and
    outside torch.compile / torch.export / TorchScript / ONNX tracing.
    """
    if not onednn_ok(x):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    return True


def _broken(err: Exception) -> None:
    """A primitive refused a call: switch the primitives off for good only if they refuse a tiny call of the
    same kinds too (a build whose private signatures differ). A refusal of this call alone (out of memory,
    a shape it does not take) leaves them on; the caller runs the plain composition this once."""
    global _BROKEN
    if not _BROKEN and not _probe_ok():
        _BROKEN = True


def _probe_ok() -> bool:
    x, w, b = torch.ones(1, 2, 3, 3), torch.ones(4, 2, 1, 1), torch.zeros(4)
    try:
        for attr, algorithm in (("none", ""), ("relu", ""), ("gelu", "none")):
            torch.ops.mkldnn._convolution_pointwise(x, w, b, [0, 0], _ONE, _ONE, 1, attr, [], algorithm)
        torch.ops.mkldnn._convolution_pointwise.binary(torch.ones(1, 4, 3, 3), x, torch.ones(2, 4, 1, 1), None,
                                                      [0, 0], _ONE, _ONE, 1, "add", None, None, [], None)
        return True
    except Exception:  # noqa: BLE001 - any refusal means the build's primitives are not the ones we call
        return False


def prepack(w: torch.Tensor, padding: int, groups: int, input_shape: Sequence[int], stride: int = 1) -> torch.Tensor:
    """``w`` reordered once into oneDNN's blocked layout for inputs like ``input_shape`` (or ``w`` itself).

    The packed tensor is opaque (``layout == torch._mkldnn``) and only the primitives here take it; any
    input size still works with it.
    """
    if _BROKEN:
        return w
    try:
        return torch.ops.mkldnn._reorder_convolution_weight(w.detach().contiguous(), [padding, padding],
                                                            [stride, stride], _ONE, groups, list(input_shape))
    except (RuntimeError, TypeError, AttributeError):
        return w  # unpacked weights work too (reordered per call)


def conv(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], attr: str = "none", padding: int = 0,
         groups: int = 1, algorithm: str = "", stride: int = 1) -> Optional[torch.Tensor]:
    """``attr(conv2d(x, w, b, stride, padding, groups))`` as one primitive; None if the build refuses.

    ``attr`` is ``"none"``, ``"relu"`` or ``"gelu"`` (``algorithm`` ``"none"`` / ``"tanh"``). The result
    has ``x``'s memory format.
    """
    if _BROKEN:
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise(x, w, b, [padding, padding], [stride, stride], _ONE, groups,
                                                       attr, [], algorithm or "")
    except (RuntimeError, TypeError) as err:
        _broken(err)
        return None


def _format(x: torch.Tensor) -> torch.memory_format:
    """The memory format a primitive's output takes from its input ``x`` (and an added tensor must have)."""
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


def conv_add(x: torch.Tensor, other: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
             inplace: bool = False) -> Optional[torch.Tensor]:
    """``conv2d(x, w, b) + other`` (1x1, stride 1) as one primitive; None if the build refuses.

    With ``inplace`` the sum is written into ``other`` (oneDNN's sum post-op) where ``other`` is laid out like
    ``x``'s output, which saves allocating a fresh output (and, for a large one, faulting its pages in): only
    for an ``other`` that the caller owns (a temporary of its own), never a tensor it was given.
    """
    if _BROKEN:
        return None
    if inplace and _INPLACE is not None and other.is_contiguous(memory_format=_format(x)) and other.dtype == x.dtype:
        try:
            return _add_in_place(other, x, w, b)
        except (RuntimeError, TypeError):
            _inplace_refused()  # the out-of-place primitive below, this time (and for good if the probe fails)
    try:
        return torch.ops.mkldnn._convolution_pointwise.binary(x, other.contiguous(memory_format=_format(x)), w, b, [0, 0],
                                                              _ONE, _ONE, 1, "add", None, None, [], None)
    except (RuntimeError, TypeError) as err:
        _broken(err)
        return None


def _add_in_place(other: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return _INPLACE(other, x, w, b, [0, 0], _ONE, _ONE, 1, "add", None, None, [], None)


def _inplace_refused() -> None:
    """The in-place primitive refused a call: stop trying it for good only if it refuses a tiny call too (a
    build whose in-place variant differs), as :func:`_broken` does for the others; a refusal of this call
    alone leaves it on."""
    global _INPLACE
    if _INPLACE is None:
        return
    x, w, other = torch.ones(1, 2, 3, 3), torch.ones(4, 2, 1, 1), torch.zeros(1, 4, 3, 3)
    try:
        _add_in_place(other, x, w, None)
        ok = bool((other == 2).all())
    except Exception:  # noqa: BLE001 - any refusal means the build's in-place variant is not the one we call
        ok = False
    if not ok:
        _INPLACE = None


def _inplace_op():
    try:
        return torch.ops.mkldnn._convolution_pointwise_.binary
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without the in-place variant
        return None


_INPLACE = _inplace_op() if ONEDNN_AVAILABLE else None


def mlp_residual_onednn(
    h: torch.Tensor,
    residual: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    act: str = "gelu",
    approximate: str = "none",
    inplace: bool = False,
) -> Optional[torch.Tensor]:
    """``residual + conv1x1(act(conv1x1(h, w1, b1)), w2, b2)`` as two primitives, or None.

    Check :func:`onednn_usable` (or :func:`onednn_ok` inside an ``autograd.Function``) first. The
    result has ``h``'s memory format.

    Args:
        h: (B, C, H, W) input of the MLP (the normalised block input), fp32 on CPU.
        residual: (B, C', H, W) tensor added to the output.
        w1: Weight of the first 1x1 convolution, (C_hidden, C, 1, 1), plain or :func:`prepack` -ed.
        b1: Optional bias of the first convolution.
        w2: Weight of the second 1x1 convolution, (C', C_hidden, 1, 1), plain or pre-packed.
        b2: Optional bias of the second convolution.
        act: ``"gelu"``, ``"relu"`` or ``"relu_square"`` (``relu(t) ** 2``: the ReLU fused, the square
            one in-place pass; StarReLU's scale and bias belong folded into ``w2`` and ``b2``).
        approximate: GELU form, ``"none"`` (erf) or ``"tanh"``.
        inplace: Add into ``residual`` itself (:func:`conv_add`'s ``inplace``): only for a temporary of the caller's.
    """
    attr = "gelu" if act == "gelu" else "relu"
    hidden = conv(h, w1, b1, attr, algorithm=approximate if act == "gelu" else "")
    if hidden is None:
        return None
    if act == "relu_square":
        hidden.square_()
    return conv_add(hidden, residual, w2, b2, inplace)
