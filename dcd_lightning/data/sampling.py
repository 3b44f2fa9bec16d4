"""A shuffling sampler whose order is a function of (seed, epoch), and per-sample seeded augmentation,
so a resumed run sees the same batches, augmented alike."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


def sample_seed(*parts: int) -> int:
    """A seed for torch.manual_seed made of integers (such as seed, epoch, index), the same in every
    process (tuples of ints hash without Python's per-process string randomisation)."""
    return hash(tuple(parts)) & (2**63 - 1)


@contextlib.contextmanager
def seeded_draws(*parts: int) -> Iterator[None]:
    """Inside, torch's CPU generator is seeded by sample_seed(*parts); on leaving, it is as before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed(*parts))
        yield


class EpochSeeded(Dataset):
    """A training dataset read with keys epoch * len + index (EpochShuffleSampler's), each sample's
    random augmentation drawn from a generator seeded by (seed, epoch, index) alone.

    So the draws do not depend on which loader worker reads the sample or on what it read before:
    a resumed run, which skips the batches it has trained on, augments the rest as an uninterrupted
    run does, with any number of workers. The global generator is left as it was (fork_rng), also
    where samples are read in the main process.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int) -> Any:
        epoch, index = divmod(int(key), len(self))
        with seeded_draws(self.seed, epoch, index):
            return self.dataset[index]


class EpochShuffleSampler(Sampler[int]):
    """Shuffles 0..length-1 with a generator seeded by seed + epoch; Lightning calls set_epoch.
    It yields keys epoch * length + index, which EpochSeeded reads (epoch 0's keys are the indices).

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
        return iter((torch.randperm(self.length, generator=generator) + self.epoch * self.length).tolist())

    def __len__(self) -> int:
        return self.length


def processes_of(module: Any) -> int:
    """The number of training processes of a data module's trainer (1 before it has one)."""
    trainer = getattr(module, "trainer", None)
    return max(1, int(getattr(trainer, "world_size", 1) or 1))


def drop_last_batch(module: Any, length: int, batch_size: int) -> bool:
    """Whether a training loader drops its last partial batch: yes, unless a process gets fewer
    than `batch_size` of the `length` samples, where dropping it would leave no batch at all (the
    fit would stop at once, "no training batches"); that case trains on one partial batch and
    warns, naming the sizes."""
    per_process = math.ceil(length / processes_of(module))
    if per_process >= batch_size:
        return True
    warn_partial_batch(module, length, per_process, batch_size)
    return False


def warn_partial_batch(module: Any, length: int, per_process: int, batch_size: int) -> None:
    """The warning of a training loader that keeps its one partial batch (see drop_last_batch)."""
    warnings.warn(
        f"{type(module).__name__}: {length} training samples give {per_process} per process, fewer than "
        f"batch_size={batch_size}; each epoch is one partial batch (lower data.init_args.batch_size for more)",
        stacklevel=3,
    )


class EvalShard(DistributedSampler):
    """One process's part of a validation or test split under DDP, each image counted once.

    Every process gets the same number of samples, as Lightning's DistributedSampler gives them
    (DDP's collectives need the same number of batches on every process); that sampler fills the
    last places by repeating the first images, which then count twice in the metrics (e.g. 270
    images evaluated for 269). Here those places come as index + length, which MarkedPadding
    reads as the image at index with the label -1, and the classifier's loss and metrics skip
    such samples: the figures equal one process's.
    """

    def __init__(self, length: int, num_replicas: int, rank: int) -> None:
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        length = len(self.dataset)  # type: ignore[arg-type]
        padded = [*range(length), *(length + i % length for i in range(self.total_size - length))]
        return iter(padded[self.rank : self.total_size : self.num_replicas])


class MarkedPadding(Dataset):
    """`dataset`, with keys length + i read as sample i labelled -1 (EvalShard's padding)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int) -> Any:
        if key < len(self):
            return self.dataset[key]
        sample = self.dataset[key - len(self)]
        if sample is None:  # an unreadable image, skipped (skip_corrupt)
            return None
        label = torch.tensor(-1) if isinstance(sample[1], torch.Tensor) else -1
        return (sample[0], label, *sample[2:])


def loader_sampling(module: Any, dataset: Dataset, seed: int, shuffle: bool,
                    evaluate: bool) -> tuple[Dataset, Sampler[int] | None]:
    """(dataset, sampler) of a data module's loader. Training (`shuffle`): each sample augmented
    from (seed, epoch, index) (EpochSeeded) in EpochShuffleSampler's order. Validation and test
    (`evaluate`): under DDP, EvalShard over MarkedPadding. Otherwise (predict, or one process):
    the dataset in order."""
    if shuffle:
        return EpochSeeded(dataset, seed), EpochShuffleSampler(len(dataset), seed)  # type: ignore[arg-type]
    processes = processes_of(module)
    if not evaluate or processes == 1:
        return dataset, None
    return MarkedPadding(dataset), EvalShard(len(dataset), processes, int(module.trainer.global_rank))  # type: ignore[arg-type]
