"""Samplers and loaders: the same data order at every world size, exact validation shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from ddp_train.config import TrainConfig
from ddp_train.distributed.environment import DistEnv
from ddp_train.errors import ConfigError


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


def epoch_batches(loader: DataLoader, seed: int, rank: int, epoch: int, start_sample: int) -> Iterator[Any]:
    """An iterator over epoch ``epoch`` of a :func:`train_loader`, from this rank's
    ``start_sample``-th sample on (0: the whole epoch)."""
    # Worker seeds depend on (seed, rank, epoch) only, so a resumed run draws the same.
    loader.generator.manual_seed((seed * 1_000_003 + epoch) * 1009 + rank)  # type: ignore[union-attr]
    loader.sampler.set_position(epoch, start_sample)  # type: ignore[union-attr]
    return iter(loader)


def eval_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int,
                pin_memory: bool) -> DataLoader:
    """Validation loader over this rank's exact shard (see :class:`ShardSampler`)."""
    sampler = ShardSampler(len(dataset), rank, world_size)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory)


@dataclass
class Loaders:
    """A run's loaders and the length of its training."""

    train: DataLoader
    val: DataLoader | None
    """None without a validation set (or an empty one)."""
    steps_per_epoch: int
    total_steps: int
    """Optimizer steps of the whole run: whichever of train.epochs and train.max_steps ends it first."""


def build_loaders(train_dataset: Dataset, val_dataset: Dataset | None, config: TrainConfig,
                  env: DistEnv) -> Loaders:
    """This rank's training and validation loaders; ConfigError when not one optimizer step fits an epoch."""
    pin = env.device.type == "cuda"
    train = train_loader(train_dataset, config.data.batch_size, env.rank, env.world_size,
                         config.data.shuffle, config.run.seed, config.data.num_workers, pin)
    val = None
    if val_dataset is not None and len(val_dataset) > 0:  # type: ignore[arg-type]
        val = eval_loader(val_dataset, config.eval.batch_size or config.data.batch_size, env.rank,
                          env.world_size, config.data.num_workers, pin)
    accum = config.train.grad_accum_steps
    steps_per_epoch = len(train) // accum
    if steps_per_epoch == 0:
        global_batch = env.world_size * config.data.batch_size * accum
        raise ConfigError("data.batch_size", f"expected a global batch (world size {env.world_size} × "
                                             f"batch {config.data.batch_size} × accumulation {accum} = "
                                             f"{global_batch}) no larger than the "
                                             f"{len(train_dataset)} training samples")  # type: ignore[arg-type]
    epochs_steps = steps_per_epoch * config.train.epochs
    return Loaders(train, val, steps_per_epoch, min(epochs_steps, config.train.max_steps or epochs_steps))


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch
