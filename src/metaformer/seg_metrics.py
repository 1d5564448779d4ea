"""Semantic segmentation metrics as mmsegmentation reports them: mIoU, pixel accuracy, mean class accuracy.

One confusion matrix over every evaluated pixel whose label is not ``ignore_index`` (mmsegmentation's
``eval_metrics`` with ``mIoU``): per class ``IoU = TP / (TP + FP + FN)`` and ``Acc = TP / (TP + FN)``,
undefined (NaN) for a class that appears in neither labels nor predictions (resp. labels); ``mIoU`` and
``mAcc`` are the means over the defined classes; ``aAcc`` (pixel accuracy) is ``sum(TP) / labelled pixels``.
"""

from __future__ import annotations

import math
from typing import Dict

import torch

__all__ = ["SegmentationMetrics"]


class SegmentationMetrics:
    """Accumulates a confusion matrix over batches and reports mIoU, pixel accuracy and mean accuracy.

    Args:
        num_classes: Number of classes K; labels are ``0..K-1`` or ``ignore_index``.
        ignore_index: Label of pixels left out (the release: 255).

    Example:
        >>> metrics = SegmentationMetrics(150)
        >>> metrics.update(logits.argmax(1), masks)
        >>> metrics.compute()["mIoU"]
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Forgets every pixel seen so far."""
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds a batch: ``pred`` class indices (B, H, W) or logits (B, K, H, W); ``target`` labels (B, H, W).

        Raises:
            ValueError: for mismatched shapes, or labels / predictions outside ``0..K-1`` (labels may also be
                ``ignore_index``).
        """
        if pred.dim() == target.dim() + 1 and pred.shape[1] == self.num_classes:
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape "
                             f"(or pred be logits (B, {self.num_classes}, H, W)); resize the logits to the "
                             f"mask's size before taking the argmax")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError(f"pred and target must hold class indices (integers), got {pred.dtype} and "
                             f"{target.dtype}")
        target, pred = target.reshape(-1).long(), pred.reshape(-1).long()
        keep = target != self.ignore_index
        target, pred = target[keep], pred[keep]
        k = self.num_classes
        for what, t in (("label", target), ("prediction", pred)):
            bad = t[(t < 0) | (t >= k)]
            if bad.numel():
                raise ValueError(f"{what} {bad[0].item()} is outside 0..{k - 1}"
                                 + (f" and is not ignore_index {self.ignore_index}" if what == "label" else "")
                                 + "; check num_classes and the masks")
        counts = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)
        self.confusion += counts.to(self.confusion.device)

    def all_reduce(self) -> None:
        """Sums the confusion matrices of every process (under ``torch.distributed``; no-op otherwise)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
                else torch.device("cpu")
            total = self.confusion.to(device)
            dist.all_reduce(total)
            self.confusion = total.cpu()

    def compute(self) -> Dict[str, object]:
        """The metrics of every pixel seen, as fractions in [0, 1].

        Returns:
            ``{"mIoU", "aAcc", "mAcc"}`` floats (NaN before any labelled pixel) and per-class lists
            ``"IoU"``, ``"Acc"`` (NaN where undefined).
        """
        cm = self.confusion.double()
        tp = cm.diag()
        labelled, predicted = cm.sum(1), cm.sum(0)
        union = labelled + predicted - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        acc = torch.where(labelled > 0, tp / labelled.clamp(min=1), torch.full_like(tp, math.nan))
        total = labelled.sum().item()
        return {"mIoU": _nanmean(iou), "aAcc": tp.sum().item() / total if total else math.nan,
                "mAcc": _nanmean(acc), "IoU": iou.tolist(), "Acc": acc.tolist()}


def _nanmean(values: torch.Tensor) -> float:
    defined = values[~values.isnan()]
    return defined.mean().item() if defined.numel() else math.nan

