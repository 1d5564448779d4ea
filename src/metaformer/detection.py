"""Object detection and instance segmentation: torchvision's detectors on a MetaFormer backbone and FPN.

The PoolFormer release (sail-sg/poolformer ``detection/``, mmdetection 2.19) trains RetinaNet and Mask
R-CNN on COCO with its ``features_only`` backbone and mmdetection's ``FPN`` (256 channels, 5 levels):

- RetinaNet: the last three stages (``start_level=1``; strides 8, 16, 32) and two extra levels (strides
  64, 128) from 3x3 stride-2 convolutions, the first on the last stage's normalised map
  (``add_extra_convs='on_input'``), no ReLU in between;
- Mask R-CNN (and Faster R-CNN, its box-only half): all four stages (strides 4 to 32) and a fifth level
  by stride-2 max pooling of the last output (torchvision's ``LastLevelMaxPool``).

:func:`create_detector` builds that backbone and neck (:class:`MetaFormerFPN`) under torchvision's
``RetinaNet``, ``FasterRCNN`` or ``MaskRCNN``. The heads are torchvision's (their tensors differ from
mmdetection's), so a release checkpoint gives the backbone and the FPN; the heads start fresh and a
warning says so.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Dict, Optional

import torch
from torch import nn

from .dense_weights import fit_parts, load_parts, read_state, split_by_prefix
from .fpn import FPN
from .model import MetaFormer
from .weights import CheckpointError

__all__ = ["MetaFormerFPN", "create_detector", "load_detector_checkpoint", "DETECTORS"]

logger = logging.getLogger("metaformer")
DETECTORS = ("retinanet", "faster_rcnn", "mask_rcnn")
_MMDET_HEADS = ("bbox_head.", "rpn_head.", "roi_head.", "mask_head.")


class MetaFormerFPN(nn.Module):
    """A ``features_only`` MetaFormer (``body``) and an :class:`~metaformer.fpn.FPN` (``fpn``) as a
    torchvision detection backbone: ``forward`` returns an ordered dict of maps ``"0"``, ``"1"``, ...
    (finest first), and ``out_channels`` is their channel count.

    Args:
        body: A MetaFormer built with ``features_only=True``.
        out_channels: Channels of the FPN.
        num_outs: Number of output maps.
        add_extra_convs: False (extra levels by max pooling) or ``"on_input"`` (RetinaNet).
    """

    def __init__(self, body: MetaFormer, out_channels: int = 256, num_outs: int = 5, add_extra_convs=False):
        super().__init__()
        if not getattr(body, "features_only", False):
            raise ValueError("MetaFormerFPN needs a backbone built with features_only=True")
        self.body = body
        self.fpn = FPN(body.feature_info.channels(), out_channels, num_outs, add_extra_convs)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """The FPN maps of images (B, C, H, W), finest first."""
        return OrderedDict((str(i), f) for i, f in enumerate(self.fpn(self.body(x))))


def create_detector(name: str, kind: str = "mask_rcnn", num_classes: int = 91, pretrained: bool = False,
                    checkpoint: Optional[str] = None, *, backbone_kwargs: Optional[Dict[str, Any]] = None,
                    **detector_kwargs) -> nn.Module:
    """Builds torchvision's RetinaNet, Faster R-CNN or Mask R-CNN on a MetaFormer with the release's FPN.

    Args:
        name: A model name (see :func:`metaformer.list_models`), optionally with a pretrained tag. The
            models with fixed-size parts (position embeddings, spatial MLPs, random mixing) only take
            224x224 images, which detection rarely has.
        kind: ``"retinanet"``, ``"faster_rcnn"`` or ``"mask_rcnn"``.
        num_classes: Classes as torchvision counts them (COCO: 91, background included).
        pretrained: Start the backbone from the released ImageNet weights; the per-stage norms, the FPN
            and the heads start fresh.
        checkpoint: An mmdetection checkpoint of the release (backbone and FPN load strictly, the heads
            start fresh) or a state dict of a detector built here (everything loads strictly).
        backbone_kwargs: Settings for :func:`metaformer.create` (``drop_path_rate``, ablations...).
        **detector_kwargs: Passed to the torchvision class (``min_size``, ``max_size``,
            ``box_detections_per_img``...); images are normalised with ImageNet's mean and std by default,
            as the release does.

    Returns:
        The torchvision detector, in training mode: ``model(images, targets)`` gives the losses,
        ``model.eval()(images)`` the detections.

    Raises:
        ValueError / TypeError: for a bad kind, name or argument.
        metaformer.CheckpointError: for a checkpoint that cannot be read or does not fit.

    Example:
        >>> model = metaformer.create_detector("poolformer_s12", "retinanet", num_classes=91, pretrained=True)
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet

    from .factory import create

    if kind not in DETECTORS:
        raise ValueError(f"unknown detector kind {kind!r}; expected one of {DETECTORS}")
    if pretrained and checkpoint is not None:
        raise ValueError("pass either pretrained=True (ImageNet backbone) or checkpoint=PATH (whole detector)")
    backbone_kwargs = dict(backbone_kwargs or {})
    for key in ("features_only", "out_indices"):
        if key in backbone_kwargs:
            raise TypeError(f"create_detector sets {key} of the backbone itself (the release's neck settings)")
    retina = kind == "retinanet"
    body = create(name, pretrained=pretrained, features_only=True, out_indices=(1, 2, 3) if retina else (0, 1, 2, 3),
                  **backbone_kwargs)
    backbone = MetaFormerFPN(body, 256, num_outs=5, add_extra_convs="on_input" if retina else False)
    cfg = body.pretrained_cfg
    detector_kwargs.setdefault("image_mean", list(cfg["mean"]))
    detector_kwargs.setdefault("image_std", list(cfg["std"]))
    cls = {"retinanet": RetinaNet, "faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN}[kind]
    model = cls(backbone, num_classes=num_classes, **detector_kwargs)
    model.config = dict(name=name, kind=kind, num_classes=num_classes, backbone_kwargs=backbone_kwargs,
                        detector_kwargs=detector_kwargs)
    if checkpoint is not None:
        load_detector_checkpoint(model, checkpoint)
    return model


def load_detector_checkpoint(model: nn.Module, checkpoint, source: Optional[str] = None) -> None:
    """Loads a detector checkpoint strictly: mmdetection's layout (the release's) or this library's.

    mmdetection's ``backbone.*`` (any layout :func:`metaformer.convert_state_dict` reads, with the
    per-stage norms ``norm0``...``norm6`` of the release) and ``neck.*`` load into ``model.backbone.body``
    and ``model.backbone.fpn``; its heads (``bbox_head``, ``rpn_head``, ``roi_head``) have no torchvision
    counterpart and are left out with a warning. A state dict of a model built by :func:`create_detector`
    loads whole. Nothing is loaded unless everything fits.

    Args:
        model: A detector from :func:`create_detector`.
        checkpoint: A path, or a state dict already read.
        source: How errors name the checkpoint.

    Raises:
        metaformer.CheckpointError: naming what is missing, unexpected or mis-shaped.
    """
    checkpoint, source = read_state(checkpoint, source)
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, MetaFormerFPN):
        raise TypeError("load_detector_checkpoint needs a detector built by metaformer.create_detector")
    try:
        if any(k.startswith("neck.") for k in checkpoint):  # mmdetection
            parts, rest = split_by_prefix(checkpoint, ("backbone.", "neck.") + _MMDET_HEADS)
            heads = sorted(p[:-1] for p in _MMDET_HEADS if parts[p])
            neck, _ = fit_parts([(backbone.fpn, parts["neck."], "neck.", ()), (nn.Module(), rest, "", ())])
            fits = [(backbone.fpn, neck)]
            body_state = parts["backbone."]
        else:
            parts, rest = split_by_prefix(checkpoint, ("backbone.body.",))
            fits = [(model, fit_parts([(model, rest, "", ("backbone.body.",))])[0])]
            body_state, heads = parts["backbone.body."], []
    except CheckpointError as e:
        raise CheckpointError(f"{source} does not fit the detector: {e}") from None
    load_parts(backbone.body, body_state, fits, source)
    if heads:
        logger.warning("%s: loaded the backbone and the FPN; the mmdetection heads (%s) have no torchvision "
                       "counterpart, so the detector's heads start fresh", source, ", ".join(heads))
