"""The model zoo: one table of variants drives the factories, the registry, the docs and the tests.

PoolFormer (v1), its hybrids and the five MetaFormer-baseline families differ only in their parts
(norm, activation, scales, head, mixers), so each is a row of :data:`VARIANTS` over one of a few
:data:`FAMILIES` of parts, all built by the same :class:`~metaformer.MetaFormer`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from torch import nn

from .layers import GroupNorm1, LayerNorm, LayerNorm2d, StarReLU
from .mixers import Attention, Identity, Pooling, RandomMixing, SepConv, SpatialMLP
from .pretrained import IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg

__all__ = ["Variant", "PretrainedCfg", "FAMILIES", "VARIANTS", "PRETRAINED_CFGS", "DenseResults", "DENSE_RESULTS",
           "list_models", "get_variant", "get_pretrained_cfg", "IMAGENET_MEAN", "IMAGENET_STD"]

P = functools.partial

S12, S24, S36 = (2, 2, 6, 2), (4, 4, 12, 4), (6, 6, 18, 6)
M48 = (8, 8, 24, 8)
S_DIMS, M_DIMS = (64, 128, 320, 512), (96, 192, 384, 768)
S18, X36 = (3, 3, 9, 3), (3, 12, 18, 3)

# The parts of each family, as MetaFormer keyword arguments.
_V1 = dict(norm_layers=GroupNorm1, act_layer=nn.GELU, mlp_bias=True, stem_norm=None, downsample_norm=None,
           head_norm=GroupNorm1, head_norm_first=True, mlp_head=False, res_scale_init_values=None, init="v1")
_BASELINE = dict(act_layer=StarReLU, mlp_bias=False, layer_scale_init_values=None,
                 res_scale_init_values=(None, None, 1.0, 1.0),
                 stem_norm=P(LayerNorm2d, eps=1e-6, bias=False), downsample_norm=P(LayerNorm2d, eps=1e-6, bias=False),
                 head_norm=P(LayerNorm, eps=1e-6), head_norm_first=False, init="baselines")
FAMILIES: Dict[str, Dict[str, Any]] = {
    "poolformer": _V1,
    "metaformer_v1_ln": {**_V1, "norm_layers": LayerNorm2d, "head_norm": LayerNorm2d},
    "baseline_gn": {**_BASELINE, "norm_layers": P(GroupNorm1, eps=1e-6, bias=False), "mlp_head": False},
    "baseline_ln": {**_BASELINE, "norm_layers": P(LayerNorm2d, eps=1e-6, bias=False), "mlp_head": True},
}


@dataclass(frozen=True)
class Variant:
    """One row of the model table.

    Attributes:
        name: Model name.
        family: Key of :data:`FAMILIES` giving the parts.
        depths: Blocks per stage.
        dims: Channels per stage.
        mixers: Token mixer per stage.
        params: Parameter count of the release (every parameter, frozen ones included).
        macs: Multiply-accumulates at 224x224, in G, as the release reports them (None where the
            reference gives no figure).
        top1: ImageNet-1k top-1 of the release's weights at 224 (None where no verified figure exists:
            the hybrids' accuracies are only quoted from secondary sources).
        crop_pct: Evaluation crop fraction.
        drop_path: Recommended training drop-path rate.
        extra: Further MetaFormer arguments (layer scale, position embeddings).
        sources: Released weights, the default first.
        paper: Which release the model belongs to.
    """

    name: str
    family: str
    depths: Tuple[int, ...]
    dims: Tuple[int, ...]
    mixers: Tuple[Any, ...]
    params: int
    macs: Optional[float]
    top1: Optional[float]
    crop_pct: float
    drop_path: float = 0.1
    extra: Dict[str, Any] = field(default_factory=dict)
    sources: Tuple[PretrainedCfg, ...] = ()
    paper: str = "poolformer"

    def model_kwargs(self) -> Dict[str, Any]:
        """The MetaFormer keyword arguments of this variant."""
        return {**FAMILIES[self.family], "depths": self.depths, "dims": self.dims,
                "token_mixers": list(self.mixers), **self.extra}

    def source(self, tag: Optional[str] = None) -> PretrainedCfg:
        """The pretrained source for ``tag`` (default: the first)."""
        if not self.sources:
            raise ValueError(f"{self.name} has no released weights")
        if tag is None:
            return self.sources[0]
        for s in self.sources:
            if s.tag == tag:
                return s
        from .components import close_matches
        raise ValueError(f"{self.name} has no pretrained tag {tag!r}; available: "
                         f"{', '.join(self.name + '.' + t for t in close_matches(tag, [s.tag for s in self.sources]))}")


# ------------------------------------------------------------------------------- released weights
_GH = "https://github.com/sail-sg/poolformer/releases/download/v1.0/{}.pth.tar"


def _v1_sources(name: str, *, crop_pct: float, on_timm: bool) -> Tuple[PretrainedCfg, ...]:
    """The PoolFormer release's file on GitHub, timm's copy on the Hub where there is one (listed first),
    and for the five PoolFormers the conversion in Hugging Face transformers' layout (``sail/{name}``)."""
    release = PretrainedCfg(architecture=name, tag="release_in1k", layout="original_v1", url=_GH.format(name),
                            crop_pct=crop_pct)
    if not on_timm:
        return (release,)
    timm = PretrainedCfg(architecture=name, tag="sail_in1k", layout="timm", hf_hub_id=f"timm/{name}.sail_in1k",
                         crop_pct=crop_pct)
    transformers = PretrainedCfg(architecture=name, tag="transformers_in1k", layout="transformers",
                                 hf_hub_id=f"sail/{name}", hf_filename="pytorch_model.bin", crop_pct=crop_pct)
    return (timm, release, transformers)


