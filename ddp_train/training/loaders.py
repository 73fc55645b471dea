"""Samplers and loaders: the same data order at every world size (map-style and iterable data),
resume from any global sample offset, exact validation shards."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

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


class EpochSampler(Sampler[int]):
    """Rank r's samples of one epoch from a global sample offset on: the same order at every world size.

    Epoch e's order is a permutation of the data set that depends only on (seed, e) (the
    one DistributedSampler draws). The epoch's samples from global offset O on are cut into
    full global batches (the rest is dropped, as ``drop_last`` would); rank r of W takes
    positions O+r, O+r+W, ... of them. So micro-batch i of the W ranks together holds
    exactly micro-batch i of one rank with W times the batch, and a run resumed at another
    world size, batch size or accumulation continues the epoch at the sample it stopped
    at, none skipped or repeated.
    """

    def __init__(self, length: int, rank: int, world_size: int, shuffle: bool, seed: int,
                 global_batch: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size
        self.shuffle, self.seed, self.global_batch = shuffle, seed, global_batch
        self.epoch = self.offset = 0

    def set_position(self, epoch: int, offset: int) -> None:
        """Iterate epoch ``epoch`` from global sample ``offset`` on."""
        self.epoch, self.offset = epoch, offset

    def steps_from(self, offset: int) -> int:
        """Full global batches left in an epoch from global sample ``offset`` on."""
        return max(self.length - offset, 0) // self.global_batch

    def _end(self) -> int:
        return self.offset + self.steps_from(self.offset) * self.global_batch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=generator)
        else:
            order = torch.arange(self.length)
        return iter(order[self.offset + self.rank:self._end():self.world_size].tolist())

    def __len__(self) -> int:
        return len(range(self.offset + self.rank, self._end(), self.world_size))


class ShardedIterable(IterableDataset):
    """Rank r's share of an iterable data set: items O+r, O+r+W, ... from global item offset O.

    DataLoader workers split the share again by whole batches (worker k of K takes the
    rank's batches k, k+K, ...), and the loader takes batches from its workers in turn, so
    the batches come in the same order with any number of workers. Resuming skips the
    items already trained on by reading past them: a stream's items must depend only on
    its epoch (a random stream seeds its own generator in ``set_epoch``, which is called
    at the start of every epoch when the data set has it).
    """

    def __init__(self, source: IterableDataset, rank: int, world_size: int, batch_size: int) -> None:
        self.source, self.rank, self.world_size, self.batch_size = source, rank, world_size, batch_size
        self.epoch = self.offset = 0

    def set_position(self, epoch: int, offset: int) -> None:
        """Iterate epoch ``epoch`` from global item ``offset`` on."""
        self.epoch, self.offset = epoch, offset

    def steps_from(self, offset: int) -> int | None:
        """Unknown: a stream ends when it runs out."""
        return None

    def __iter__(self) -> Iterator[Any]:
        set_epoch = getattr(self.source, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        share = itertools.islice(self.source, self.offset + self.rank, None, self.world_size)
        for index, item in enumerate(share):
            if (index // self.batch_size) % workers == worker_id:
                yield item


@dataclass
class TrainData:
    """This rank's training batches, epoch by epoch, from any global sample offset."""

    loader: DataLoader
    position: EpochSampler | ShardedIterable
    """Where the next epoch's iterator starts (the loader's sampler or data set)."""
    global_batch: int
    """Samples per optimizer step over all ranks."""
    steps_limit: int | None
    """data.steps_per_epoch: at most this many steps make an epoch."""

    def steps_from(self, offset: int, step_in_epoch: int = 0) -> int | None:
        """Optimizer steps left in an epoch at global sample ``offset``; None when unknown (a stream)."""
        steps = self.position.steps_from(offset)
        limit = None if self.steps_limit is None else max(self.steps_limit - step_in_epoch, 0)
        if steps is None:
            return limit
        return steps if limit is None else min(steps, limit)

    def epoch(self, seed: int, rank: int, epoch: int, offset: int) -> Iterator[Any]:
        """An iterator over epoch ``epoch``'s micro-batches from global sample ``offset`` on."""
        # Worker seeds depend on (seed, rank, epoch) only, so a resumed run draws the same.
        self.loader.generator.manual_seed(((seed * 1_000_003 + epoch) * 1009 + rank) % 2**64)  # type: ignore[union-attr]
        self.position.set_position(epoch, offset)
        return iter(self.loader)

    def total_steps(self, epochs: int, max_steps: int | None, global_step: int = 0, epoch: int = 0,
                    offset: int = 0, step_in_epoch: int = 0) -> int | None:
        """Optimizer steps of the whole run from a position (the start by default): whichever of
        ``epochs`` and ``max_steps`` ends it first; None when neither can be known."""
        this_epoch, per_epoch = self.steps_from(offset, step_in_epoch), self.steps_from(0)
        if this_epoch is None or per_epoch is None:
            return max_steps
        by_epochs = global_step + this_epoch + max(epochs - epoch - 1, 0) * per_epoch
        return by_epochs if max_steps is None else min(by_epochs, max_steps)


def step_groups(batches: Iterator[Any], accum: int, steps: int | None,
                any_rank: Callable[[bool], bool]) -> Iterator[tuple[list[Any], bool]]:
    """Each optimizer step's ``accum`` micro-batches, and whether it is the epoch's last.

    ``steps`` known (map-style data): exactly that many. Unknown (a stream): until any rank
    runs out, agreed every step (one collective), so that no rank waits for a step the
    others cannot take; the next step is read ahead to know whether this one is the last.
    """
    if steps is not None:
        for step in range(steps):
            group = [next(batches) for _ in range(accum)]
            if step == steps - 1:
                del batches  # ends the epoch's iterator (and its worker processes) before validation
            yield group, step == steps - 1
        return

    def take() -> list[Any] | None:
        group = list(itertools.islice(batches, accum))
        return None if any_rank(len(group) < accum) else group

    current = take()
    while current is not None:
        following = take()
        yield current, following is None
        current = following


def train_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, shuffle: bool,
                 seed: int, num_workers: int, pin_memory: bool, collate: Callable[[list[Any]], Any] | None,
                 global_batch: int) -> tuple[DataLoader, EpochSampler | ShardedIterable]:
    """Training loader over this rank's shard, and what positions it (see :class:`EpochSampler`,
    :class:`ShardedIterable`). Every micro-batch is full.

    No persistent workers: a resumed epoch starts a new iterator at another position.
    """
    # Worker seeds are drawn from this generator, which the trainer reseeds every epoch:
    # they depend on (seed, rank, epoch) only.
    generator = torch.Generator().manual_seed(seed + rank)
    if isinstance(dataset, IterableDataset):
        shard = ShardedIterable(dataset, rank, world_size, batch_size)
        return DataLoader(shard, batch_size=batch_size, drop_last=True, num_workers=num_workers,
                          pin_memory=pin_memory, collate_fn=collate, generator=generator), shard
    sampler = EpochSampler(len(dataset), rank, world_size, shuffle, seed, global_batch)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate,
                      generator=generator), sampler


