"""One training epoch and one evaluation pass, on one process or as one rank of a torchrun launch."""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from .distributed import Distributed
from .state import TrainState

__all__ = ["LoopSettings", "EpochResult", "NonFiniteLossError", "autocast", "train_one_epoch", "evaluate"]


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; the message says at which epoch and step."""


@dataclass
class LoopSettings:
    """How the batches of an epoch are run.

    Attributes:
        device: Where the model and the batches live.
        epochs: Total number of epochs (shown in the progress bar).
        grad_accum_steps: Batches accumulated per optimizer update.
        clip_grad: Gradient clipping threshold, or None for no clipping.
        clip_mode: timm's clipping mode: ``"norm"``, ``"value"`` or ``"agc"``.
        amp: Run forward passes under ``torch.autocast``.
        amp_dtype: ``"bfloat16"`` or ``"float16"`` (the latter with the state's GradScaler).
        channels_last: Feed the model channels_last batches.
        sched_on_updates: Step the scheduler after every update instead of every epoch.
        progress: Show a progress bar (on a terminal only).
        desc: Label of the progress bar (default: ``epoch E/EPOCHS``).
    """

    device: torch.device
    epochs: int
    grad_accum_steps: int = 1
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    amp: bool = False
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    sched_on_updates: bool = False
    progress: bool = True
    desc: Optional[str] = None


@dataclass
class EpochResult:
    """What an epoch of training measured, summed over every rank.

    Attributes:
        loss: Mean training loss per image.
        images: Number of training images seen.
    """

    loss: float
    images: int


def autocast(device: torch.device, enabled: bool, dtype: str = "bfloat16"):
    """``torch.autocast`` for the device when ``enabled``, else a no-op context."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def _bar(iterable, desc: str, progress: bool):
    from tqdm import tqdm

    # disable=None: a bar on a terminal only, not in log files
    return tqdm(iterable, desc=desc, unit="batch", disable=None if progress else True, file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0, leave=False)


def train_one_epoch(state: TrainState, loader, settings: LoopSettings, loss_fn: Callable, *,
                    mixup: Optional[Callable] = None, forward: Optional[nn.Module] = None,
                    dist: Optional[Distributed] = None) -> EpochResult:
    """Trains ``state.model`` for one pass over ``loader`` and advances the state's update counter.

    Each batch is moved to the device, mixed (``mixup``), run under autocast when asked, and its loss
    back-propagated (scaled by the state's GradScaler, if any); every ``grad_accum_steps`` batches the
    gradients are clipped, the optimizer steps, the EMA is updated and, with ``sched_on_updates``, the
    scheduler steps. The epoch counter is left to the caller.

    Args:
        state: The model, optimizer, scheduler, scaler and EMA; ``num_updates`` is advanced.
        loader: Batches of ``(images, targets)``.
        settings: How to run the batches.
        loss_fn: ``loss_fn(output, target)``.
        mixup: timm's ``Mixup`` (or any ``(images, target) -> (images, target)``), or None.
        forward: The module to run (the DistributedDataParallel wrapper of ``state.model``); default
            ``state.model``.
        dist: The process group; the loss is summed over its ranks.

    Returns:
        The mean loss and the number of images, over all ranks.

    Raises:
        NonFiniteLossError: when the loss becomes NaN or infinite.
    """
    from timm.utils import dispatch_clip_grad

    model, optimizer, scaler = state.model, state.optimizer, state.scaler
    forward = forward if forward is not None else model
    distributed = dist is not None and dist.enabled
    accum = settings.grad_accum_steps
    epoch = state.epoch + 1
    total = len(loader)
    loss_sum, count = 0.0, 0
    forward.train()
    optimizer.zero_grad(set_to_none=True)
    bar = _bar(loader, settings.desc or f"epoch {epoch}/{settings.epochs}", settings.progress)
    for i, (images, target) in enumerate(bar):
        images = images.to(settings.device, non_blocking=True)
        target = target.to(settings.device, non_blocking=True)
        if mixup is not None:
            images, target = mixup(images, target)
        if settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        last_micro = (i + 1) % accum == 0 or i + 1 == total
        ctx = forward.no_sync() if distributed and not last_micro else nullcontext()
        with ctx:
            with autocast(settings.device, settings.amp, settings.amp_dtype):
                loss = loss_fn(forward(images), target)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"the loss is {loss.item()} at epoch {epoch}, step {i + 1}; lower --lr "
                                         f"or use --clip-grad")
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.item() * images.shape[0]
        count += images.shape[0]
        if last_micro:
            _update(state, settings, dispatch_clip_grad)
        if settings.progress:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
    if dist is not None:
        loss_sum, count = dist.all_reduce_sum([loss_sum, float(count)])
    return EpochResult(loss=loss_sum / max(count, 1), images=int(count))


def _update(state: TrainState, settings: LoopSettings, clip) -> None:
    optimizer, scaler = state.optimizer, state.scaler
    if scaler is not None:
        if settings.clip_grad is not None:
            scaler.unscale_(optimizer)
            clip(state.model.parameters(), settings.clip_grad, mode=settings.clip_mode)
        scaler.step(optimizer)
        scaler.update()
    else:
        if settings.clip_grad is not None:
            clip(state.model.parameters(), settings.clip_grad, mode=settings.clip_mode)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.num_updates += 1
    if state.ema is not None:
        state.ema.update(state.model, step=state.num_updates)
    if state.scheduler is not None and settings.sched_on_updates:
        state.scheduler.step_update(num_updates=state.num_updates)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, amp: bool = False, amp_dtype: str = "bfloat16",
             channels_last: bool = False, progress: bool = True, desc: str = "validate",
             distributed: bool = False) -> Dict[str, Any]:
    """Top-1, top-5 (percent) and mean cross-entropy of ``model`` over ``loader``.

    Sums are reduced over all ranks when ``distributed`` (each rank must see a disjoint shard), so the
    result is exactly that of one process over the whole set.

    Returns:
        ``{"top1", "top5", "loss", "images", "seconds"}``.

    Raises:
        ValueError: when the loader has no images.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct1, correct5, count
    start = time.perf_counter()
    bar = _bar(loader, desc, progress)
    for images, target in bar:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp, amp_dtype):
            output = model(images)
        output = output.float()
        top = output.topk(min(5, output.shape[1]), dim=1).indices
        hits = top.eq(target[:, None])
        sums[0] += nn.functional.cross_entropy(output, target, reduction="sum").double()
        sums[1] += hits[:, :1].sum()
        sums[2] += hits.sum()
        sums[3] += target.numel()
        if progress:
            bar.set_postfix(top1=f"{100 * sums[1].item() / max(sums[3].item(), 1):.2f}", refresh=False)
    if distributed:
        torch.distributed.all_reduce(sums)
    seconds = time.perf_counter() - start
    loss, c1, c5, n = sums.tolist()
    if n == 0:
        raise ValueError("no images to evaluate")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "images": int(n), "seconds": seconds}
