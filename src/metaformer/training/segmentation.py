"""Semantic segmentation training: the release's recipe, its loss, the mIoU evaluation and the weights files.

The PoolFormer release trains Semantic FPN on ADE20K with mmsegmentation 0.19 (sail-sg/poolformer
``segmentation/configs/sem_fpn/PoolFormer/fpn_poolformer_*_ade20k_40k.py``): AdamW with lr 2e-4 and weight
decay 1e-4 on every parameter (no parameter-wise settings), a poly schedule ``lr = (2e-4 - 0) x (1 -
iter / 40000) ** 0.9`` stepped every iteration (``min_lr`` 0, no warm-up, no gradient clipping), 40k
iterations of 4 images on each of 8 GPUs, evaluation and checkpoints every 4k iterations, the ADE20K
pipeline of :mod:`metaformer.seg_data` (512x512 crops) and mmsegmentation's ``CrossEntropyLoss``, which
in 0.19 averages over every pixel of the batch, ignored ones included (``avg_non_ignore`` came in 0.23).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..zoo import IMAGENET_MEAN, IMAGENET_STD
from .checkpoint import LoadedModel, is_training_checkpoint
from .loop import _bar, autocast

__all__ = ["SegRecipe", "SegmentationLoss", "evaluate_segmentation", "load_segmenter_file", "SEGMENTATION_TASK",
           "SEG_CSV_FIELDS"]

SEGMENTATION_TASK = "segmentation"
SEG_CSV_FIELDS = ["iter", "train_loss", "mIoU", "aAcc", "mAcc", "lr", "time"]


@dataclass
class SegRecipe:
    """The release's Semantic FPN recipe (ADE20K, 40k iterations), field by field.

    Attributes:
        lr: AdamW learning rate (not scaled with the batch: the release's is for 8 x 4 images).
        weight_decay: AdamW weight decay, on every parameter.
        power: Power of the poly schedule.
        min_lr: Learning rate the poly schedule ends at.
        iters: Training iterations (optimizer updates).
        eval_interval: Iterations between evaluations and checkpoints.
        batch_size: Images per process and iteration.
        crop_size: Side of the square training crop.
        scale: (long side, short side) the images are resized to fit (training, before the random ratio;
            evaluation).
        ratio_range: Range of the random resize ratio of training.
        cat_max_ratio: Most one class may cover of a training crop's labelled pixels.
        flip_prob: Horizontal flip probability.
        photometric: mmsegmentation's photometric distortion in training.
        size_divisor: Evaluation images are resized to multiples of it.
        ignore_index: Mask label of pixels left out of the loss and the metrics.
        reduce_zero_label: Label 0 is "other" and ignored, 1..K become 0..K-1 (ADE20K's masks).
        mean: Normalisation mean, in [0, 1] units.
        std: Normalisation std, in [0, 1] units.
    """

    lr: float = 2e-4
    weight_decay: float = 1e-4
    power: float = 0.9
    min_lr: float = 0.0
    iters: int = 40000
    eval_interval: int = 4000
    batch_size: int = 4
    crop_size: int = 512
    scale: Tuple[int, int] = (2048, 512)
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    size_divisor: int = 32
    ignore_index: int = 255
    reduce_zero_label: bool = False
    mean: Tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: Tuple[float, float, float] = field(default=IMAGENET_STD)

    @classmethod
    def from_namespace(cls, namespace: Any) -> SegRecipe:
        """A recipe from any object with attributes of the same names (parsed ``train-seg`` options);
        attributes that are missing or None keep the defaults."""
        values = {f.name: getattr(namespace, f.name, None) for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None})

    def create_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """``torch.optim.AdamW`` over every parameter (mmcv's default optimizer constructor)."""
        return torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def create_scheduler(self, optimizer: torch.optim.Optimizer, iters: Optional[int] = None):
        """timm's ``PolyLRScheduler`` stepped every iteration: ``min_lr + (lr - min_lr) (1 - i / iters) ** power``
        at iteration ``i`` (0-based), mmcv's ``PolyLrUpdaterHook``."""
        from timm.scheduler import PolyLRScheduler

        return PolyLRScheduler(optimizer, t_initial=iters or self.iters, power=self.power, lr_min=self.min_lr,
                               t_in_epochs=False)

    def learning_rate_at(self, iteration: int) -> float:
        """The learning rate of iteration ``iteration`` (0-based) under the poly schedule."""
        progress = min(max(iteration, 0), self.iters) / self.iters
        return self.min_lr + (self.lr - self.min_lr) * (1 - progress) ** self.power

    def train_transform(self):
        """The training transform (:class:`metaformer.seg_data.SegTrainTransform`) of the recipe."""
        from ..seg_data import SegTrainTransform

        return SegTrainTransform(self.crop_size, tuple(self.scale), tuple(self.ratio_range), self.cat_max_ratio,
                                 self.flip_prob, self.photometric, self.mean, self.std, self.ignore_index)

    def eval_transform(self):
        """The evaluation transform (:class:`metaformer.seg_data.SegEvalTransform`) of the recipe."""
        from ..seg_data import SegEvalTransform

        return SegEvalTransform(tuple(self.scale), self.size_divisor, self.mean, self.std)

    def data_config(self) -> Dict[str, Any]:
        """What evaluation needs to know of the data, as stored in a ``train-seg`` checkpoint."""
        return {"scale": list(self.scale), "size_divisor": self.size_divisor, "mean": list(self.mean),
                "std": list(self.std), "ignore_index": self.ignore_index, "reduce_zero_label": self.reduce_zero_label,
                "crop_size": self.crop_size}


class SegmentationLoss(nn.Module):
    """mmsegmentation 0.19's ``CrossEntropyLoss``: per-pixel cross-entropy (in float32), zero at ignored
    pixels, averaged over every pixel of the batch.

    Args:
        num_classes: Number of classes; labels must be ``0..num_classes-1`` or ``ignore_index``.
        ignore_index: Label of ignored pixels.

    Raises:
        ValueError: (when called) for a mask label that is neither a class nor ``ignore_index``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bad = (mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            label = int(mask[bad][0].item())
            raise ValueError(f"a mask holds label {label}, outside the {self.num_classes} classes 0..{self.num_classes - 1} "
                             f"(and not the ignored label {self.ignore_index}): pass the right --num-classes, or "
                             f"--reduce-zero-label for masks where 0 means 'other' (ADE20K)")
        per_pixel = F.cross_entropy(logits.float(), mask, ignore_index=self.ignore_index, reduction="none")
        return per_pixel.mean()


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader, device: torch.device, num_classes: int, *,
                          ignore_index: int = 255, amp: bool = False, amp_dtype: str = "bfloat16",
                          channels_last: bool = False, progress: bool = True, desc: str = "validate",
                          distributed: bool = False) -> Dict[str, Any]:
    """mIoU, pixel accuracy and mean class accuracy (percent) of a segmenter, as mmsegmentation computes them.

    Each batch's logits are resized (bilinear) to its masks' size before the argmax, so the metrics are
    those of the original masks; one confusion matrix (:class:`metaformer.seg_metrics.SegmentationMetrics`)
    is summed over all ranks when ``distributed`` (each rank must see a disjoint shard).

    Args:
        model: The segmenter (logits at the input's size).
        loader: Batches of ``(images, masks)``; at batch size 1 the images may differ in size.
        device: Where to run.
        num_classes: Number of classes.
        ignore_index: Mask label left out.
        amp: Run under autocast.
        amp_dtype: Autocast dtype.
        channels_last: Feed channels_last batches.
        progress: Show a progress bar (terminal only) with the running mIoU.
        desc: Label of the progress bar.
        distributed: Sum the confusion matrices over the ranks of ``torch.distributed``.

    Returns:
        ``{"mIoU", "aAcc", "mAcc"}`` in percent, ``"IoU"`` (per class, percent, NaN where undefined),
        ``"images"`` and ``"seconds"``.

    Raises:
        ValueError: when the loader has no images, or a mask holds a label outside the classes.
    """
    from ..seg_metrics import SegmentationMetrics

    model.eval()
    metrics = SegmentationMetrics(num_classes, ignore_index)
    align_corners = bool(getattr(model, "align_corners", False))
    images_seen, start = 0, time.perf_counter()
    bar = _bar(loader, desc, progress)
    for images, masks in bar:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp, amp_dtype):
            logits = model(images)
        logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=align_corners)
        metrics.update(logits.argmax(1).cpu(), masks)
        images_seen += images.shape[0]
        if progress:
            bar.set_postfix(mIoU=f"{100 * metrics.compute()['mIoU']:.2f}", refresh=False)
    if distributed:
        metrics.all_reduce()
        images_seen = int(_sum_over_ranks(images_seen))
    if images_seen == 0:
        raise ValueError("no images to evaluate")
    result = metrics.compute()
    return {"mIoU": 100 * result["mIoU"], "aAcc": 100 * result["aAcc"], "mAcc": 100 * result["mAcc"],
            "IoU": [100 * v for v in result["IoU"]], "images": images_seen,
            "seconds": time.perf_counter() - start}


def _sum_over_ranks(value: float) -> float:
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def load_segmenter_file(path: Union[str, os.PathLike], name: Optional[str] = None, *,
                        num_classes: Optional[int] = None, model_kwargs: Optional[Dict[str, Any]] = None
                        ) -> LoadedModel:
    """Builds the Semantic FPN of a weights file, reading the file once.

    A ``metaformer train-seg`` checkpoint brings its backbone name, build arguments, number of classes
    and evaluation preprocessing (``LoadedModel.data_config``). Any other file is a whole segmenter's
    state dict: the release's mmsegmentation checkpoints (``state_dict`` with ``backbone.*``, ``neck.*``,
    ``decode_head.*``) or one saved from :func:`metaformer.create_segmenter`, built on ``name`` and loaded
    strictly (see :func:`metaformer.load_segmenter_checkpoint`).

    Args:
        path: The file.
        name: Backbone name; optional for a ``train-seg`` checkpoint (which must then agree with it).
        num_classes: Number of classes (default: that of the file).
        model_kwargs: Arguments of :func:`metaformer.create_segmenter` (``fpn_channels``, backbone overrides).

    Returns:
        The segmenter in eval mode on the CPU, with the file's metadata.

    Raises:
        FileNotFoundError / metaformer.CheckpointError: for a missing, unreadable or unfitting file, or a
            classification checkpoint.
        ValueError: for a model name or number of classes that does not match the file.
    """
    from ..segmentation import create_segmenter, load_segmenter_checkpoint
    from ..weights import CheckpointError, load_torch_file, read_checkpoint, unwrap_state_dict

    path = os.fspath(path)
    kwargs = dict(model_kwargs or {})
    obj = read_checkpoint(path) if path.endswith(".safetensors") else load_torch_file(path)
    if is_training_checkpoint(obj):
        if obj.get("task", "classification") != SEGMENTATION_TASK:
            raise CheckpointError(f"{path} is a classification checkpoint (written by `metaformer train`), not a "
                                  f"segmenter; use `metaformer validate` for it")
        stored = obj["model_name"]
        if name and name.partition(".")[0] != stored.partition(".")[0]:
            raise CheckpointError(f"{path} was trained on {stored}, not {name}; pass --model {stored} (or leave "
                                  f"the model name out: the checkpoint names it)")
        if num_classes is not None and num_classes != obj["num_classes"]:
            raise ValueError(f"{num_classes} classes asked for, but {path} has {obj['num_classes']} classes")
        model = create_segmenter(stored.partition(".")[0], obj["num_classes"],
                                 **{**(obj.get("model_kwargs") or {}), **kwargs})
        load_segmenter_checkpoint(model, obj["model"], source=f"checkpoint {path}")
        weights = f"{path} (iteration {obj.get('num_updates')})"
        return LoadedModel(model.eval(), stored, weights, obj.get("class_names") or None, obj.get("data_config"),
                           checkpoint=obj)
    if not name:
        raise ValueError(f"the backbone name is required (--model): {path} is a plain state dict that does not "
                         f"name its model")
    state = obj if path.endswith(".safetensors") else unwrap_state_dict(obj, path)
    classes = state.get("decode_head.conv_seg.weight")
    if classes is None:
        raise CheckpointError(f"{path} holds no Semantic FPN (no decode_head.conv_seg.weight); it may be a backbone "
                              f"or classifier checkpoint: segmenters start from those with --pretrained")
    model = create_segmenter(name.partition(".")[0], num_classes or int(classes.shape[0]), **kwargs)
    load_segmenter_checkpoint(model, state, replace_classifier=num_classes not in (None, int(classes.shape[0])),
                              source=f"checkpoint {path}")
    return LoadedModel(model.eval(), name, path)

