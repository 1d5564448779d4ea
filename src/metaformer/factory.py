"""`create`: build any registered model, with released weights, a checkpoint, or ablation overrides."""

from __future__ import annotations

import functools
import inspect
import logging
import os
from typing import Any, Dict, Optional, Tuple

from .components import close_matches, resolve_arguments
from .mixers import Pooling
from .model import MetaFormer
from .pretrained import PretrainedCfg, make_pretrained_cfg
from .saving import is_saved_model_folder
from .zoo import Variant, get_variant

__all__ = ["create", "OVERRIDES"]

logger = logging.getLogger("metaformer")

# Overrides that act on every stage, mapped to the per-stage MetaFormer argument they set.
_PER_STAGE = {"token_mixer": "token_mixers", "norm_layer": "norm_layers", "mlp_ratio": "mlp_ratios",
              "layer_scale_init_value": "layer_scale_init_values", "res_scale_init_value": "res_scale_init_values"}
_CONSTRUCTOR = [p for p in inspect.signature(MetaFormer.__init__).parameters if p != "self"]
_FIXED = ("depths", "dims", "init")  # what makes a variant that variant
OVERRIDES = tuple(sorted(set(_CONSTRUCTOR) - set(_FIXED) | set(_PER_STAGE) | {"pool_size"}))


def _base(component: Any):
    while isinstance(component, functools.partial):
        component = component.func
    return component


def _bound_kwargs(component: Any) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = {}
    while isinstance(component, functools.partial):
        kwargs = {**component.keywords, **kwargs}
        component = component.func
    return kwargs


def _with_spatial_size(mixer: Any, size: Tuple[int, int]):
    """Gives a fixed-size mixer (one whose constructor takes ``spatial_size``) its stage's size."""
    if mixer is None or "spatial_size" in _bound_kwargs(mixer):
        return mixer
    try:
        params = inspect.signature(_base(mixer)).parameters
    except (TypeError, ValueError):
        return mixer
    return functools.partial(mixer, spatial_size=size) if "spatial_size" in params else mixer


def _registered(name: str) -> bool:
    from .zoo import VARIANTS

    return name.partition(".")[0] in VARIANTS and "/" not in name and os.sep not in name


def _split_name(name: str) -> Tuple[str, Optional[str]]:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    base, _, tag = name.partition(".")
    return base, tag or None


def create(name: str, pretrained: bool = False, checkpoint: Optional[str] = None, **overrides) -> MetaFormer:
    """Builds a registered model, optionally with released weights or a checkpoint file.

    Args:
        name: What to build, one of:

            - a model name (``"poolformer_s12"``, see :func:`metaformer.list_models`), optionally with a
              pretrained tag (``"poolformer_s12.sail_in1k"``, see ``list_models(pretrained=True)``);
            - ``"hf-hub:ORG/REPO"``: a model saved with ``save_pretrained`` and pushed to the Hub;
            - the path of a local folder written by ``save_pretrained`` (``"./NAME"`` if the folder has
              the name of a registered model).

            The last two bring their whole architecture and weights: no other argument applies.
        pretrained: Load the released weights of the tag (default tag: the first listed).
        checkpoint: Path of a state dict (``.pth``, ``.pth.tar`` or ``.safetensors``) in the original,
            timm or metaformer layout, loaded strictly.
        **overrides: Ablations and settings: ``token_mixer`` (every stage) or ``token_mixers`` (one per
            stage), ``norm_layer``, ``act_layer``, ``pool_size``, ``mlp_ratio``, ``layer_scale_init_value``,
            ``drop_path_rate``, ``drop_rate``, ``num_classes``, ``in_chans``, ``features_only``,
            ``out_indices`` and any other :class:`~metaformer.MetaFormer` argument. Components may be
            classes, partials or built-in names (``"pooling"``, ``"attention"``, ``"gelu"``...).

    Returns:
        The model, in training mode like any freshly built ``nn.Module``, with ``pretrained_cfg``
        describing its preprocessing.

    Raises:
        ValueError: for an unknown model, tag or component name (the message lists what exists).
        TypeError: for an unknown override (the message lists the accepted ones).
        metaformer.PretrainedError / metaformer.CheckpointError: for weights that cannot be fetched,
            read or fitted.

    Example:
        >>> model = metaformer.create("poolformer_s12", token_mixers=["pooling"] * 3 + ["attention"])
    """
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    saved = None
    if isinstance(name, str) and name.startswith("hf-hub:"):
        saved = name[len("hf-hub:"):]
    elif isinstance(name, str) and not _registered(name) and (is_saved_model_folder(name) or os.path.isdir(name)):
        saved = name  # a registered name wins over a folder of that name: pass "./NAME" for the folder
    if saved is not None:
        if pretrained or checkpoint or overrides:
            where = "repo" if name.startswith("hf-hub:") else "saved folder"
            raise TypeError(f"create({name!r}) takes the whole model from the {where}; pretrained, checkpoint and "
                            f"overrides do not apply (build by name to ablate)")
        return MetaFormer.from_pretrained(saved)
    base, tag = _split_name(name)
    variant = get_variant(base)
    source = variant.source(tag) if (pretrained or tag) and variant.sources else None
    if tag and not variant.sources:
        raise ValueError(f"{base} has no released weights, so it has no tag {tag!r}")
    if pretrained and checkpoint is not None:
        raise ValueError("pass either pretrained=True or checkpoint=PATH, not both")
    if pretrained and source is None:
        raise ValueError(f"{base} has no released weights; build it with pretrained=False")

    kwargs = _model_kwargs(variant, overrides, source)
    model = MetaFormer(**kwargs)
    model.pretrained_cfg = _pretrained_cfg(variant, source, model)

    if pretrained:
        from .hub import fetch_weights
        from .weights import load_state_dict_into

        state_dict = fetch_weights(base, source)
        load_state_dict_into(model, state_dict, source.layout, source=f"{base}.{source.tag} ({source.location})",
                             replace_classifier=model.num_classes != source.num_classes)
    elif checkpoint is not None:
        from .weights import load_checkpoint

        load_checkpoint(model, os.fspath(checkpoint), replace_classifier="num_classes" in overrides)
    return model


