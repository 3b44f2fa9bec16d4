"""A shuffling sampler whose order is a function of (seed, epoch), so a resumed run sees the same order."""

from __future__ import annotations

from collections.abc import Iterator

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
