"""Batches for iteration-based training: any stretch of iterations, the same indices however the run is cut.

An iteration-based run (the release's segmentation: 40k iterations, evaluated and saved every 4k) walks
through the data set epoch after epoch without caring where an epoch ends. :class:`IterationBatchSampler`
gives the batches of iterations ``start .. start + count - 1`` of that walk, computed from the iteration
numbers alone: a run resumed at iteration 8000 draws exactly the batches the uninterrupted run drew.
"""

from __future__ import annotations

from typing import Iterator, List

import torch
from torch.utils.data import Sampler

__all__ = ["IterationBatchSampler"]


class IterationBatchSampler(Sampler[List[int]]):
    """The batches of one process for a stretch of iterations of an endless, epoch-by-epoch shuffled walk.

    Each data epoch ``e`` is shuffled as ``torch.utils.data.DistributedSampler`` shuffles epoch ``e``
    (``torch.randperm`` seeded with ``seed + e``, padded to a multiple of the number of processes by
    repeating its start, process ``rank`` taking every ``world_size``-th index), then cut into batches
    with the last incomplete batch dropped. Iteration ``i`` is batch ``i % K`` of epoch ``i // K``, where
    ``K`` is the number of batches of an epoch.

    Args:
        num_samples: Size of the data set.
        batch_size: Batch size of one process.
        start: First iteration (0-based) of the stretch.
        count: Number of iterations of the stretch.
        rank: This process's rank.
        world_size: Number of processes.
        seed: Shuffling seed (the same on every process).

    Raises:
        ValueError: when one process's share of the data is smaller than a batch.
    """

    def __init__(self, num_samples: int, batch_size: int, start: int, count: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        per_rank = -(-num_samples // world_size)
        if batch_size < 1 or per_rank < batch_size:
            raise ValueError(f"{num_samples} samples over {world_size} process(es) is {per_rank} per process, less "
                             f"than one batch of {batch_size}: lower the batch size")
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got {start} and {count}")
        self.num_samples, self.batch_size, self.start, self.count = num_samples, batch_size, start, count
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batches_per_epoch = per_rank // batch_size

    def __len__(self) -> int:
        return self.count

    def epoch_indices(self, epoch: int) -> List[int]:
        """This process's indices for data epoch ``epoch``, in order."""
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        total = -(-self.num_samples // self.world_size) * self.world_size
        while len(order) < total:
            order += order[:total - len(order)]
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[List[int]]:
        k, b = self.batches_per_epoch, self.batch_size
        epoch, indices = None, []
        for i in range(self.start, self.start + self.count):
            if i // k != epoch:
                epoch = i // k
                indices = self.epoch_indices(epoch)
            j = i % k
            yield indices[j * b:(j + 1) * b]
