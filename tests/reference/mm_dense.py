"""Reference of the release's dense-prediction models: mmsegmentation 0.x's Semantic FPN and mmdetection 2.x's
FPN neck, on the release's feature backbones.

Clean-room, written from reading mmsegmentation (``mmseg/models/necks/fpn.py``,
``mmseg/models/decode_heads/fpn_head.py`` and ``decode_head.py``, ``mmseg/ops/wrappers.py``,
``EncoderDecoder.encode_decode``), mmdetection 2.x (``mmdet/models/necks/fpn.py``), mmcv's ``ConvModule``
(names ``conv``/``bn``, bias only without a norm) and sail-sg/poolformer (``models/poolformer.py`` with
``fork_feat=True``: norms ``norm0``, ``norm2``, ``norm4``, ``norm6`` on the outputs of ``network[0, 2, 4, 6]``;
``segmentation/configs`` and ``detection/configs``). No mmcv; does not import ``metaformer``.

The MetaFormer baselines have no dense release: their feature backbone here follows ConvNeXt's dense
backbones (which the baselines' code mirrors), one norm ``norm{i}`` per stage i, of the family's block norm.

Public API:
    v1_backbone(name), baselines_backbone(name)       -> feature backbones in the release layouts
    MMFPN(in_channels, out_channels, num_outs, start_level, add_extra_convs)
    MMFPNHead(in_channels, channels, feature_strides, num_classes, dropout_ratio, align_corners)
    EncoderDecoder(backbone, neck, decode_head)       -> logits at the input size
    randomize_(model, seed)                           -> every floating tensor random, O(1)
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import original_baselines, original_v1

__all__ = ["v1_backbone", "baselines_backbone", "MMFPN", "MMFPNHead", "EncoderDecoder", "randomize_"]


# ----------------------------------------------------------------------------- backbones

class V1Features(nn.Module):
    """PoolFormer with ``fork_feat``: patch_embed, network, and a GroupNorm per returned stage."""

    def __init__(self, name):
        super().__init__()
        full = original_v1.build(name)
        self.patch_embed, self.network = full.patch_embed, full.network
        self.out_indices = [0, 2, 4, 6]
        dims = [self.network[k][0].mlp.fc1.in_channels for k in self.out_indices]
        for k, d in zip(self.out_indices, dims):
            self.add_module(f"norm{k}", nn.GroupNorm(1, d, eps=1e-5))

    def forward(self, x):
        x = self.patch_embed(x)
        outs = []
        for k, m in enumerate(self.network):
            x = m(x)
            if k in self.out_indices:
                outs.append(getattr(self, f"norm{k}")(x))
        return outs


class BaselinesFeatures(nn.Module):
    """A baselines model without head; stage i's (B, H, W, C) output through ``norm{i}``, returned NCHW."""

    def __init__(self, name):
        super().__init__()
        full = original_baselines.build(name)
        self.downsample_layers, self.stages = full.downsample_layers, full.stages
        norm = original_baselines._FAMILIES[name.partition("_")[0]][1]
        for i, stage in enumerate(self.stages):
            self.add_module(f"norm{i}", norm(stage[0].norm1.weight.shape[0]))

    def forward(self, x):
        outs = []
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
            outs.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2))
        return outs


def v1_backbone(name):
    return V1Features(name).eval()


def baselines_backbone(name):
    return BaselinesFeatures(name).eval()


# ----------------------------------------------------------------------------- neck and head

class ConvModule(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=0, with_bn=False, with_relu=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=not with_bn)
        if with_bn:
            self.bn = nn.BatchNorm2d(cout)
        self.with_bn, self.with_relu = with_bn, with_relu

    def forward(self, x):
        x = self.conv(x)
        if self.with_bn:
            x = self.bn(x)
        return F.relu(x) if self.with_relu else x


class MMFPN(nn.Module):
    """mmdet 2.x / mmseg 0.x FPN with end_level=-1, no norm, no activation, upsample_cfg nearest."""

    def __init__(self, in_channels, out_channels, num_outs, start_level=0, add_extra_convs=False):
        super().__init__()
        self.in_channels, self.num_outs, self.start_level = list(in_channels), num_outs, start_level
        self.add_extra_convs = add_extra_convs
        self.end = len(in_channels)
        self.lateral_convs = nn.ModuleList(ConvModule(in_channels[i], out_channels, 1)
                                           for i in range(start_level, self.end))
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, padding=1)
                                       for _ in range(start_level, self.end))
        extra = num_outs - self.end + start_level
        if add_extra_convs and extra >= 1:
            for i in range(extra):
                cin = in_channels[self.end - 1] if (i == 0 and add_extra_convs == "on_input") else out_channels
                self.fpn_convs.append(ConvModule(cin, out_channels, 3, stride=2, padding=1))

    def forward(self, inputs):
        assert len(inputs) == len(self.in_channels)
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        used = len(laterals)
        for i in range(used - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        outs = [self.fpn_convs[i](laterals[i]) for i in range(used)]
        if self.num_outs > used:
            if not self.add_extra_convs:
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                assert self.add_extra_convs == "on_input"
                outs.append(self.fpn_convs[used](inputs[self.end - 1]))
                for i in range(used + 1, self.num_outs):
                    outs.append(self.fpn_convs[i](outs[-1]))  # relu_before_extra_convs=False
        return tuple(outs)


class Upsample(nn.Module):
    def __init__(self, scale_factor, align_corners):
        super().__init__()
        self.scale_factor, self.align_corners = float(scale_factor), align_corners

    def forward(self, x):
        size = [int(t * self.scale_factor) for t in x.shape[-2:]]
        return F.interpolate(x, size, None, "bilinear", self.align_corners)


class MMFPNHead(nn.Module):
    """FPNHead (input_transform='multiple_select', in_index = all) with SyncBN-as-BN and ReLU."""

    def __init__(self, in_channels, channels, feature_strides, num_classes, dropout_ratio=0.1, align_corners=False):
        super().__init__()
        self.feature_strides, self.align_corners = feature_strides, align_corners
        self.scale_heads = nn.ModuleList()
        for i, s in enumerate(feature_strides):
            length = max(1, int(math.log2(s) - math.log2(feature_strides[0])))
            layers = []
            for k in range(length):
                layers.append(ConvModule(in_channels[i] if k == 0 else channels, channels, 3, padding=1,
                                         with_bn=True, with_relu=True))
                if s != feature_strides[0]:
                    layers.append(Upsample(2, align_corners))
            self.scale_heads.append(nn.Sequential(*layers))
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None

    def forward(self, inputs):
        output = self.scale_heads[0](inputs[0])
        for i in range(1, len(self.feature_strides)):
            output = output + F.interpolate(self.scale_heads[i](inputs[i]), size=tuple(output.shape[2:]),
                                            mode="bilinear", align_corners=self.align_corners)
        if self.dropout is not None:
            output = self.dropout(output)
        return self.conv_seg(output)


class EncoderDecoder(nn.Module):
    def __init__(self, backbone, neck, decode_head, align_corners=False):
        super().__init__()
        self.backbone, self.neck, self.decode_head = backbone, neck, decode_head
        self.align_corners = align_corners

    def forward(self, img):
        out = self.decode_head(self.neck(self.backbone(img)))
        return F.interpolate(out, size=tuple(img.shape[2:]), mode="bilinear", align_corners=self.align_corners)


# ----------------------------------------------------------------------------- helpers

def randomize_(model, seed=0):
    """Backbone tensors by the release references' rules; neck and head: conv weights N(0, 1/sqrt(fan_in)),
    biases N(0, 0.1); BatchNorm weight U(0.5, 1.5), bias and running mean N(0, 0.1), running var U(0.5, 1.5)."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, V1Features):
        original_v1.randomize_(backbone, seed)
    elif isinstance(backbone, BaselinesFeatures):
        original_baselines.randomize_(backbone, seed)
    g = torch.Generator().manual_seed(int(seed) + 1)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=True).items():
            if key.startswith("backbone.") or not torch.is_floating_point(t):
                continue
            prefix, _, leaf = key.rpartition(".")
            owner = modules[prefix]
            if isinstance(owner, nn.BatchNorm2d):
                uniform = leaf in ("weight", "running_var")
                v = torch.rand(t.shape, generator=g) + 0.5 if uniform else torch.randn(t.shape, generator=g) * 0.1
            elif isinstance(owner, nn.Conv2d):
                v = (torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()) if leaf == "weight"
                     else torch.randn(t.shape, generator=g) * 0.1)
            else:
                raise RuntimeError(f"randomize_: no rule for state tensor {key!r}")
            t.copy_(v)
    return model
