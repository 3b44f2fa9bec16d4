"""A shuffling sampler whose order is a function of (seed, epoch), so a resumed run sees the same order."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Shuffles 0..length-1 with a generator seeded by seed + epoch; Lightning calls set_epoch.

    Unlike RandomSampler (which draws from the global RNG), the order of epoch e does not depend
    on how many random numbers were drawn before, so an uninterrupted run and a resumed one agree.
    Under DDP Lightning wraps it in a distributed sampler that is seeded the same way.
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order __iter__ yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def drop_last_batch(module: Any, length: int, batch_size: int) -> bool:
    """Whether a training loader drops its last partial batch: yes, unless a process gets fewer
    than `batch_size` of the `length` samples, where dropping it would leave no batch at all (the
    fit would stop at once, "no training batches"); that case trains on one partial batch and
    warns, naming the sizes."""
    trainer = getattr(module, "_trainer", None)
    processes = max(1, int(getattr(trainer, "world_size", 1) or 1))
    per_process = math.ceil(length / processes)
    if per_process >= batch_size:
        return True
    warnings.warn(
        f"{type(module).__name__}: {length} training samples give {per_process} per process, fewer than "
        f"batch_size={batch_size}; each epoch is one partial batch (lower data.init_args.batch_size for more)",
        stacklevel=2,
    )
    return False
