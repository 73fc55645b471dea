"""Samplers and loaders: the same data order at every world size, exact validation shards."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler


class ShardSampler(Sampler[int]):
    """Rank r of W takes samples r, r+W, r+2W, ...: every sample exactly once, no padding.

    DistributedSampler pads the last round with repeated samples so that every rank has
    as many; for validation that counts those samples twice, so shards here are uneven.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length = length
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way through an epoch.

    Resuming mid-epoch skips the positions already trained on by index arithmetic, so the
    skipped samples are never loaded, and the rest of the epoch keeps its order.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.start_index = 0

    def set_position(self, epoch: int, start_index: int) -> None:
        """Iterate epoch ``epoch`` from this rank's ``start_index``-th sample on."""
        self.set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index

    def state_dict(self) -> dict[str, int]:
        """Where the sampler is: epoch, seed, and this rank's start position."""
        return {"epoch": self.epoch, "seed": self.seed, "start_index": self.start_index}


def train_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, shuffle: bool,
                 seed: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """Training loader over this rank's shard.

    A DistributedSampler at every world size (also 1), with ``drop_last`` in both the
    sampler and the loader: epoch e's permutation depends only on (seed, e), rank r reads
    positions r, r+W, ..., and all micro-batches are full. Hence micro-batch i of the W
    ranks together holds exactly the samples of micro-batch i of one rank with W times
    the batch, and N ranks × B reproduces 1 rank × N·B.

    No persistent workers: a resumed epoch starts a new iterator with a shorter sampler.
    """
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                               seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=num_workers, pin_memory=pin_memory,
                      # Worker seeds are drawn from this generator, which the trainer
                      # reseeds every epoch: they depend on (seed, rank, epoch) only.
                      generator=torch.Generator().manual_seed(seed + rank))


def eval_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int,
                pin_memory: bool) -> DataLoader:
    """Validation loader over this rank's exact shard (see :class:`ShardSampler`)."""
    sampler = ShardSampler(len(dataset), rank, world_size)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch
