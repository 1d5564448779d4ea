"""Semantic segmentation: Semantic FPN on any MetaFormer, as the PoolFormer release configured it.

The release's ADE20K models (sail-sg/poolformer ``segmentation/``, mmsegmentation 0.19, config
``fpn_poolformer_*_ade20k_40k.py`` over ``fpn_r50.py``) are an mmsegmentation ``EncoderDecoder``:

- ``backbone``: the four stage maps (strides 4, 8, 16, 32), each through its own norm;
- ``neck``: ``FPN`` with 256 channels and 4 outputs (:class:`metaformer.fpn.FPN`);
- ``decode_head``: ``FPNHead`` (Kirillov et al., 2019) with 128 channels: per level a scale head of
  3x3 conv-SyncBN-ReLU blocks, each followed by a 2x bilinear upsampling until stride 4 (the stride-4 level
  has one block and no upsampling), the levels summed, then Dropout2d(0.1) and a 1x1 classifier;
- the logits are upsampled bilinearly to the input size; ``align_corners=False`` throughout.

Checkpoints of that layout (``backbone.*``, ``neck.lateral_convs.{i}.conv``, ``neck.fpn_convs.{i}.conv``,
``decode_head.scale_heads.{i}.{j}.conv``/``.bn``, ``decode_head.conv_seg``) load strictly; the models
here have the same names, with the backbone in this library's layout.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dense_weights import fit_parts, load_parts, read_state, split_by_prefix
from .fpn import FPN, ConvNormAct
from .model import MetaFormer
from .weights import CheckpointError, read_checkpoint

__all__ = ["FPNHead", "SemanticFPN", "create_segmenter", "load_segmenter_checkpoint", "convert_sync_batchnorm"]

logger = logging.getLogger("metaformer")
ADE20K_CLASSES = 150


class _Upsample2x(nn.Module):
    """mmseg's ``Upsample(scale_factor=2)``: bilinear resizing to exactly twice the input size."""

    def __init__(self, align_corners: bool):
        super().__init__()
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [2 * s for s in x.shape[-2:]]
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)


class FPNHead(nn.Module):
    """mmsegmentation's ``FPNHead``, the decode head of Semantic FPN.

    Level ``i`` (stride ``s_i``) goes through ``max(1, log2(s_i / s_0))`` 3x3 conv-norm-ReLU blocks, each
    followed by a 2x bilinear upsampling unless ``s_i == s_0``; the levels are resized to the first one's
    size and summed; dropout and a 1x1 convolution give the logits at stride ``s_0``.

    Args:
        num_classes: Number of classes.
        in_channels: Channels of every input map (the FPN's).
        channels: Channels of the scale heads.
        feature_strides: Stride of each input map, finest first, powers of two.
        dropout: Dropout2d rate before the classifier.
        norm_layer: Norm of the scale heads (BatchNorm, converted to SyncBatchNorm under DDP).
        align_corners: ``align_corners`` of the bilinear resizings.
    """

    def __init__(self, num_classes: int, in_channels: int = 256, channels: int = 128,
                 feature_strides: Sequence[int] = (4, 8, 16, 32), dropout: float = 0.1,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, align_corners: bool = False):
        super().__init__()
        strides = [int(s) for s in feature_strides]
        if not strides or min(strides) != strides[0] or any(s & (s - 1) for s in strides):
            raise ValueError(f"feature_strides must be powers of two, the first the smallest, got {strides}")
        self.feature_strides, self.align_corners, self.num_classes = strides, align_corners, num_classes
        self.scale_heads = nn.ModuleList()
        for s in strides:
            blocks = []
            for k in range(max(1, int(math.log2(s) - math.log2(strides[0])))):
                blocks.append(ConvNormAct(in_channels if k == 0 else channels, channels, 3, norm_layer=norm_layer,
                                          relu=True))
                if s != strides[0]:
                    blocks.append(_Upsample2x(align_corners))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg's init_cfg for conv_seg
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits (B, num_classes, H0, W0) at the first map's size."""
        if len(inputs) != len(self.scale_heads):
            raise ValueError(f"FPNHead expects {len(self.scale_heads)} maps, got {len(inputs)}")
        out = self.scale_heads[0](inputs[0])
        for head, x in zip(self.scale_heads[1:], inputs[1:]):
            out = out + F.interpolate(head(x), size=out.shape[2:], mode="bilinear",
                                      align_corners=self.align_corners)
        return self.conv_seg(self.dropout(out))


