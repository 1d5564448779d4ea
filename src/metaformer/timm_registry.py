"""An opt-in that registers every metaformer model in timm's model registry, under the prefix ``mf_``.

After :func:`register_timm_models`, ``timm.create_model("mf_poolformer_s12", pretrained=True)``
builds this library's model with its released weights, and everything built on timm's registry
(``timm.list_models``, ``resolve_data_config``, ``create_transform``, timm's train / validate /
benchmark scripts, layer-decay optimizers) works with it. The prefix keeps timm's own
``poolformer_s12``, ``convformer_s18``... untouched.

The entry points call :func:`metaformer.create`; timm's keyword arguments map as follows:

- ``pretrained``, a tag (``"mf_caformer_s18.sail_in1k_384"`` or ``pretrained_cfg="sail_in1k_384"``),
  ``num_classes``, ``in_chans``, ``features_only``, ``out_indices``, ``drop_path_rate``,
  ``global_pool`` (``"avg"`` or ``""``) as in ``create``;
- timm's ``drop_rate`` (its classifier dropout) is ``head_dropout``; ``proj_drop_rate`` (dropout in
  the blocks' MLPs) is ``drop_rate``;
- ``pretrained_cfg_overlay=dict(file=PATH)`` loads a checkpoint of any layout ``create`` reads; its
  other keys (``mean``, ``std``, ``crop_pct``...) update ``model.pretrained_cfg``;
- ``img_size`` is accepted where it equals the model's size (the fixed-size models take only 224);
- ``device`` / ``dtype`` move the built model; any other ``create`` override (``token_mixer``...)
  passes through.
"""

from __future__ import annotations

import functools
import sys
from collections import deque
from typing import Any, Dict, List, Optional

__all__ = ["PREFIX", "register_timm_models", "timm_name"]

PREFIX = "mf_"
"""The prefix of every model name in timm's registry: ``mf_`` + the metaformer name."""

default_cfgs: Dict[str, Any] = {}  # read by timm's register_model: the pretrained tags of each entry point

_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def timm_name(name: str) -> str:
    """The timm registry name of a metaformer model (``poolformer_s12`` -> ``mf_poolformer_s12``)."""
    return PREFIX + name


def _timm_cfg(source) -> Any:
    from timm.models import PretrainedCfg as TimmCfg

    size = tuple(source.input_size)
    return TimmCfg(
        hf_hub_id=source.hf_hub_id, hf_hub_filename=source.hf_filename if source.hf_hub_id else None,
        url=None if source.hf_hub_id else source.url, architecture=timm_name(source.architecture), tag=source.tag,
        input_size=size, pool_size=(size[1] // 32, size[2] // 32), crop_pct=source.crop_pct,
        interpolation=source.interpolation, mean=tuple(source.mean), std=tuple(source.std),
        num_classes=source.num_classes, first_conv="stem.conv", license="apache-2.0",
        classifier="head.fc.fc2" if _variant(source.architecture).model_kwargs().get("mlp_head") else "head.fc",
        fixed_input_size=_fixed_size(source.architecture),
        notes=(f"metaformer: {source.layout} layout, loaded by metaformer.create",),
    )


def _variant(name: str):
    from .zoo import get_variant

    return get_variant(name)


@functools.cache
def _fixed_size(name: str) -> bool:
    variant = _variant(name)
    return bool(variant.extra.get("pos_embed_sizes")) or any(
        "spatial_size" in getattr(m, "keywords", {}) for m in variant.mixers)


def _tag_of(name: str, pretrained_cfg: Any) -> Optional[str]:
    """The metaformer tag a timm ``pretrained_cfg`` argument asks for (None: the default)."""
    if pretrained_cfg is None:
        return None
    if isinstance(pretrained_cfg, str):
        return pretrained_cfg or None
    tag = pretrained_cfg.get("tag") if isinstance(pretrained_cfg, dict) else getattr(pretrained_cfg, "tag", None)
    if tag is None:
        raise ValueError(f"{timm_name(name)}: pretrained_cfg must be a tag name or a cfg with a 'tag' of one of "
                         f"metaformer's sources (see timm.list_pretrained('{timm_name(name)}*')); use "
                         f"pretrained_cfg_overlay=dict(file=PATH) for a local checkpoint")
    return tag


def _create(name: str, pretrained: bool = False, pretrained_cfg: Any = None,
            pretrained_cfg_overlay: Optional[Dict[str, Any]] = None, cache_dir: Any = None, **kwargs):
    from .factory import create

    if cache_dir is not None:
        raise TypeError(f"{timm_name(name)}: cache_dir is not supported for metaformer models; they use "
                        f"huggingface_hub's cache (set HF_HUB_CACHE) and torch.hub's (set TORCH_HOME)")
    overlay = dict(pretrained_cfg_overlay or {})
    checkpoint = overlay.pop("file", None)
    tag = _tag_of(name, pretrained_cfg)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    img_size = kwargs.pop("img_size", None)
    if "drop_rate" in kwargs:  # timm: classifier dropout; metaformer: dropout in the blocks' MLPs
        kwargs["head_dropout"] = kwargs.pop("drop_rate")
    if "proj_drop_rate" in kwargs:
        kwargs["drop_rate"] = kwargs.pop("proj_drop_rate")
    full = f"{name}.{tag}" if tag else name
    if checkpoint is not None:
        model = create(full, checkpoint=checkpoint, **kwargs)
    else:
        model = create(full, pretrained=pretrained, **kwargs)
    if img_size is not None:
        _check_img_size(model, img_size)
    model.pretrained_cfg.update(overlay)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _check_img_size(model, img_size) -> None:
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    want = tuple(model.pretrained_cfg["input_size"][1:])
    if model.pretrained_cfg.get("fixed_input_size") and size != want:
        raise ValueError(f"img_size={img_size!r}: this model takes only {want[0]}x{want[1]} inputs (position "
                         f"embeddings or fixed-size mixers)")


def _entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs):
        return _create(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = timm_name(name)
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"metaformer's ``{name}`` (built by :func:`metaformer.create`)."
    return entrypoint


def register_timm_models() -> List[str]:
    """Registers all metaformer models in timm's registry as ``mf_<name>``, with their pretrained tags.

    Calling it again does nothing more. Nothing of timm's own registry is changed: every name
    registered starts with :data:`PREFIX`, which no timm model uses.

    Returns:
        The registered names (``timm.list_models("mf_*")``).

    Raises:
        RuntimeError: if one of the names is already registered by something else.

    Example:
        >>> import metaformer, timm
        >>> metaformer.register_timm_models()
        >>> model = timm.create_model("mf_poolformer_s12", pretrained=True, num_classes=10)
    """
    from timm.models import DefaultCfg
    from timm.models._registry import _model_entrypoints, register_model

    from .zoo import VARIANTS

    module = sys.modules[__name__]
    names = []
    for name, variant in VARIANTS.items():
        full = timm_name(name)
        names.append(full)
        existing = _model_entrypoints.get(full)
        if existing is not None:
            if getattr(existing, "__module__", None) == __name__:
                continue
            raise RuntimeError(f"timm already has a model {full!r} from {existing.__module__}; metaformer registers "
                               f"its models under the prefix {PREFIX!r} and will not replace it")
        default_cfgs[full] = DefaultCfg(tags=deque(s.tag for s in variant.sources),
                                        cfgs={s.tag: _timm_cfg(s) for s in variant.sources},
                                        is_pretrained=bool(variant.sources))
        entrypoint = _entrypoint(name)
        setattr(module, full, entrypoint)
        register_model(entrypoint)
    return names
