"""oneDNN fused primitives for the MLP half of a block on CPU (inference only).

``mlp_residual_onednn`` runs ``residual + fc2(act(fc1(h)))`` as two oneDNN convolution primitives, the
activation fused into the first and the residual addition into the second, which saves three passes
over the activations. The primitives are PyTorch's private ``torch.ops.mkldnn._convolution_pointwise``
(what Inductor itself emits on CPU): they have no autograd formula, so :func:`onednn_usable` admits them
only where nothing needs a gradient, and a build without them (or one whose signature differs) makes
:func:`mlp_residual_onednn` return None so that the caller runs the plain composition.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

__all__ = ["ONEDNN_AVAILABLE", "onednn_usable", "mlp_residual_onednn"]


def _available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except Exception:  # pragma: no cover - exotic builds
        return False


ONEDNN_AVAILABLE = _available()
_BROKEN = False  # set when the private op exists but rejects our call (another torch build)


def onednn_usable(x: torch.Tensor, params: Iterable[torch.Tensor] = ()) -> bool:
    """Whether the oneDNN MLP may run for input ``x`` and the weights ``params`` it would read.

    True for an fp32 CPU tensor in eager mode where autograd needs no graph: gradients are off, or
    neither ``x`` nor any of ``params`` requires one (oneDNN's fused primitives have no backward), and
    outside torch.compile / torch.export / TorchScript / ONNX tracing.
    """
    if not (ONEDNN_AVAILABLE and not _BROKEN and x.device.type == "cpu" and x.dtype == torch.float32):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    return True


def mlp_residual_onednn(
    h: torch.Tensor,
    residual: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    approximate: str = "none",
) -> Optional[torch.Tensor]:
    """``residual + conv1x1(gelu(conv1x1(h, w1, b1)), w2, b2)`` as two oneDNN primitives, or None.

    Check :func:`onednn_usable` first. The result has ``h``'s memory format. Returns None (and never
    tries again in this process) when this torch build's private op does not take the call.

    Args:
        h: (B, C, H, W) input of the MLP (the normalised block input), fp32 on CPU.
        residual: (B, C', H, W) tensor added to the output.
        w1: Weight of the first 1x1 convolution, (4C, C, 1, 1).
        b1: Optional bias of the first convolution.
        w2: Weight of the second 1x1 convolution, (C', 4C, 1, 1).
        b2: Optional bias of the second convolution.
        approximate: GELU form, ``"none"`` (erf) or ``"tanh"``.
    """
    global _BROKEN
    ops = torch.ops.mkldnn
    try:
        hidden = ops._convolution_pointwise(h, w1, b1, [0, 0], [1, 1], [1, 1], 1, "gelu", [], approximate)
        fmt = torch.channels_last if not hidden.is_contiguous() else torch.contiguous_format
        residual = residual.contiguous(memory_format=fmt)
        return ops._convolution_pointwise.binary(hidden, residual, w2, b2, [0, 0], [1, 1], [1, 1], 1, "add", None,
                                                 None, [], None)
    except (RuntimeError, TypeError):  # a private oneDNN op of another torch build: use the plain path
        _BROKEN = True
        return None