# The baselines' extra weights: (our release tag, timm's tag, sail/dl file suffix, input size, classes).
_S384, _IN21K = (3, 384, 384), 21841
_EXTENDED = [
    ("in1k_384", "sail_in1k_384", "_384", _S384, 1000),
    ("in22k_ft_in1k", "sail_in22k_ft_in1k", "_in21ft1k", (3, 224, 224), 1000),
    ("in22k_ft_in1k_384", "sail_in22k_ft_in1k_384", "_384_in21ft1k", _S384, 1000),
    ("in22k", "sail_in22k", "_in21k", (3, 224, 224), _IN21K),
]


def _baseline_sources(family: str, name: str, *, on_timm: bool, extended: bool) -> Tuple[PretrainedCfg, ...]:
    """timm's Hub copies (where they exist) and the release's ``sail/dl`` files, 224 ImageNet-1k first."""
    def timm(tag: str, **kw) -> PretrainedCfg:
        return PretrainedCfg(architecture=name, tag=tag, layout="timm", hf_hub_id=f"timm/{name}.{tag}", crop_pct=1.0,
                             **kw)

    def release(tag: str, suffix: str = "", **kw) -> PretrainedCfg:
        return PretrainedCfg(architecture=name, tag=tag, layout="original_baselines", hf_hub_id="sail/dl",
                             hf_filename=f"{family}/{name}{suffix}.pth", crop_pct=1.0, **kw)

    sources = ([timm("sail_in1k")] if on_timm else []) + [release("release_in1k")]
    if extended:
        for tag, timm_tag, suffix, size, classes in _EXTENDED:
            sources += [timm(timm_tag, input_size=size, num_classes=classes),
                        release(f"release_{tag}", suffix, input_size=size, num_classes=classes)]
    return tuple(sources)


# ------------------------------------------------------------------------------- the table
_ATTN_V1 = P(Attention, head_dim=32, proj_bias=True)
_ATTN_BASELINES = P(Attention, head_dim=32, proj_bias=False)
_POOL4 = (Pooling,) * 4
_RAND = (Identity, Identity, P(RandomMixing, spatial_size=(14, 14)), P(RandomMixing, spatial_size=(7, 7)))
_SIZES = {"s12": (S12, S_DIMS), "s24": (S24, S_DIMS), "s36": (S36, S_DIMS), "m36": (S36, M_DIMS), "m48": (M48, M_DIMS)}
_BASELINE_DROP_PATH = {"s12": 0.1, "s24": 0.15, "s36": 0.2, "m36": 0.3, "m48": 0.4}


def _poolformer(name, *, depths, dims, layer_scale, params, macs, top1, crop_pct, drop_path) -> Variant:
    return Variant(name=name, family="poolformer", depths=depths, dims=dims, mixers=_POOL4, params=params, macs=macs,
                   top1=top1, crop_pct=crop_pct, drop_path=drop_path, extra={"layer_scale_init_values": layer_scale},
                   sources=_v1_sources(name, crop_pct=crop_pct, on_timm=True))


def _hybrid(name, *, family, mixers, params, crop_pct, macs=None, pos_embed_sizes=None) -> Variant:
    # The hybrids' accuracies circulate only through secondary sources, unchecked against the paper, and
    # the release gives MACs for none but the identity model: left None.
    extra: Dict[str, Any] = {"layer_scale_init_values": 1e-5}
    if pos_embed_sizes:
        extra["pos_embed_sizes"] = pos_embed_sizes
    return Variant(name=name, family=family, depths=S12, dims=S_DIMS, mixers=mixers, params=params, macs=macs,
                   top1=None, crop_pct=crop_pct, drop_path=0.1, extra=extra,
                   sources=_v1_sources(name, crop_pct=crop_pct, on_timm=False))


def _baseline_gn(family, size, *, mixers, params, macs, top1, on_timm) -> Variant:
    name = f"{family}_{size}"
    depths, dims = _SIZES[size]
    return Variant(name=name, family="baseline_gn", depths=depths, dims=dims, mixers=mixers, params=params,
                   macs=macs, top1=top1, crop_pct=1.0, drop_path=_BASELINE_DROP_PATH[size], paper="baselines",
                   sources=_baseline_sources(family, name, on_timm=on_timm, extended=False))


def _baseline_ln(family, size, *, depths, dims, mixers, params, macs, top1, drop_path) -> Variant:
    name = f"{family}_{size}"
    return Variant(name=name, family="baseline_ln", depths=depths, dims=dims, mixers=mixers, params=params,
                   macs=macs, top1=top1, crop_pct=1.0, drop_path=drop_path, paper="baselines",
                   sources=_baseline_sources(family, name, on_timm=True, extended=True))


_CONV = (SepConv,) * 4
_CA = (SepConv, SepConv, _ATTN_BASELINES, _ATTN_BASELINES)
_ROWS = [
    _poolformer("poolformer_s12", depths=S12, dims=S_DIMS, layer_scale=1e-5, params=11_915_176, macs=1.8, top1=77.2,
                crop_pct=0.9, drop_path=0.1),
    _poolformer("poolformer_s24", depths=S24, dims=S_DIMS, layer_scale=1e-5, params=21_388_968, macs=3.4, top1=80.3,
                crop_pct=0.9, drop_path=0.1),
    _poolformer("poolformer_s36", depths=S36, dims=S_DIMS, layer_scale=1e-6, params=30_862_760, macs=5.0, top1=81.4,
                crop_pct=0.9, drop_path=0.2),
    _poolformer("poolformer_m36", depths=S36, dims=M_DIMS, layer_scale=1e-6, params=56_172_520, macs=8.8, top1=82.1,
                crop_pct=0.95, drop_path=0.3),
    _poolformer("poolformer_m48", depths=M48, dims=M_DIMS, layer_scale=1e-6, params=73_473_448, macs=11.6, top1=82.5,
                crop_pct=0.95, drop_path=0.4),
    _hybrid("metaformer_id_s12", family="poolformer", mixers=(Identity,) * 4, params=11_915_176, macs=1.8,
            crop_pct=0.9),
    _hybrid("metaformer_pppa_s12_224", family="metaformer_v1_ln", mixers=(Pooling, Pooling, Pooling, _ATTN_V1),
            pos_embed_sizes=[None, None, None, (7, 7)], params=14_038_440, crop_pct=0.95),
    _hybrid("metaformer_ppaa_s12_224", family="metaformer_v1_ln", mixers=(Pooling, Pooling, _ATTN_V1, _ATTN_V1),
            pos_embed_sizes=[None, None, (14, 14), None], params=16_535_592, crop_pct=0.95),
    _hybrid("metaformer_pppf_s12_224", family="poolformer",
            mixers=(Pooling, Pooling, Pooling, P(SpatialMLP, spatial_size=(7, 7))), params=11_919_978, crop_pct=0.9),
    _hybrid("metaformer_ppff_s12_224", family="poolformer",
            mixers=(Pooling, Pooling, P(SpatialMLP, spatial_size=(14, 14)), P(SpatialMLP, spatial_size=(7, 7))),
            params=12_150_474, crop_pct=0.95),
]
for _family, _mixers, _on_timm, _rows in [
    ("identityformer", (Identity,) * 4, False, [
        dict(size="s12", params=11_891_712, macs=1.8, top1=74.6), dict(size="s24", params=21_341_464, macs=3.4, top1=78.2),
        dict(size="s36", params=30_791_216, macs=5.0, top1=79.3), dict(size="m36", params=56_077_168, macs=8.8, top1=80.0),
        dict(size="m48", params=73_346_056, macs=11.5, top1=80.4)]),
    ("randformer", _RAND, False, [
        dict(size="s12", params=12_127_010, macs=1.9, top1=76.6), dict(size="s24", params=21_812_060, macs=3.5, top1=78.2),
        dict(size="s36", params=31_497_110, macs=5.2, top1=79.5), dict(size="m36", params=56_783_062, macs=9.0, top1=81.2),
        dict(size="m48", params=74_287_248, macs=11.9, top1=81.4)]),
    ("poolformerv2", _POOL4, True, [
        dict(size="s12", params=11_891_712, macs=1.8, top1=78.0), dict(size="s24", params=21_341_464, macs=3.4, top1=80.7),
        dict(size="s36", params=30_791_216, macs=5.0, top1=81.6), dict(size="m36", params=56_077_168, macs=8.8, top1=82.2),
        dict(size="m48", params=73_346_056, macs=11.5, top1=82.6)]),
]:
    _ROWS += [_baseline_gn(_family, r.pop("size"), mixers=_mixers, on_timm=_on_timm, **r) for r in _rows]
_M_DIMS_B, _B_DIMS = (96, 192, 384, 576), (128, 256, 512, 768)
for _family, _mixers, _rows in [
    ("convformer", _CONV, [
        dict(size="s18", depths=S18, dims=S_DIMS, params=26_774_448, macs=3.9, top1=83.0, drop_path=0.2),
        dict(size="s36", depths=X36, dims=S_DIMS, params=40_012_152, macs=7.6, top1=84.1, drop_path=0.3),
        dict(size="m36", depths=X36, dims=_M_DIMS_B, params=57_051_640, macs=12.8, top1=84.5, drop_path=0.4),
        dict(size="b36", depths=X36, dims=_B_DIMS, params=99_882_616, macs=22.6, top1=84.8, drop_path=0.6)]),
    ("caformer", _CA, [
        dict(size="s18", depths=S18, dims=S_DIMS, params=26_341_656, macs=4.1, top1=83.6, drop_path=0.15),
        dict(size="s36", depths=X36, dims=S_DIMS, params=39_297_102, macs=8.0, top1=84.5, drop_path=0.3),
        dict(size="m36", depths=X36, dims=_M_DIMS_B, params=56_204_878, macs=13.2, top1=85.2, drop_path=0.4),
        dict(size="b36", depths=X36, dims=_B_DIMS, params=98_753_614, macs=23.2, top1=85.5, drop_path=0.6)]),
]:
    _ROWS += [_baseline_ln(_family, r.pop("size"), mixers=_mixers, **r) for r in _rows]

VARIANTS: Dict[str, Variant] = {v.name: v for v in _ROWS}
"""Every registered model, by name: the one table that drives `create`, `list_models`, the docs and the tests."""

PRETRAINED_CFGS: Dict[str, PretrainedCfg] = {s.key: s for v in _ROWS for s in v.sources}
"""Every released set of weights, by ``name.tag``."""


@dataclass(frozen=True)
class DenseResults:
    """The dense-prediction results the PoolFormer release reports for a backbone (ImageNet-1k pretrained).

    Sources: sail-sg/poolformer ``segmentation/README.md`` (mmsegmentation 0.19) and ``detection/README.md``
    (mmdetection 2.19). None where the release trained no such model.

    Attributes:
        ade20k_miou: Semantic FPN on ADE20K, 40k iterations, single-scale mIoU (%) on the validation set.
        retinanet_box_ap: RetinaNet, 1x schedule, COCO val2017 box AP.
        mask_rcnn_box_ap: Mask R-CNN, 1x schedule, COCO val2017 box AP.
        mask_rcnn_mask_ap: Mask R-CNN, 1x schedule, COCO val2017 mask AP.
    """

    ade20k_miou: Optional[float] = None
    retinanet_box_ap: Optional[float] = None
    mask_rcnn_box_ap: Optional[float] = None
    mask_rcnn_mask_ap: Optional[float] = None


DENSE_RESULTS: Dict[str, DenseResults] = {
    "poolformer_s12": DenseResults(ade20k_miou=37.2, retinanet_box_ap=36.2, mask_rcnn_box_ap=37.3, mask_rcnn_mask_ap=34.6),
    "poolformer_s24": DenseResults(ade20k_miou=40.3, retinanet_box_ap=38.9, mask_rcnn_box_ap=40.1, mask_rcnn_mask_ap=37.0),
    "poolformer_s36": DenseResults(ade20k_miou=42.0, retinanet_box_ap=39.5, mask_rcnn_box_ap=41.0, mask_rcnn_mask_ap=37.7),
    "poolformer_m36": DenseResults(ade20k_miou=42.4),
    "poolformer_m48": DenseResults(ade20k_miou=42.7),
}
"""The release's ADE20K and COCO results, by backbone name (the other models have none)."""


def list_models(pattern: str = "*", pretrained: bool = False) -> list:
    """Names of the registered models, optionally filtered.

    Args:
        pattern: A shell-style pattern (``"poolformer*"``).
        pretrained: List ``name.tag`` for every released set of weights instead of the bare names.
    """
    import fnmatch

    names = []
    for v in VARIANTS.values():
        if pretrained:
            names += [f"{v.name}.{s.tag}" for s in v.sources]
        else:
            names.append(v.name)
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def get_pretrained_cfg(key: str) -> PretrainedCfg:
    """The released weights ``name.tag`` (``name`` alone: its default, the first listed).

    Raises:
        ValueError: for an unknown model or tag, listing what exists.
    """
    base, _, tag = key.partition(".")
    return get_variant(base).source(tag or None)


def get_variant(name: str) -> Variant:
    """The table row of a model name (without tag).

    Raises:
        ValueError: for an unknown name, listing the known ones (close matches first).
    """
    if name in VARIANTS:
        return VARIANTS[name]
    from .components import close_matches
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(close_matches(name, VARIANTS))}")
