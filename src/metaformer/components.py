"""Built-in components by name: mixers, norms and activations, for `create` and for config files.

A component is a class or a ``functools.partial`` of one. :func:`describe` turns a built-in component
into JSON-able data (``{"name": ..., "kwargs": {...}}``) and :func:`resolve` turns that data, or a plain
name such as ``"pooling"``, back into the component.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any, Callable, Dict

from torch import nn

from . import layers, mixers

__all__ = ["COMPONENTS", "describe", "resolve", "UnserializableComponentError", "close_matches"]

COMPONENTS: Dict[str, Callable[..., nn.Module]] = {
    # token mixers
    "pooling": mixers.Pooling,
    "identity": mixers.Identity,
    "attention": mixers.Attention,
    "spatial_mlp": mixers.SpatialMLP,
    "sepconv": mixers.SepConv,
    "random_mixing": mixers.RandomMixing,
    # norms
    "groupnorm1": layers.GroupNorm1,
    "layernorm2d": layers.LayerNorm2d,
    "layernorm": layers.LayerNorm,
    "batchnorm2d": nn.BatchNorm2d,
    # activations
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "starrelu": layers.StarReLU,
    "squaredrelu": layers.SquaredReLU,
    "nn_identity": nn.Identity,
}
_NAMES = {cls: name for name, cls in COMPONENTS.items()}
_ALIASES = {"pool": "pooling", "attn": "attention", "spatial_fc": "spatial_mlp", "spatialmlp": "spatial_mlp",
            "random": "random_mixing", "groupnorm": "groupnorm1", "gn": "groupnorm1", "ln": "layernorm2d",
            "bn": "batchnorm2d", "none": "nn_identity"}


class UnserializableComponentError(TypeError):
    """A component (e.g. a user-written mixer class) that a config file cannot name."""


def close_matches(word: str, choices) -> list:
    """Choices sorted with the close matches of ``word`` first."""
    choices = sorted(choices)
    near = difflib.get_close_matches(word, choices, n=5, cutoff=0.5)
    return near + [c for c in choices if c not in near]


def resolve(spec: Any, kind: str = "component") -> Any:
    """Turns a name or a :func:`describe` dict into a component; passes classes and partials through.

    Args:
        spec: A class, a partial, a registered name (``"pooling"``), or ``{"name": ..., "kwargs": ...}``.
        kind: What the component is for, used in error messages (``"token_mixer"``...).

    Raises:
        ValueError: for an unknown name, listing the known ones (close matches first).
    """
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, dict) and "name" in spec:
        base = resolve(spec["name"], kind)
        kwargs = {k: _resolve_value(v) for k, v in spec.get("kwargs", {}).items()}
        return functools.partial(base, **kwargs) if kwargs else base
    if isinstance(spec, str):
        key = spec.lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        if key in COMPONENTS:
            return COMPONENTS[key]
        raise ValueError(f"unknown {kind} {spec!r}; known names: {', '.join(close_matches(spec, COMPONENTS))}")
    raise TypeError(f"{kind} must be a module class, a functools.partial, or a name, got {spec!r}")


def _resolve_value(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"name", "kwargs"}:
        return resolve(value)
    if isinstance(value, list):
        return tuple(value)
    return value


def describe(component: Any) -> Any:
    """JSON-able description of a built-in component (None stays None).

    Raises:
        UnserializableComponentError: for a class that is not built in (a user-written mixer).
    """
    if component is None:
        return None
    kwargs: Dict[str, Any] = {}
    func = component
    while isinstance(func, functools.partial):
        if func.args:
            raise UnserializableComponentError(f"cannot describe a partial with positional arguments: {component!r}")
        kwargs = {**func.keywords, **kwargs}
        func = func.func
    name = _NAMES.get(func)
    if name is None:
        qual = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"
        raise UnserializableComponentError(
            f"{qual} is not a built-in metaformer component, so a config file cannot name it")
    return {"name": name, "kwargs": {k: _describe_value(v) for k, v in kwargs.items()}}


def _describe_value(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_describe_value(v) for v in value]
    return describe(value)