class SemanticFPN(nn.Module):
    """Semantic FPN: a ``features_only`` MetaFormer, :class:`~metaformer.fpn.FPN` and :class:`FPNHead`.

    Build it with :func:`create_segmenter`. ``forward`` returns logits at the input's size; train them
    with ``F.cross_entropy(logits, masks, ignore_index=255)`` as the release does.

    Args:
        backbone: A MetaFormer built with ``features_only=True``.
        num_classes: Number of classes.
        fpn_channels: Channels of the FPN.
        head_channels: Channels of the decode head.
        dropout: Dropout2d rate before the classifier.
        align_corners: ``align_corners`` of every bilinear resizing.
    """

    def __init__(self, backbone: MetaFormer, num_classes: int, fpn_channels: int = 256, head_channels: int = 128,
                 dropout: float = 0.1, align_corners: bool = False):
        super().__init__()
        if not getattr(backbone, "features_only", False):
            raise ValueError("SemanticFPN needs a backbone built with features_only=True, e.g. "
                             "metaformer.create(name, features_only=True)")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.backbone = backbone
        info = backbone.feature_info
        self.neck = FPN(info.channels(), fpn_channels, num_outs=len(info))
        self.decode_head = FPNHead(num_classes, fpn_channels, head_channels, info.reduction(), dropout,
                                   align_corners=align_corners)
        self.num_classes, self.align_corners = num_classes, align_corners
        self.config: Dict[str, Any] = {}

    @property
    def pretrained_cfg(self) -> Dict[str, Any]:
        """The backbone's preprocessing (mean, std): the release normalises with ImageNet's."""
        return self.backbone.pretrained_cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, H, W) for images (B, C, H, W)."""
        logits = self.decode_head(self.neck(self.backbone(x)))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=self.align_corners)


def create_segmenter(name: str, num_classes: Optional[int] = None, pretrained: bool = False,
                     checkpoint: Optional[str] = None, *, fpn_channels: int = 256, head_channels: int = 128,
                     dropout: float = 0.1, align_corners: bool = False, **overrides) -> SemanticFPN:
    """Builds a Semantic FPN segmenter on any registered model, as the PoolFormer release configured it.

    Args:
        name: A model name (see :func:`metaformer.list_models`), optionally with a pretrained tag.
        num_classes: Number of classes. Default: the checkpoint's if one is given, else 150 (ADE20K, the
            release's data set). With a checkpoint of another number of classes, its classifier is
            replaced by a fresh one (fine-tuning).
        pretrained: Start the backbone from the released ImageNet weights (the release's starting point);
            its per-stage norms, the FPN and the head start fresh.
        checkpoint: A whole segmenter: an mmsegmentation checkpoint of the release (Semantic FPN) or a
            state dict of a model built here, loaded strictly (see :func:`load_segmenter_checkpoint`).
        fpn_channels: Channels of the FPN (release: 256).
        head_channels: Channels of the decode head (release: 128).
        dropout: Dropout2d before the classifier (release: 0.1).
        align_corners: ``align_corners`` of the bilinear resizings (release: False).
        **overrides: Backbone settings passed to :func:`metaformer.create` (``drop_path_rate``,
            ``out_indices``, ablations...).

    Returns:
        The segmenter, in training mode.

    Raises:
        ValueError / TypeError: for bad names, arguments or overrides.
        metaformer.CheckpointError: for a checkpoint that cannot be read or does not fit.

    Example:
        >>> model = metaformer.create_segmenter("caformer_s18", num_classes=150, pretrained=True)
    """
    from .factory import create

    if "features_only" in overrides:
        raise TypeError("create_segmenter builds a features_only backbone itself; do not pass features_only")
    if pretrained and checkpoint is not None:
        raise ValueError("pass either pretrained=True (ImageNet backbone) or checkpoint=PATH (whole segmenter)")
    state = read_checkpoint(os.fspath(checkpoint)) if checkpoint is not None else None
    ckpt_classes = None
    if state is not None and state.get("decode_head.conv_seg.weight") is not None:
        ckpt_classes = int(state["decode_head.conv_seg.weight"].shape[0])
    if num_classes is None:
        num_classes = ckpt_classes or ADE20K_CLASSES
    backbone = create(name, pretrained=pretrained, features_only=True, **overrides)
    model = SemanticFPN(backbone, num_classes, fpn_channels, head_channels, dropout, align_corners)
    model.config = dict(name=name, num_classes=num_classes, fpn_channels=fpn_channels, head_channels=head_channels,
                        dropout=dropout, align_corners=align_corners, overrides=dict(overrides))
    if state is not None:
        load_segmenter_checkpoint(model, state, replace_classifier=ckpt_classes not in (None, num_classes),
                                  source=f"checkpoint {os.fspath(checkpoint)}")
    return model


def load_segmenter_checkpoint(model: SemanticFPN, checkpoint, replace_classifier: bool = False,
                              source: Optional[str] = None) -> None:
    """Loads a whole Semantic FPN checkpoint strictly: mmsegmentation's layout or this library's.

    The ``backbone.*`` tensors may be in any layout :func:`metaformer.convert_state_dict` reads (the
    release's files hold the original PoolFormer names with the norms ``norm0``...``norm6``); ``neck.*``
    and ``decode_head.*`` must match by name and shape. Nothing is loaded unless everything fits.

    Args:
        model: The segmenter.
        checkpoint: A path, or a state dict already read.
        replace_classifier: Keep the model's fresh ``decode_head.conv_seg`` instead of the checkpoint's
            (fine-tuning to another number of classes).
        source: How errors name the checkpoint.

    Raises:
        metaformer.CheckpointError: naming what is missing, unexpected or mis-shaped.
    """
    checkpoint, source = read_state(checkpoint, source)
    parts, rest = split_by_prefix(checkpoint, ("backbone.", "neck.", "decode_head."))
    skip = ("conv_seg.",) if replace_classifier else ()
    try:
        neck, head, _ = fit_parts([(model.neck, parts["neck."], "neck.", ()),
                                   (model.decode_head, parts["decode_head."], "decode_head.", skip),
                                   (nn.Module(), rest, "", ())])  # anything else is unexpected
    except CheckpointError as e:
        raise CheckpointError(f"{source} does not fit the Semantic FPN: {e}") from None
    load_parts(model.backbone, parts["backbone."], [(model.neck, neck), (model.decode_head, head)], source)
    if replace_classifier:
        logger.info("%s: classifier replaced by a fresh one for %d classes", source, model.num_classes)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replaces the BatchNorms of ``model`` (the decode head's) by SyncBatchNorm, as the release trains them.

    Call it under DistributedDataParallel on GPUs, before wrapping the model; the backbone's norms
    (GroupNorm, LayerNorm) are per-sample and stay as they are. Tensor names do not change, so
    checkpoints load either way.

    Raises:
        ValueError: if the model is on the CPU: PyTorch's SyncBatchNorm only runs on GPUs (under CPU
            DDP each process keeps normalising its own batch with BatchNorm).
    """
    device = next(model.parameters()).device
    if device.type == "cpu":
        raise ValueError("SyncBatchNorm runs on GPUs only; move the model to its GPU first "
                         "(under CPU DDP keep BatchNorm)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