def _model_kwargs(variant: Variant, overrides: Dict[str, Any], source) -> Dict[str, Any]:
    unknown = [k for k in overrides if k not in OVERRIDES]
    if unknown:
        fixed = [k for k in unknown if k in _FIXED]
        hint = (f" ({', '.join(fixed)} define the variant: build a MetaFormer directly to change them)"
                if fixed else "")
        raise TypeError(f"create({variant.name!r}): unknown argument(s) {', '.join(map(repr, unknown))}{hint}; "
                        f"accepted: {', '.join(close_matches(unknown[0], OVERRIDES))}")
    overrides = dict(overrides)
    for single, plural in _PER_STAGE.items():
        if single in overrides:
            if plural in overrides:
                raise TypeError(f"pass either {single} or {plural}, not both")
            overrides[plural] = overrides.pop(single)
    pool_size = overrides.pop("pool_size", None)

    kwargs = variant.model_kwargs()
    if source is not None:
        kwargs["num_classes"] = source.num_classes
    kwargs.update(overrides)
    n = len(variant.depths)
    kwargs = resolve_arguments(kwargs)

    mixers = kwargs["token_mixers"]
    if not isinstance(mixers, (list, tuple)):
        mixers = [mixers] * n
    if len(mixers) != n:
        raise ValueError(f"token_mixers: {variant.name} has {n} stages, got {len(mixers)} mixers")
    side = (source.input_size[1] if source else 224) // 4
    mixers = [_with_spatial_size(m, (side >> i, side >> i)) for i, m in enumerate(mixers)]
    if pool_size is not None:
        if not any(_base(m) is Pooling for m in mixers):
            raise ValueError(f"pool_size applies to pooling mixers, and {variant.name} has none "
                             f"(its mixers: {[getattr(_base(m), '__name__', m) for m in mixers]})")
        mixers = [functools.partial(m, pool_size=pool_size) if _base(m) is Pooling else m for m in mixers]
    kwargs["token_mixers"] = mixers
    if source is not None and source.input_size[1] != 224 and kwargs.get("pos_embed_sizes"):
        raise ValueError(f"{variant.name}: position embeddings are fixed at 224x224")
    return kwargs


def _pretrained_cfg(variant: Variant, source: Optional[PretrainedCfg], model: MetaFormer) -> Dict[str, Any]:
    return make_pretrained_cfg(variant.name, source, crop_pct=variant.crop_pct, in_chans=model.in_chans,
                               num_classes=model.num_classes,
                               fixed_input_size=any(s.spatial_size for s in model.stages),
                               classifier="head.fc.fc2" if model.head is not None and model.head.mlp_head else "head.fc")
