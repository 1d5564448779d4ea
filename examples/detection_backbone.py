"""A MetaFormer as the backbone of a detector: stage features, torchvision's FPN and Faster R-CNN.

``metaformer.create(name, features_only=True)`` returns a backbone whose forward gives the map of
each stage in ``out_indices`` (strides 4, 8, 16, 32), each through its own norm as in the release's
detection and segmentation code; ``model.feature_info`` tells their channels and strides. This
script wraps it with ``torchvision.ops.FeaturePyramidNetwork`` into the ``backbone`` torchvision's
detectors take (a module returning an ordered dict of maps, with an ``out_channels`` attribute), builds
a Faster R-CNN on it, and runs one training step (forward, losses, backward) and one inference pass
on random images with synthetic boxes. With ``--pretrained`` the backbone starts from the ImageNet
weights (the four feature norms start fresh: classification checkpoints do not have them).

The same wrapper serves segmentation: feed the FPN maps to a segmentation head (e.g. torchvision's
``FCNHead`` on the stride-4 map, or a Semantic-FPN head).

Run::

    python examples/detection_backbone.py
    python examples/detection_backbone.py --model convformer_s18 --image-size 512
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import metaformer


class MetaFormerFPN(nn.Module):
    """A MetaFormer backbone followed by a feature pyramid, in the form torchvision's detectors take.

    Args:
        name: A registered model name (see ``metaformer.list_models()``).
        out_channels: Channels of every pyramid level.
        pretrained: Load the released ImageNet weights into the backbone.
        **overrides: Further ``metaformer.create`` arguments (``drop_path_rate``, ``token_mixer``...).

    The forward returns an ordered dict ``{"0": stride 4, "1": stride 8, "2": 16, "3": 32, "pool": 64}``
    of ``(B, out_channels, H, W)`` maps, the names Faster R-CNN's default heads expect.
    """

    def __init__(self, name: str = "poolformer_s12", out_channels: int = 256, pretrained: bool = False,
                 **overrides):
        super().__init__()
        self.body = metaformer.create(name, pretrained=pretrained, features_only=True, **overrides)
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(images)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def synthetic_targets(batch: int, image_size: int, num_classes: int, generator: torch.Generator):
    """Random boxes (1 to 3 per image, at least 16 px wide) with random labels in ``1..num_classes-1``."""
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 4, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * (image_size * 0.6)
        wh = 16 + torch.rand(n, 2, generator=generator) * (image_size * 0.4 - 16)
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(1, num_classes, (n,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
    return targets


def main(argv=None) -> dict[str, float]:
    """Builds the detector, runs one training step and one inference pass; returns the losses."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="poolformer_s12")
    parser.add_argument("--pretrained", action="store_true", help="ImageNet weights for the backbone")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=5, help="object classes, background included")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    backbone = MetaFormerFPN(args.model, pretrained=args.pretrained)
    info = backbone.body.feature_info
    print(f"{args.model} backbone: channels {info.channels()}, strides {info.reduction()}")
    # min/max size: the detector's own resize; keep it at the image size for a quick CPU run.
    detector = FasterRCNN(backbone, num_classes=args.num_classes, min_size=args.image_size,
                          max_size=args.image_size)

    images = [torch.rand(3, args.image_size, args.image_size, generator=generator) for _ in range(args.batch_size)]
    targets = synthetic_targets(args.batch_size, args.image_size, args.num_classes, generator)

    with torch.no_grad():
        pyramid = backbone(torch.stack(images))
    print("pyramid:", ", ".join(f"{k}: {tuple(v.shape)}" for k, v in pyramid.items()))

    detector.train()
    start = time.perf_counter()
    losses = detector(images, targets)
    total = sum(losses.values())
    total.backward()
    grad = backbone.body.stem.conv.weight.grad
    assert grad is not None and torch.isfinite(grad).all(), "no finite gradient reached the backbone"
    print(f"train step ({time.perf_counter() - start:.1f}s): " + ", ".join(f"{k} {v.item():.3f}"
                                                                       for k, v in losses.items()))

    detector.eval()
    with torch.no_grad():
        detections = detector(images)
    print("inference: " + ", ".join(f"image {i}: {len(d['boxes'])} boxes" for i, d in enumerate(detections)))
    return {k: v.item() for k, v in losses.items()}


if __name__ == "__main__":
    main()
