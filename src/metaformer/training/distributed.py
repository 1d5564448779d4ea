"""The process group of a ``torchrun`` launch, or a single process, behind one small interface."""

from __future__ import annotations

import os
from typing import Any, List, Optional

import torch

__all__ = ["Distributed"]


class Distributed:
    """The processes of a run: ``torchrun``'s ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``, or one process.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process group: NCCL with one GPU per local
    rank when CUDA is used, gloo on the CPU. Alone, every collective is the identity.

    Args:
        device: The device asked for; None takes CUDA when available, else the CPU. Under torchrun a
            CUDA device becomes ``cuda:LOCAL_RANK``.

    Attributes:
        world_size: Number of processes.
        rank: This process's rank (0 alone).
        local_rank: Its rank on this machine.
        enabled: Whether there are several processes.
        device: The device this process computes on.

    Raises:
        ValueError: when the local rank has no CUDA device.
    """

    def __init__(self, device: Optional[torch.device] = None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        if not self.enabled:
            self.device = device if device is not None else torch.device(
                "cuda" if torch.cuda.is_available() else "cpu")
            return
        import torch.distributed as dist

        use_cuda = (device.type == "cuda") if device is not None else torch.cuda.is_available()
        if use_cuda:
            if torch.cuda.device_count() <= self.local_rank:
                raise ValueError(f"local rank {self.local_rank} but only {torch.cuda.device_count()} CUDA devices")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that writes files and prints)."""
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: List[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, values: List[float]) -> List[float]:
        """Sums a list of floats over ranks."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        """Waits for every rank (nothing alone)."""
        if self.enabled:
            torch.distributed.barrier()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DistributedDataParallel under torchrun, else ``model`` itself."""
        if not self.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def close(self) -> None:
        """Leaves the process group."""
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
