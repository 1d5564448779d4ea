"""The feature pyramid network of mmdetection 2.x / mmsegmentation 0.x, the neck of the release's dense models.

PoolFormer's detection and segmentation results (sail-sg/poolformer ``detection/`` and ``segmentation/``)
put OpenMMLab's ``FPN`` on the four normalised stage maps: 256 channels; for Semantic FPN 4 outputs; for
Mask R-CNN 5 outputs, the fifth a stride-2 max pooling of the last; for RetinaNet the last three stages
(``start_level=1``) and 5 outputs, the two extra levels 3x3 stride-2 convolutions on the last *input* map
(``add_extra_convs='on_input'``), without a ReLU between them. Module and tensor names follow mmcv's
``ConvModule`` (``lateral_convs.{i}.conv``, ``fpn_convs.{i}.conv``, ``.bn`` for a norm), so that the
release's checkpoints load by name.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvNormAct", "FPN"]


class ConvNormAct(nn.Module):
    """Convolution, optional norm and optional ReLU, named like mmcv's ``ConvModule`` (``conv``, ``bn``).

    The convolution has a bias only without a norm (mmcv's ``bias='auto'``); it starts as mmcv's default
    (Kaiming normal, fan-out, for ReLU; zero bias) and the norm as weight 1, bias 0.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Square kernel side.
        stride: Convolution stride.
        norm_layer: Norm class called as ``norm_layer(out_channels)`` (e.g. ``nn.BatchNorm2d``), or None.
        relu: Whether a ReLU follows.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 norm_layer: Optional[Callable[[int], nn.Module]] = None, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                              bias=norm_layer is None)
        self.bn = norm_layer(out_channels) if norm_layer is not None else None
        self.act = nn.ReLU(inplace=True) if relu else None
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        if self.bn is not None:
            nn.init.ones_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.act is not None:
            x = self.act(x)
        return x


class FPN(nn.Module):
    """Feature pyramid network as mmdetection 2.x and mmsegmentation 0.x define it (Lin et al., 2017).

    A 1x1 lateral convolution per input map, a top-down path adding each coarser lateral upsampled by
    nearest-neighbour interpolation to the size of the finer one, and a 3x3 convolution on every sum;
    no norm and no activation (the release's settings). Outputs beyond the inputs come from stride-2 max
    pooling of the last output or, with ``add_extra_convs="on_input"``, from stride-2 3x3 convolutions,
    the first on the last input map and each next one on the previous output.

    mmdetection's ``start_level=1`` (RetinaNet) is a backbone built with ``out_indices=(1, 2, 3)``: the
    FPN always uses every map it is given.

    Args:
        in_channels: Channels of each input map, finest first.
        out_channels: Channels of every output map.
        num_outs: Number of output maps (default: one per input).
        add_extra_convs: False (extra levels by max pooling) or ``"on_input"``.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_outs: Optional[int] = None,
                 add_extra_convs: Union[bool, str] = False):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        num_outs = len(in_channels) if num_outs is None else num_outs
        if not in_channels or num_outs < len(in_channels):
            raise ValueError(f"FPN: need at least one input and num_outs >= the number of inputs, got "
                             f"in_channels={in_channels}, num_outs={num_outs}")
        if add_extra_convs not in (False, "on_input"):
            raise ValueError(f"FPN: add_extra_convs must be False or 'on_input', got {add_extra_convs!r}")
        self.in_channels, self.out_channels, self.num_outs = in_channels, out_channels, num_outs
        self.add_extra_convs = add_extra_convs
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvNormAct(out_channels, out_channels, 3) for _ in in_channels)
        if add_extra_convs:
            for i in range(num_outs - len(in_channels)):
                self.fpn_convs.append(ConvNormAct(in_channels[-1] if i == 0 else out_channels, out_channels, 3,
                                                  stride=2))
        for m in self.modules():  # mmdet/mmseg FPN init_cfg: Xavier uniform on every Conv2d
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Maps the backbone's maps (finest first) to ``num_outs`` maps of ``out_channels`` channels."""
        if len(inputs) != len(self.in_channels) or any(
                x.dim() != 4 or x.shape[1] != c for x, c in zip(inputs, self.in_channels)):
            got = [tuple(x.shape) for x in inputs]
            raise ValueError(f"FPN expects {len(self.in_channels)} maps (B, C, H, W) with C = {self.in_channels}, "
                             f"got shapes {got}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        outs = [self.fpn_convs[i](lateral) for i, lateral in enumerate(laterals)]
        n = len(laterals)
        for i in range(n, self.num_outs):
            if not self.add_extra_convs:
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                outs.append(self.fpn_convs[i](inputs[-1] if i == n else outs[-1]))
        return outs
