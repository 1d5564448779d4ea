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

__all__ = ["Variant", "PretrainedSource", "FAMILIES", "VARIANTS", "list_models", "get_variant", "IMAGENET_MEAN",
           "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
class PretrainedSource:
    """Where one set of released weights lives and how to preprocess for it.

    Attributes:
        tag: The tag after the dot in ``name.tag``.
        layout: Key layout of the file: ``"timm"``, ``"original_v1"`` or ``"original_baselines"``.
        hf_hub_id: Hugging Face Hub repo holding the file, or None.
        hf_filename: File in that repo.
        url: Direct URL (downloaded through torch.hub's cache), used when there is no Hub repo.
        num_classes: Classes of the released classifier.
        input_size: (C, H, W) the weights were trained/evaluated at.
        crop_pct: Center-crop fraction of the evaluation transform.
        interpolation: Resize interpolation of the evaluation transform.
    """

    tag: str
    layout: str
    hf_hub_id: Optional[str] = None
    hf_filename: str = "model.safetensors"
    url: Optional[str] = None
    num_classes: int = 1000
    input_size: Tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.9
    interpolation: str = "bicubic"

    @property
    def location(self) -> str:
        """A human-readable address of the file."""
        return f"hf-hub:{self.hf_hub_id}/{self.hf_filename}" if self.hf_hub_id else str(self.url)

    def data_config(self) -> Dict[str, Any]:
        """The preprocessing settings as a dict that timm's ``resolve_data_config`` reads."""
        return dict(input_size=self.input_size, crop_pct=self.crop_pct, interpolation=self.interpolation,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=self.num_classes, tag=self.tag,
                    source=self.location)


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
    sources: Tuple[PretrainedSource, ...] = ()
    paper: str = "poolformer"

    def model_kwargs(self) -> Dict[str, Any]:
        """The MetaFormer keyword arguments of this variant."""
        return {**FAMILIES[self.family], "depths": self.depths, "dims": self.dims,
                "token_mixers": list(self.mixers), **self.extra}

    def source(self, tag: Optional[str] = None) -> PretrainedSource:
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


_GH = "https://github.com/sail-sg/poolformer/releases/download/v1.0/{}.pth.tar"


def _v1_sources(name: str, crop: float, timm: bool) -> Tuple[PretrainedSource, ...]:
    release = PretrainedSource("release_in1k", "original_v1", url=_GH.format(name), crop_pct=crop)
    if not timm:
        return (release,)
    return (PretrainedSource("sail_in1k", "timm", hf_hub_id=f"timm/{name}.sail_in1k", crop_pct=crop), release)


def _dl(family: str, name: str, suffix: str = "") -> Dict[str, Any]:
    return dict(layout="original_baselines", hf_hub_id="sail/dl", hf_filename=f"{family}/{name}{suffix}.pth")


def _baseline_sources(family: str, name: str, timm: bool, extended: bool) -> Tuple[PretrainedSource, ...]:
    sources = []
    if timm:
        sources.append(PretrainedSource("sail_in1k", "timm", hf_hub_id=f"timm/{name}.sail_in1k", crop_pct=1.0))
    sources.append(PretrainedSource("release_in1k", crop_pct=1.0, **_dl(family, name)))
    if extended:
        s384, c21 = (3, 384, 384), 21841
        for tag, hub_tag, suffix, size, classes in [
            ("in1k_384", "sail_in1k_384", "_384", s384, 1000),
            ("in22k_ft_in1k", "sail_in22k_ft_in1k", "_in21ft1k", (3, 224, 224), 1000),
            ("in22k_ft_in1k_384", "sail_in22k_ft_in1k_384", "_384_in21ft1k", s384, 1000),
            ("in22k", "sail_in22k", "_in21k", (3, 224, 224), c21),
        ]:
            sources.append(PretrainedSource(hub_tag, "timm", hf_hub_id=f"timm/{name}.{hub_tag}", crop_pct=1.0,
                                            input_size=size, num_classes=classes))
            sources.append(PretrainedSource(f"release_{tag}", crop_pct=1.0, input_size=size, num_classes=classes,
                                            **_dl(family, name, suffix)))
    return tuple(sources)


def _table():
    rows = []
    pool4 = (Pooling,) * 4
    for name, depths, dims, ls, params, macs, top1, crop, dp in [
        ("poolformer_s12", S12, S_DIMS, 1e-5, 11_915_176, 1.8, 77.2, 0.9, 0.1),
        ("poolformer_s24", S24, S_DIMS, 1e-5, 21_388_968, 3.4, 80.3, 0.9, 0.1),
        ("poolformer_s36", S36, S_DIMS, 1e-6, 30_862_760, 5.0, 81.4, 0.9, 0.2),
        ("poolformer_m36", S36, M_DIMS, 1e-6, 56_172_520, 8.8, 82.1, 0.95, 0.3),
        ("poolformer_m48", M48, M_DIMS, 1e-6, 73_473_448, 11.6, 82.5, 0.95, 0.4),
    ]:
        rows.append(Variant(name, "poolformer", depths, dims, pool4, params, macs, top1, crop, dp,
                            {"layer_scale_init_values": ls}, _v1_sources(name, crop, timm=True)))

    attn_v1 = P(Attention, head_dim=32, proj_bias=True)
    # The hybrids' accuracies circulate only through secondary sources (REFERENCE.md asks to check the
    # paper before printing them) and the release gives MACs for none but the identity model: left None.
    for name, family, mixers, pos, params, macs, crop in [
        ("metaformer_id_s12", "poolformer", (Identity,) * 4, None, 11_915_176, 1.8, 0.9),
        ("metaformer_pppa_s12_224", "metaformer_v1_ln", (Pooling, Pooling, Pooling, attn_v1),
         [None, None, None, (7, 7)], 14_038_440, None, 0.95),
        ("metaformer_ppaa_s12_224", "metaformer_v1_ln", (Pooling, Pooling, attn_v1, attn_v1),
         [None, None, (14, 14), None], 16_535_592, None, 0.95),
        ("metaformer_pppf_s12_224", "poolformer", (Pooling, Pooling, Pooling, P(SpatialMLP, spatial_size=(7, 7))),
         None, 11_919_978, None, 0.9),
        ("metaformer_ppff_s12_224", "poolformer",
         (Pooling, Pooling, P(SpatialMLP, spatial_size=(14, 14)), P(SpatialMLP, spatial_size=(7, 7))),
         None, 12_150_474, None, 0.95),
    ]:
        extra = {"layer_scale_init_values": 1e-5}
        if pos:
            extra["pos_embed_sizes"] = pos
        rows.append(Variant(name, family, S12, S_DIMS, mixers, params, macs, None, crop, 0.1, extra,
                            _v1_sources(name, crop, timm=False)))

    rand = (Identity, Identity, P(RandomMixing, spatial_size=(14, 14)), P(RandomMixing, spatial_size=(7, 7)))
    for fam, mixers, timm, rows_ in [
        ("identityformer", (Identity,) * 4, False, [
            ("s12", 11_891_712, 1.8, 74.6), ("s24", 21_341_464, 3.4, 78.2), ("s36", 30_791_216, 5.0, 79.3),
            ("m36", 56_077_168, 8.8, 80.0), ("m48", 73_346_056, 11.5, 80.4)]),
        ("randformer", rand, False, [
            ("s12", 12_127_010, 1.9, 76.6), ("s24", 21_812_060, 3.5, 78.2), ("s36", 31_497_110, 5.2, 79.5),
            ("m36", 56_783_062, 9.0, 81.2), ("m48", 74_287_248, 11.9, 81.4)]),
        ("poolformerv2", pool4, True, [
            ("s12", 11_891_712, 1.8, 78.0), ("s24", 21_341_464, 3.4, 80.7), ("s36", 30_791_216, 5.0, 81.6),
            ("m36", 56_077_168, 8.8, 82.2), ("m48", 73_346_056, 11.5, 82.6)]),
    ]:
        for size, params, macs, top1 in rows_:
            depths = {"s12": S12, "s24": S24, "s36": S36, "m36": S36, "m48": M48}[size]
            dims = S_DIMS if size.startswith("s") else M_DIMS
            name = f"{fam}_{size}"
            rows.append(Variant(name, "baseline_gn", depths, dims, mixers, params, macs, top1, 1.0,
                                {"s12": 0.1, "s24": 0.15, "s36": 0.2, "m36": 0.3, "m48": 0.4}[size],
                                sources=_baseline_sources(fam, name, timm, extended=False), paper="baselines"))

    attn_b = P(Attention, head_dim=32, proj_bias=False)
    for fam, mixers, rows_ in [
        ("convformer", (SepConv,) * 4, [
            ("s18", S18, S_DIMS, 26_774_448, 3.9, 83.0, 0.2), ("s36", X36, S_DIMS, 40_012_152, 7.6, 84.1, 0.3),
            ("m36", X36, (96, 192, 384, 576), 57_051_640, 12.8, 84.5, 0.4),
            ("b36", X36, (128, 256, 512, 768), 99_882_616, 22.6, 84.8, 0.6)]),
        ("caformer", (SepConv, SepConv, attn_b, attn_b), [
            ("s18", S18, S_DIMS, 26_341_656, 4.1, 83.6, 0.15), ("s36", X36, S_DIMS, 39_297_102, 8.0, 84.5, 0.3),
            ("m36", X36, (96, 192, 384, 576), 56_204_878, 13.2, 85.2, 0.4),
            ("b36", X36, (128, 256, 512, 768), 98_753_614, 23.2, 85.5, 0.6)]),
    ]:
        for size, depths, dims, params, macs, top1, dp in rows_:
            name = f"{fam}_{size}"
            rows.append(Variant(name, "baseline_ln", depths, dims, mixers, params, macs, top1, 1.0, dp,
                                sources=_baseline_sources(fam, name, True, extended=True), paper="baselines"))
    return {v.name: v for v in rows}


VARIANTS: Dict[str, Variant] = _table()
"""Every registered model, by name: the one table that drives `create`, `list_models`, the docs and the tests."""


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


def get_variant(name: str) -> Variant:
    """The table row of a model name (without tag).

    Raises:
        ValueError: for an unknown name, listing the known ones (close matches first).
    """
    if name in VARIANTS:
        return VARIANTS[name]
    from .components import close_matches
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(close_matches(name, VARIANTS))}")
