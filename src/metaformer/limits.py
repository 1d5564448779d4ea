"""Checks of MetaFormer arguments before anything is built: types, ranges, and the size of the model.

A ``config.json`` or a training checkpoint is data from elsewhere; a few of its numbers
(``depths [100000]``, ``num_classes 1e9``, ``mlp_ratio 1e5``) would make the constructor allocate
gigabytes before any error. :func:`check_arguments` estimates the parameter count from the
arguments alone (exact for the built-in parts) and refuses models above :data:`MAX_PARAMETERS`
unless ``METAFORMER_MAX_PARAMETERS`` raises the limit, and models of more than :data:`MAX_BLOCKS`
blocks unless ``METAFORMER_MAX_BLOCKS`` does.
"""

from __future__ import annotations

import functools
import numbers
import os
from typing import Any, Dict, Sequence

__all__ = ["MAX_PARAMETERS", "MAX_BLOCKS", "ModelTooLargeError", "check_arguments", "estimate_parameters",
           "max_parameters", "max_blocks", "per_stage"]

MAX_PARAMETERS = 2_000_000_000  # 8 GB of fp32 weights; the largest released model has 100M
MAX_BLOCKS = 2048  # the deepest released model has 48
ENV_VAR = "METAFORMER_MAX_PARAMETERS"
BLOCKS_ENV_VAR = "METAFORMER_MAX_BLOCKS"


class ModelTooLargeError(ValueError):
    """The arguments ask for a model above the parameter limit."""


def max_parameters() -> int:
    """The parameter limit: ``METAFORMER_MAX_PARAMETERS`` if set, else :data:`MAX_PARAMETERS`."""
    return _limit(ENV_VAR, MAX_PARAMETERS)


def max_blocks() -> int:
    """The limit on the number of blocks: ``METAFORMER_MAX_BLOCKS`` if set, else :data:`MAX_BLOCKS`."""
    return _limit(BLOCKS_ENV_VAR, MAX_BLOCKS)


def _limit(var: str, default: int) -> int:
    value = os.environ.get(var, "").strip()
    if not value:
        return default
    try:
        return int(float(value))
    except ValueError:
        raise ValueError(f"{var}={value!r} is not a number") from None


