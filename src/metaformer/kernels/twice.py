"""Second derivatives through the written-out backward nodes.

The ``autograd.Function`` nodes of the CPU training paths (:mod:`~metaformer.kernels.pool_autograd`,
:mod:`~metaformer.kernels.autograd_halves`) compute their gradients with products on tensors saved in
the forward, which are not part of the graph; differentiating those gradients again (``create_graph=True``:
gradient penalties, meta-learning, Hessian-vector products) would miss every path through them. So when
a backward runs with ``create_graph=True`` the node instead differentiates the plain composition of its
own inputs, whose graph autograd then differentiates again, exactly as without the fast path.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = ["grads_through"]


def grads_through(fn: Callable[..., torch.Tensor], inputs: Sequence[Optional[torch.Tensor]],
                  needs: Sequence[bool], grad_output: torch.Tensor, total: int) -> tuple:
    """The gradients of ``fn(*inputs)`` for the inputs in ``needs``, themselves differentiable.

    Args:
        fn: The plain composition of the node, a function of ``inputs`` made of differentiable ops.
        inputs: The node's tensor inputs as saved for backward (None where absent).
        needs: ``ctx.needs_input_grad`` of the node.
        grad_output: The gradient of the node's output.
        total: The number of values the node's ``backward`` returns.

    Returns:
        ``total`` gradients, None where ``needs`` is False.
    """
    wanted = [i for i, t in enumerate(inputs) if t is not None and needs[i]]
    grads: list = [None] * total
    with torch.enable_grad():
        y = fn(*inputs)
        got = torch.autograd.grad(y, [inputs[i] for i in wanted], grad_output, create_graph=True,
                                  allow_unused=True)
    for i, g in zip(wanted, got):
        grads[i] = torch.zeros_like(inputs[i]) if g is None else g
    return tuple(grads)
