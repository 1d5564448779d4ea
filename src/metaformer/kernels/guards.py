"""When the fused paths may run at all: the checks every fast path asks before it leaves the plain composition.

A fused path computes a block's function from its parts' weights, with primitives that carry no tangents and
``autograd.Function`` s that define no vmap rules. So it runs only on a real tensor in eager mode or under
``torch.compile``, with a backend other than ``"reference"``, outside ``torch.jit.trace`` and ONNX export, under
no ``torch.func`` transform, forward-mode AD or dispatch mode, and for a module none of whose parts has a hook
(:func:`fast_paths_active`). :mod:`metaformer.kernels.dispatch` routes the blocks once these allow it.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
from torch import nn

from ..tracing import DYNAMO_READS_DICT

# The package defines it before it imports this module (through dispatch, at its end).
from . import get_backend

__all__ = ["fast_paths_active", "intercepted", "module_hooked", "parts_hooked", "transformed"]


def fast_paths_active(x, module: Optional[nn.Module] = None) -> bool:
    """Whether fused paths may run for ``x``: a real tensor, eager or torch.compile, not the reference backend;
    in eager mode also a non-empty batch (nothing to gain on none, and the paths' shape arithmetic assumes a
    sample), no function transform or forward-mode AD (:func:`transformed`), and no dispatch mode or tensor
    subclass (:func:`intercepted`); and, given the ``module`` whose forward asks, no hooked part in it
    (:func:`parts_hooked`)."""
    if not isinstance(x, torch.Tensor) or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    if get_backend() == "reference":
        return False
    if not torch.compiler.is_compiling() and (transformed() or intercepted(x) or x.numel() == 0):
        return False
    return module is None or not parts_hooked(module)


def intercepted(x: torch.Tensor) -> bool:
    """Whether a ``TorchDispatchMode`` is active (``FakeTensorMode``, ``FlopCounterMode``, a user's op logger) or
    ``x`` is a tensor subclass (a ``FakeTensor``, a ``__torch_function__`` wrapper).

    These see or replace every op, and expect the standard ones: under ``FakeTensorMode`` the oneDNN
    primitives' first refusal switched them off for the rest of the process (ConvFormer then ran at the
    plain composition's speed, silently) and the folded-weights cache would have kept fake tensors. The
    blocks then run their plain composition. ``torch.compile`` and ``torch.export`` (which trace with fake
    tensors themselves) are not affected: :func:`fast_paths_active` asks this only in eager mode.
    """
    if type(x) is not torch.Tensor and type(x) is not nn.Parameter:
        return True
    stack_depth = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return bool(stack_depth is not None and stack_depth())


def transformed() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ``jacrev``...) or a forward-mode AD
    level (``torch.autograd.forward_ad.dual_level``) is active.

    The fused paths' ``autograd.Function`` s define no vmap or jvp rules (the transforms refuse them) and the
    oneDNN primitives carry no tangents (forward-mode AD would lose them silently), so the blocks then run
    their plain composition, which every transform supports.
    """
    try:
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return True
    except AttributeError:  # pragma: no cover - a build without functorch
        pass
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = tuple(getattr(torch.nn.modules.module, f"_global{name}", None) for name in _MODULE_HOOKS)


def _global_hooks_in_torch_namespace() -> bool:  # (its globals are torch.nn.modules.module's, see below)
    return bool(_global_forward_hooks or _global_forward_pre_hooks or _global_backward_hooks  # noqa: F821
                or _global_backward_pre_hooks)  # noqa: F821


# Under torch.compile the global hook dicts are read as Module.__call__ reads them, as globals of
# torch.nn.modules.module: PyTorch 2.4's Dynamo fails building its guards on a dict it has seen under two names
# ("DictGuardManager does not support a leaf_guard"), as it did when they were read through _GLOBAL_HOOKS.
_compiled_global_hooks = types.FunctionType(_global_hooks_in_torch_namespace.__code__,
                                            vars(torch.nn.modules.module), "_compiled_global_hooks")


def module_hooked(module: nn.Module) -> bool:
    """Whether ``module`` has a hook of its own (forward, forward pre-, backward) or an instance-level
    ``forward`` (a wrapper such as accelerate's)."""
    if not DYNAMO_READS_DICT and torch.compiler.is_compiling():
        # PyTorch 2.3's torch.compile cannot read an instance's __dict__: the hooks alone, as attributes (an
        # instance-level forward is not seen there)
        return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                    or module._backward_pre_hooks)
    d = module.__dict__
    # (written out rather than any() over _MODULE_HOOKS: every block's forward asks this of each of its parts)
    return bool("forward" in d or d.get("_forward_hooks") or d.get("_forward_pre_hooks")
                or d.get("_backward_hooks") or d.get("_backward_pre_hooks"))


def parts_hooked(module: nn.Module) -> bool:
    """Whether a module below ``module`` (not ``module`` itself) is :func:`module_hooked`, or global module
    hooks are registered (``torch.nn.modules.module.register_module_forward_hook`` and the like).

    The fused paths compute a block's function from its parts' weights without calling the parts, so such
    a hook would not run (a counter of FLOPs, a feature probe) or its effect would be lost (the pre-hook
    of ``torch.nn.utils.prune`` that recomputes ``weight`` from ``weight_orig`` and the mask): a block
    with one runs its plain composition. ``module``'s own hooks run either way (its ``__call__`` runs
    them around the fused forward).
    """
    if torch.compiler.is_compiling():
        if _compiled_global_hooks():
            return True
        # The parts by attribute, as the forwards reach them (`self.mlp`, `self.fc1`): PyTorch 2.4's Dynamo fails
        # building its guards on a dict it has seen under two names, a block's _modules or a hooked part's hooks
        # read through the items of _modules (`modules()`) and again by the part's own call
        stack = [module]
        while stack:
            m = stack.pop()
            for name in list(m._modules):
                child = getattr(m, name)
                if child is not None:
                    if module_hooked(child):
                        return True
                    stack.append(child)
        return False
    if any(_GLOBAL_HOOKS):
        return True
    stack = list(module._modules.values())
    while stack:
        m = stack.pop()
        if m is None:
            continue
        if module_hooked(m):
            return True
        stack.extend(m._modules.values())
    return False
