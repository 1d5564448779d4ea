"""Built-in components by name: mixers, norms and activations, for `create` and for config files.

A component is a class or a ``functools.partial`` of one. :func:`describe_component` turns a built-in component
into JSON-able data (``{"name": ..., "kwargs": {...}}``) and :func:`resolve` turns that data, or a plain
name such as ``"pooling"``, back into the component.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any, Callable, Dict

from torch import nn

from . import layers, mixers

__all__ = ["COMPONENTS", "COMPONENT_KEYS", "describe_component", "describe_value", "resolve", "describe_arguments",
           "resolve_arguments", "UnserializableComponentError", "close_matches"]

# The MetaFormer arguments that hold components, and the kind of component each takes.
COMPONENT_KEYS: Dict[str, str] = {
    "token_mixers": "token mixer", "norm_layers": "norm", "act_layer": "activation", "stem_norm": "norm",
    "downsample_norm": "norm", "head_norm": "norm", "feature_norm": "norm",
}

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
_KINDS = {**{n: "token mixer" for n in ("pooling", "identity", "attention", "spatial_mlp", "sepconv", "random_mixing")},
          **{n: "norm" for n in ("groupnorm1", "layernorm2d", "layernorm", "batchnorm2d")},
          **{n: "activation" for n in ("gelu", "relu", "silu", "starrelu", "squaredrelu")}}  # nn_identity: any
_SINGULAR = {"token_mixer": "token mixer", "norm_layer": "norm", "act": "activation"}
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
    """Turns a name or a :func:`describe_component` dict into a component; passes classes and partials through.

    Args:
        spec: A class, a partial, a registered name (``"pooling"``), or ``{"name": ..., "kwargs": ...}``.
        kind: What the component is for, used in messages and checked against built-in names:
            ``"token mixer"``, ``"norm"``, ``"activation"`` (or a MetaFormer argument name such as
            ``"token_mixers"``); anything else accepts every built-in.

    Raises:
        ValueError: for an unknown name, listing the known ones (close matches first), or a built-in
            component of another kind (``token_mixer="relu"``).
        TypeError: for a module instance (components are built per block: pass the class) or anything
            that is neither a class, a partial nor a name.
    """
    label = {"token_mixers": "token_mixer", "norm_layers": "norm_layer"}.get(kind, kind)  # names in messages
    kind = COMPONENT_KEYS.get(kind) or _SINGULAR.get(kind, kind)
    if spec is None:
        return spec
    if isinstance(spec, nn.Module):
        name = type(spec).__name__
        raise TypeError(f"{label}: got an instance {name}(...); pass the class {name} (or functools.partial("
                        f"{name}, ...) to set its arguments): every block builds its own")
    if callable(spec):
        _check_kind(_NAMES.get(_base(spec)), kind, spec)
        return spec
    if isinstance(spec, dict) and "name" in spec:
        base = resolve(spec["name"], kind)
        kwargs = {k: _resolve_value(v) for k, v in spec.get("kwargs", {}).items()}
        return functools.partial(base, **kwargs) if kwargs else base
    if isinstance(spec, str):
        key = spec.lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        if key in COMPONENTS:
            _check_kind(key, kind, spec)
            return COMPONENTS[key]
        known = [n for n in COMPONENTS if _KINDS.get(n, kind) == kind] if kind in _KINDS.values() else COMPONENTS
        raise ValueError(f"unknown {label} {spec!r}; known names: {', '.join(close_matches(spec, known))}")
    raise TypeError(f"{label} must be a module class, a functools.partial, or a name, got {spec!r}")


def _base(component: Any) -> Any:
    while isinstance(component, functools.partial):
        component = component.func
    return component


def _check_kind(name: Any, kind: str, spec: Any) -> None:
    actual = _KINDS.get(name)
    if actual is not None and kind in _KINDS.values() and actual != kind:
        same = [n for n in COMPONENTS if _KINDS.get(n) == kind]
        what = spec if isinstance(spec, str) else getattr(_base(spec), "__name__", spec)
        article = "an" if actual[0] in "aeiou" else "a"
        raise ValueError(f"{what!r} is {article} {actual}, not a {kind}; {kind}s: {', '.join(same)}")


def resolve_arguments(arguments: Dict[str, Any]) -> Dict[str, Any]:
    """MetaFormer arguments with every component (a name, a :func:`describe_component` dict or a class) resolved.

    Component arguments (:data:`COMPONENT_KEYS`) may hold one component or a list, one per stage.
    """
    out = dict(arguments)
    for key in COMPONENT_KEYS:
        if key in out:
            value = out[key]
            out[key] = [resolve(v, key) for v in value] if isinstance(value, (list, tuple)) else resolve(value, key)
    return out


def describe_arguments(arguments: Dict[str, Any]) -> Dict[str, Any]:
    """MetaFormer arguments as JSON-able data, components by name (see :func:`describe_component`).

    Raises:
        UnserializableComponentError: for a component that is not built in.
    """
    return {k: describe_value(v) for k, v in arguments.items()}


def _resolve_value(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"name", "kwargs"}:
        return resolve(value)
    if isinstance(value, list):
        return tuple(value)
    return value


def describe_component(component: Any) -> Any:
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
    return {"name": name, "kwargs": {k: describe_value(v) for k, v in kwargs.items()}}


def describe_value(value: Any) -> Any:
    """A value as JSON-able data: plain values as they are, sequences as lists, components by name."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [describe_value(v) for v in value]
    return describe_component(value)
