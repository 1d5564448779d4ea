"""`TrainState`: everything a training run changes, saved and restored as one state dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .rng import rng_state, set_rng_state

__all__ = ["TrainState"]

_STATE_KEYS = ("model", "model_ema", "optimizer", "scheduler", "scaler", "epoch", "num_updates", "best_metric",
               "best_epoch", "history", "rng")


@dataclass
class TrainState:
    """The model, EMA, optimizer, scheduler, GradScaler, counters, best metric, history and RNG of a run.

    :meth:`state_dict` captures all of it (the RNG states of every generator of the process, see
    :mod:`metaformer.training.rng`), :meth:`load_state_dict` restores it, so that a run continued from
    a saved state computes exactly what the uninterrupted run would have.

    Attributes:
        model: The model being trained (not a DistributedDataParallel wrapper).
        optimizer: Its optimizer.
        scheduler: A timm scheduler, or None.
        scaler: A ``torch.amp.GradScaler`` (float16 autocast), or None.
        ema: A timm ``ModelEmaV3`` of the model, or None.
        epoch: Epochs completed.
        num_updates: Optimizer updates completed.
        best_metric: Best validation metric so far, or None.
        best_epoch: Epoch (1-based) of ``best_metric``, or None.
        history: One dict of metrics per completed epoch.

    Example:
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> saved = state.state_dict()
        >>> TrainState(model2, torch.optim.SGD(model2.parameters(), lr=0.1)).load_state_dict(saved)
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    scaler: Optional[Any] = None
    ema: Optional[Any] = None
    epoch: int = 0
    num_updates: int = 0
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    history: List[Dict[str, Any]] = field(default_factory=list)

    def state_dict(self, rng: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        """The whole state, as tensors and plain containers (``torch.load(weights_only=True)`` reads it).

        Args:
            rng: The RNG states of every rank, in rank order (see ``Distributed.gather``); default: this
                process's alone.

        Returns:
            ``model``, ``model_ema``, ``optimizer``, ``scheduler``, ``scaler`` (state dicts or None),
            ``epoch``, ``num_updates``, ``best_metric``, ``best_epoch``, ``history`` and ``rng`` (a list
            with one entry per rank).
        """
        return {
            "model": self.model.state_dict(),
            "model_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "num_updates": self.num_updates,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": list(self.history),
            "rng": rng if rng is not None else [rng_state()],
        }

    def load_state_dict(self, state: Dict[str, Any], *, rank: int = 0, world_size: int = 1,
                        restore_rng: bool = True, load_scheduler: bool = True) -> List[str]:
        """Restores a state saved by :meth:`state_dict`.

        Args:
            state: The saved state (a training checkpoint holds one, among other keys).
            rank: This process's rank: whose RNG state to restore.
            world_size: Number of processes now; the RNG states are restored only when the saved run
                had as many.
            restore_rng: Restore the RNG states at all (do it last, just before training continues).
            load_scheduler: Restore the scheduler's state (False: keep this state's scheduler, e.g. one
                built for another number of epochs and stepped to ``state["epoch"]`` by the caller).

        Returns:
            Notes on what could not be restored (EMA weights or RNG states missing), for the caller to
            report.
        """
        notes: List[str] = []
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and load_scheduler and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("model_ema"):
                self.ema.module.load_state_dict(state["model_ema"])
            else:
                notes.append("the checkpoint has no EMA weights; the EMA restarts from the model")
        self.epoch = int(state["epoch"])
        self.num_updates = int(state.get("num_updates", 0))
        self.best_metric, self.best_epoch = state.get("best_metric"), state.get("best_epoch")
        self.history = [dict(r) for r in state.get("history", []) if r["epoch"] <= self.epoch]
        if restore_rng:
            rng = state.get("rng")
            if rng and len(rng) == world_size:
                set_rng_state(rng[rank])
            else:
                notes.append("the run had another number of processes; RNG states are not restored")
        return notes

    def record(self, row: Dict[str, Any], metric: Optional[float], lower_is_better: bool = False) -> bool:
        """Ends an epoch: appends its metrics, advances ``epoch`` and tracks the best metric.

        Args:
            row: The epoch's metrics (``row["epoch"]`` must be ``epoch + 1``).
            metric: The value that ranks checkpoints, or None without validation.
            lower_is_better: Whether a lower metric is better (a loss).

        Returns:
            Whether this epoch is the new best.
        """
        self.history.append(row)
        self.epoch += 1
        if metric is None:
            return False
        best = self.best_metric
        if best is None or (metric < best if lower_is_better else metric > best):
            self.best_metric, self.best_epoch = metric, self.epoch
            return True
        return False