def _int(name: str, value: Any, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _number(name: str, value: Any, low: float, high: float, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (low <= value < high if high_open else low <= value <= high):
        raise ValueError(f"{name} must be in [{low}, {high}{')' if high_open else ']'}, got {value}")
    return float(value)


def per_stage(name: str, value: Any, n: int) -> list:
    """``value`` as a list of ``n`` per-stage values: a list or tuple is checked for length, else repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: expected one value per stage ({n}), got {len(value)}: {list(value)!r}")
        return list(value)
    return [value] * n


def check_arguments(args: Dict[str, Any]) -> None:
    """Checks MetaFormer constructor arguments (as the constructor receives them) before building.

    Raises:
        TypeError: for a value of the wrong type (a string where a number belongs...).
        ValueError: for a value out of range, or inconsistent lengths.
        ModelTooLargeError: when the model would exceed :func:`max_parameters`.
    """
    depths, dims = args["depths"], args["dims"]
    if not isinstance(depths, Sequence) or not isinstance(dims, Sequence) or isinstance(depths, str):
        raise TypeError(f"depths and dims must be sequences of ints, got {depths!r} and {dims!r}")
    n = len(depths)
    if n == 0 or len(dims) != n:
        raise ValueError(f"depths and dims must be non-empty and of equal length, got {list(depths)} and {list(dims)}")
    for i in range(n):
        _int(f"depths[{i}]", depths[i], 1)
        _int(f"dims[{i}]", dims[i], 1)
    if args["init"] not in ("v1", "baselines"):
        raise ValueError(f"init must be 'v1' or 'baselines', got {args['init']!r}")
    _int("num_classes", args["num_classes"], 0)
    _int("in_chans", args["in_chans"], 1)
    for i, ratio in enumerate(per_stage("mlp_ratios", args["mlp_ratios"], n)):
        _number(f"mlp_ratios[{i}]", ratio, 0.0, float("inf"))
    for key in ("layer_scale_init_values", "res_scale_init_values"):
        for i, v in enumerate(per_stage(key, args[key], n)):
            if v is not None:
                _number(f"{key}[{i}]", v, float("-inf"), float("inf"))
    per_stage("token_mixers", args["token_mixers"], n)
    per_stage("norm_layers", args["norm_layers"], n)
    if args["pos_embed_sizes"] is not None:
        for i, size in enumerate(per_stage("pos_embed_sizes", args["pos_embed_sizes"], n)):
            if size is not None and (len(size) != 2 or any(_int(f"pos_embed_sizes[{i}]", s, 1) > 4096 for s in size)):
                raise ValueError(f"pos_embed_sizes[{i}] must be None or (H, W) with 1 <= H, W <= 4096, got {size!r}")
    _number("drop_path_rate", args["drop_path_rate"], 0.0, 1.0, high_open=True)
    _number("drop_rate", args["drop_rate"], 0.0, 1.0, high_open=True)
    _number("head_dropout", args["head_dropout"], 0.0, 1.0, high_open=True)
    if args["features_only"]:
        out = args["out_indices"]
        if isinstance(out, (str, bytes)) or not isinstance(out, Sequence) or not out:
            raise ValueError(f"out_indices must be a non-empty sequence of stage indices, got {out!r}")
        for i in out:
            _int("out_indices", i, 0)
        if any(not i < n for i in out) or list(out) != sorted(set(out)):
            raise ValueError(f"out_indices must be increasing stage indices without repeats, from "
                             f"{tuple(range(n))}, got {tuple(out)} (the maps come out in stage order)")
    if sum(depths) > max_blocks():
        raise ModelTooLargeError(f"depths {list(depths)} ask for {sum(depths):,} blocks, above the limit of "
                                 f"{max_blocks():,}; if you mean it, set {BLOCKS_ENV_VAR} to a larger number")
    total = estimate_parameters(args)
    limit = max_parameters()
    if total > limit:
        raise ModelTooLargeError(
            f"these arguments ask for about {total:,} parameters ({total * 4 / 2**30:.1f} GiB in fp32), above "
            f"the limit of {limit:,} (depths {list(depths)}, dims {list(dims)}, num_classes {args['num_classes']}); "
            f"if you mean it, set {ENV_VAR} to a larger number")


def _mixer_parameters(mixer: Any, dim: int) -> int:
    from .mixers import Attention, RandomMixing, SepConv, SpatialMLP

    kwargs: Dict[str, Any] = {}
    while isinstance(mixer, functools.partial):
        kwargs = {**mixer.keywords, **kwargs}
        mixer = mixer.func
    if mixer is Attention:
        return 4 * dim * dim
    if mixer is SepConv:
        mid = int(float(kwargs.get("expansion_ratio", 2)) * dim)
        k = int(kwargs.get("kernel_size", 7))
        return 2 * dim * mid + mid * k * k
    if mixer in (SpatialMLP, RandomMixing):
        size = kwargs.get("spatial_size", (14, 14))
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        tokens = int(h) * int(w)
        hidden = kwargs.get("hidden_dim")
        return tokens * tokens if hidden is None else 2 * tokens * int(hidden)
    return 0  # pooling, identity, and user-written mixers (their own constructors answer for them)


def estimate_parameters(args: Dict[str, Any]) -> int:
    """The parameter count of a MetaFormer from its arguments, without building it.

    Exact for the built-in mixers and parts up to the norms' and scales' per-channel vectors (a few
    thousand); a user-written mixer counts as zero.
    """
    depths, dims = list(args["depths"]), list(args["dims"])
    n = len(depths)
    ratios = per_stage("mlp_ratios", args["mlp_ratios"], n)
    mixers = per_stage("token_mixers", args["token_mixers"], n)
    total = args["in_chans"] * dims[0] * 49 + dims[0]
    for i in range(n):
        d = dims[i]
        if i > 0:
            total += dims[i - 1] * d * 9 + d
        hidden = int(float(ratios[i]) * d)
        block = 2 * d * hidden + hidden + d + 6 * d + _mixer_parameters(mixers[i], d)
        total += depths[i] * block
    d, classes = dims[-1], args["num_classes"]
    if args["features_only"]:
        return total + 2 * sum(dims)
    if classes:
        total += (4 * d * d + 4 * d * classes + 8 * d) if args["mlp_head"] else d * classes + classes
    return total + 2 * d
