"""The training recipe of the PoolFormer release, built from timm's factories.

The defaults of :class:`Recipe` are the release's ImageNet recipe (Yu et al., "MetaFormer Is Actually
What You Need for Vision", CVPR 2022, appendix; sail-sg/poolformer ``distributed_train.sh`` and
``train.py``, which is timm's): AdamW, lr 1e-3 x batch / 1024, weight decay 0.05, a cosine schedule
with 5 warm-up epochs from 1e-6 down to 1e-5, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing
0.25, mixup 0.8, cutmix 1.0, label smoothing 0.1, random-resized-crop scale (0.08, 1), horizontal flip
0.5, color jitter 0.4 and random interpolation. Field names are those of timm's ``train.py`` flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

__all__ = ["Recipe", "safe_posterize", "fix_posterize"]

_POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")


@dataclass
class Recipe:
    """Optimizer, schedule, augmentation and regularisation settings, with the release's defaults.

    Attributes:
        opt: timm optimizer name.
        opt_eps: Optimizer epsilon (None: the optimizer's default).
        opt_betas: Optimizer betas (None: the optimizer's default).
        momentum: SGD momentum.
        weight_decay: Weight decay (timm leaves norms, biases and scales undecayed).
        lr: Learning rate; None derives it as ``lr_base * global_batch / lr_base_size``.
        lr_base: Learning rate at ``lr_base_size``.
        lr_base_size: Global batch of ``lr_base``.
        sched: timm scheduler (``cosine``, ``step``, ``multistep``, ``plateau``, ``tanh``, ``poly``) or
            ``none``.
        sched_on_updates: Step the schedule every update instead of every epoch.
        epochs: Length of the schedule.
        warmup_epochs: Linear warm-up epochs.
        warmup_lr: Learning rate at the start of the warm-up.
        min_lr: Floor of the schedule.
        cooldown_epochs: Epochs at ``min_lr`` after the schedule.
        decay_epochs: Period of the step schedule.
        decay_milestones: Epochs of the multistep schedule.
        decay_rate: Decay factor of the step schedules.
        aa: Auto-augment policy (timm's string), or ``"none"``.
        reprob: Random erasing probability.
        remode: Random erasing mode.
        recount: Random erasing count.
        scale: Random-resized-crop area range.
        ratio: Random-resized-crop aspect ratio range.
        hflip: Horizontal flip probability.
        vflip: Vertical flip probability.
        color_jitter: Color jitter strength.
        train_interpolation: Training resize interpolation (``random`` picks one per image).
        mixup: Mixup alpha (0 disables).
        cutmix: Cutmix alpha (0 disables).
        mixup_prob: Probability of mixup or cutmix per batch.
        mixup_switch_prob: Probability of cutmix when both are on.
        mixup_mode: ``batch``, ``pair`` or ``elem``.
        smoothing: Label smoothing.
        model_ema: Keep an EMA of the weights.
        model_ema_decay: Its decay.
    """

    opt: str = "adamw"
    opt_eps: Optional[float] = None
    opt_betas: Optional[List[float]] = None
    momentum: float = 0.9
    weight_decay: float = 0.05
    lr: Optional[float] = None
    lr_base: float = 1e-3
    lr_base_size: int = 1024
    sched: str = "cosine"
    sched_on_updates: bool = False
    epochs: int = 300
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: int = 0
    decay_epochs: float = 90
    decay_milestones: List[int] = field(default_factory=lambda: [90, 180, 270])
    decay_rate: float = 0.1
    aa: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.4
    train_interpolation: str = "random"
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    model_ema: bool = False
    model_ema_decay: float = 0.9998

    @classmethod
    def from_namespace(cls, namespace: Any) -> Recipe:
        """A recipe from any object with attributes of the same names (parsed ``metaformer train`` options)."""
        from dataclasses import fields

        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)})

    def learning_rate(self, global_batch: int) -> float:
        """``lr``, or ``lr_base x global_batch / lr_base_size`` when ``lr`` is None."""
        return self.lr if self.lr is not None else self.lr_base * global_batch / self.lr_base_size

    def create_optimizer(self, model: nn.Module, global_batch: int):
        """timm's ``create_optimizer_v2`` for the model at :meth:`learning_rate`."""
        from timm.optim import create_optimizer_v2

        kwargs: Dict[str, Any] = {}
        if self.opt_eps is not None:
            kwargs["eps"] = self.opt_eps
        if self.opt_betas:
            kwargs["betas"] = tuple(self.opt_betas)
        return create_optimizer_v2(model, opt=self.opt, lr=self.learning_rate(global_batch),
                                   weight_decay=self.weight_decay, momentum=self.momentum, **kwargs)

    def create_scheduler(self, optimizer, updates_per_epoch: int, *, lower_is_better: bool = False,
                         epochs: Optional[int] = None):
        """timm's ``create_scheduler_v2`` for ``epochs`` (default: the recipe's), or None for ``sched="none"``.

        Args:
            optimizer: The optimizer whose learning rate it sets.
            updates_per_epoch: Optimizer updates per epoch.
            lower_is_better: For ``plateau``: whether the watched metric improves downwards (a loss).
            epochs: Length of the schedule (default: ``self.epochs``).
        """
        if self.sched == "none":
            return None
        from timm.scheduler import create_scheduler_v2

        scheduler, _ = create_scheduler_v2(
            optimizer, sched=self.sched, num_epochs=self.epochs if epochs is None else epochs,
            decay_epochs=self.decay_epochs, decay_milestones=self.decay_milestones,
            cooldown_epochs=self.cooldown_epochs, decay_rate=self.decay_rate, min_lr=self.min_lr,
            warmup_lr=self.warmup_lr, warmup_epochs=self.warmup_epochs,
            plateau_mode="min" if lower_is_better else "max", step_on_epochs=not self.sched_on_updates,
            updates_per_epoch=updates_per_epoch)
        return scheduler

    def learning_rates(self, global_batch: int, updates_per_epoch: int, epochs: List[int]) -> List[float]:
        """The learning rate at the start of each of ``epochs`` (1-based) under this recipe's schedule.

        The values come from timm's scheduler itself, run on a throwaway optimizer.
        """
        import torch

        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.learning_rate(global_batch))
        scheduler = self.create_scheduler(optimizer, updates_per_epoch)
        out = []
        for epoch in epochs:
            if scheduler is not None:
                if self.sched_on_updates:
                    scheduler.step_update(num_updates=(epoch - 1) * updates_per_epoch)
                else:
                    scheduler.step(epoch - 1)
            out.append(optimizer.param_groups[0]["lr"])
        return out

    def describe_schedule(self, global_batch: int, updates_per_epoch: int) -> str:
        """One line saying how the learning rate moves: at the first epoch, after the warm-up, at the last."""
        if self.sched == "none":
            return f"constant lr {self.learning_rate(global_batch):.3g} for {self.epochs} epochs (no schedule)"
        marks = [1]
        if 0 < self.warmup_epochs < self.epochs:
            marks.append(self.warmup_epochs + 1)
        if self.epochs not in marks:
            marks.append(self.epochs)
        lrs = self.learning_rates(global_batch, updates_per_epoch, marks)
        parts = [f"{lr:.3g} at epoch {e}" + (f" (after {self.warmup_epochs} warm-up epochs)"
                                             if e == self.warmup_epochs + 1 and e > 1 else "")
                 for e, lr in zip(marks, lrs)]
        return f"{self.sched} schedule over {self.epochs} epochs: lr {' -> '.join(parts)}"

    def warmup_warning(self, global_batch: int, updates_per_epoch: int) -> Optional[str]:
        """A warning when the warm-up lasts the whole run (the lr never reaches its peak), else None."""
        if self.sched == "none" or self.warmup_epochs < self.epochs or self.warmup_epochs == 0:
            return None
        last = self.learning_rates(global_batch, updates_per_epoch, [self.epochs])[0]
        return (f"the {self.warmup_epochs}-epoch warm-up is as long as the {self.epochs}-epoch run: the lr only "
                f"climbs from {self.warmup_lr:.3g} to {last:.3g} and never reaches {self.learning_rate(global_batch):.3g}; "
                f"for a short run pass --warmup-epochs 0 or 1")

    def create_mixup(self, num_classes: int, batch_size: int):
        """timm's ``Mixup`` (with the label smoothing), or None when mixup and cutmix are off.

        Raises:
            ValueError: for an odd batch size, which mixup cannot pair.
        """
        if not (self.mixup > 0 or self.cutmix > 0):
            return None
        if batch_size % 2:
            raise ValueError("mixup/cutmix need an even --batch-size (or pass --mixup 0 --cutmix 0)")
        from timm.data import Mixup

        return Mixup(mixup_alpha=self.mixup, cutmix_alpha=self.cutmix, prob=self.mixup_prob,
                     switch_prob=self.mixup_switch_prob, mode=self.mixup_mode, label_smoothing=self.smoothing,
                     num_classes=num_classes)

    def create_loss(self) -> nn.Module:
        """The training loss: soft-target cross-entropy with mixup, else label smoothing, else cross-entropy."""
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        if self.mixup > 0 or self.cutmix > 0:
            return SoftTargetCrossEntropy()
        if self.smoothing > 0:
            return LabelSmoothingCrossEntropy(smoothing=self.smoothing)
        return nn.CrossEntropyLoss()

    def create_ema(self, model: nn.Module):
        """timm's ``ModelEmaV3`` of the model, or None when ``model_ema`` is off."""
        if not self.model_ema:
            return None
        from timm.utils import ModelEmaV3

        return ModelEmaV3(model, decay=self.model_ema_decay)

    def train_transform(self, data_config: Dict[str, Any]):
        """timm's training transform for the input size, mean and std of a data config.

        RandAugment's posterize operations are given :func:`safe_posterize` (see :func:`fix_posterize`).
        """
        from timm.data import create_transform

        aa = None if str(self.aa).lower() in ("none", "", "false", "0") else self.aa
        transform = create_transform(
            data_config["input_size"], is_training=True, scale=tuple(self.scale), ratio=tuple(self.ratio),
            hflip=self.hflip, vflip=self.vflip, color_jitter=self.color_jitter, auto_augment=aa,
            interpolation=self.train_interpolation, mean=data_config["mean"], std=data_config["std"],
            re_prob=self.reprob, re_mode=self.remode, re_count=self.recount)
        return fix_posterize(transform) if aa else transform


def safe_posterize(img, bits_to_keep, **__):
    """timm's posterize, except that 0 bits gives a black image (as Pillow < 11 did) instead of raising."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def fix_posterize(transform):
    """Gives every posterize operation inside a timm transform :func:`safe_posterize`; returns ``transform``.

    RandAugment's ``inc1`` PosterizeIncreasing keeps ``4 - int(magnitude / 10 * 4)`` bits: 0 at magnitude
    10, which ``rand-m9-mstd0.5`` draws a few percent of the time. Pillow 11 rejects 0 bits (ValueError)
    where older versions returned a black image, so training would stop at a random step. Each timm
    ``AugmentOp`` holds its function as ``aug_fn`` (looked up once, when it is built), so this changes
    only the operations of this transform; timm's global table ``NAME_TO_OP`` is left alone.
    """
    from timm.data.auto_augment import AugmentOp

    seen = set()

    def visit(obj) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, AugmentOp):
            if obj.name in _POSTERIZE_OPS:
                obj.aug_fn = safe_posterize
            return
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item)
            return
        for attr in ("transforms", "ops", "policy"):  # Compose, RandAugment/AugMix, AutoAugment
            if hasattr(obj, attr):
                visit(getattr(obj, attr))

    visit(transform)
    return transform
