"""A cache of tensors derived from a module's parameters (folded weights), never stale.

The evaluation-mode fast paths fold norms' affines, layer scales and StarReLU's scale and bias into the
neighbouring convolutions' weights, and pre-pack them for oneDNN. Refolding on every call would cost
a pass over every weight per forward, so :func:`derived` keeps the result per (module, tag) together
with a key made of every source tensor's identity, ``_version`` counter, storage address, dtype, device
and shape. Any in-place change (an optimiser step, ``load_state_dict``, ``p.mul_()`` under
``torch.no_grad()``), a replaced parameter or a move to another device changes the key, and the next
call refolds.

One change is invisible to it, as to autograd: writing through ``tensor.data`` (``p.data.copy_(w)``)
bypasses the version counter. After such a write call :func:`clear_cache` (or modify the parameter
under ``torch.no_grad()`` instead, as optimisers and ``load_state_dict`` do).

Parameters that are inference tensors (a model created or loaded inside ``torch.inference_mode()``) have
no version counter, so nothing can tell whether they changed: for them the value is built on every call
and never cached (always right, a little slower; create the model outside inference mode to cache).

The cache holds the modules weakly: it never keeps a model alive, and a deleted model's entries go.

A value that depends on the input shape (weights packed for oneDNN) is kept for the last
:data:`SHAPES_KEPT` shapes a module ran on, so that a model evaluated at a few batch sizes or image sizes in
turn (a server's varying batches, a segmentation model on images of several sizes) does not refold and
repack every weight at every change of shape; a change to a source drops the values of every shape.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Callable, Optional, Sequence, TypeVar

import torch
from torch import nn

__all__ = ["derived", "clear_cache", "cache_size", "SHAPES_KEPT"]

T = TypeVar("T")
SHAPES_KEPT = 4  # values per (module, tag): the most recently used input shapes
# module -> tag -> shape -> (weak refs to the sources, their key, value), least recently used first
_ENTRIES: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _key(t: Optional[torch.Tensor]):
    if t is None:
        return None
    return (t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.requires_grad)


def derived(owner: nn.Module, tag: str, sources: Sequence[Optional[torch.Tensor]], build: Callable[[], T],
            shape: tuple = ()) -> T:
    """``build()``, computed once per state of ``sources`` (and ``shape``) and kept with ``owner``.

    Args:
        owner: The module the derived tensors belong to (held weakly).
        tag: Which derived value of ``owner`` this is (a module can have several).
        sources: Every tensor ``build`` reads; a change to any of them invalidates the entry.
        build: Computes the value; called without autograd and outside inference mode (so that the
            value is an ordinary tensor wherever it is used later).
        shape: Anything else the value depends on, such as the input shape oneDNN weights are packed
            for (a weight packed for another batch size is reordered by oneDNN on every call); a module
            keeps values for its last :data:`SHAPES_KEPT` shapes per tag.

    Returns:
        The cached or freshly built value.
    """
    if any(t is not None and t.is_inference() for t in sources):  # no version counter: never cached
        with torch.inference_mode(False), torch.no_grad():
            return build()
    shape, key = tuple(shape), tuple(_key(t) for t in sources)
    with _LOCK:
        shapes = _ENTRIES.get(owner, {}).get(tag)
        hit = None if shapes is None else shapes.get(shape)
        if hit is not None and _fresh(hit, key, sources):
            shapes.move_to_end(shape)
            return hit[2]
    with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable outside inference_mode too
        value = build()
    refs = tuple(_NoneRef if t is None else weakref.ref(t) for t in sources)
    with _LOCK:
        shapes = _ENTRIES.setdefault(owner, {}).setdefault(tag, OrderedDict())
        for other in [k for k, entry in shapes.items() if not _fresh(entry, key, sources)]:
            del shapes[other]  # built from sources that have changed since
        shapes[shape] = (refs, key, value)
        shapes.move_to_end(shape)
        while len(shapes) > SHAPES_KEPT:
            shapes.popitem(last=False)
    return value


def _fresh(entry: tuple, key: tuple, sources: Sequence[Optional[torch.Tensor]]) -> bool:
    """Whether a cached (refs, key, value) was built from exactly these sources in their present state."""
    refs, built_key, _ = entry
    return built_key == key and all(r() is t for r, t in zip(refs, sources))


def _NoneRef():  # stands in for a weak reference to an absent (None) source
    return None


def clear_cache() -> None:
    """Forgets every derived tensor (needed only after writing a parameter through ``tensor.data``)."""
    with _LOCK:
        _ENTRIES.clear()


def cache_size() -> int:
    """The number of cached entries (for tests and diagnostics)."""
    with _LOCK:
        return sum(len(shapes) for tags in _ENTRIES.values() for shapes in tags.values())