def eval_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int,
                pin_memory: bool, collate: Callable[[list[Any]], Any] | None = None) -> DataLoader:
    """Validation loader over this rank's exact shard (see :class:`ShardSampler`), every sample once."""
    if isinstance(dataset, IterableDataset):
        return DataLoader(ShardedIterable(dataset, rank, world_size, batch_size), batch_size=batch_size,
                          num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate)
    sampler = ShardSampler(len(dataset), rank, world_size)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, collate_fn=collate)


@dataclass
class Loaders:
    """A run's data and the length of its training."""

    train: TrainData
    val: DataLoader | None
    """None without a validation set (or an empty one)."""
    steps_per_epoch: int | None
    """None for a stream of unknown length without data.steps_per_epoch."""
    total_steps: int | None
    """Optimizer steps of the whole run: whichever of train.epochs and train.max_steps ends it
    first; None when a stream of unknown length decides (train.epochs passes over it)."""


def build_loaders(train_dataset: Dataset, val_dataset: Dataset | None, config: TrainConfig,
                  env: DistEnv, collate: Callable[[list[Any]], Any] | None = None) -> Loaders:
    """This rank's training and validation loaders; ConfigError when not one optimizer step fits an epoch."""
    pin = env.device.type == "cuda"
    data, accum = config.data, config.train.grad_accum_steps
    global_batch = env.world_size * data.batch_size * accum
    loader, position = train_loader(train_dataset, data.batch_size, env.rank, env.world_size, data.shuffle,
                                    config.run.seed, data.num_workers, pin, collate, global_batch)
    train = TrainData(loader, position, global_batch, data.steps_per_epoch)
    val = None
    if val_dataset is not None and (isinstance(val_dataset, IterableDataset) or len(val_dataset) > 0):  # type: ignore[arg-type]
        val = eval_loader(val_dataset, config.eval.batch_size or data.batch_size, env.rank,
                          env.world_size, data.num_workers, pin, collate)
    steps_per_epoch = train.steps_from(0)
    if steps_per_epoch == 0:
        raise ConfigError("data.batch_size", f"expected a global batch (world size {env.world_size} × "
                                             f"batch {data.batch_size} × accumulation {accum} = "
                                             f"{global_batch}) no larger than the "
                                             f"{len(train_dataset)} training samples")  # type: ignore[arg-type]
    return Loaders(train, val, steps_per_epoch, train.total_steps(config.train.epochs, config.train.max_steps))


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch
