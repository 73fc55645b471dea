"""Strategies: one object per way of spreading the model over the ranks.

``train.strategy`` picks one, once (:func:`build_strategy`):

* ``none`` (:class:`Strategy`, what ``auto`` means at world size 1): one process trains the
  model as it is;
* ``ddp`` (:class:`DDPStrategy`, ``auto`` with more ranks): every rank holds the whole
  model and DDP all-reduces the gradients;
* ``fsdp`` (:class:`~ddp_train.distributed.fsdp.FSDPStrategy`): every rank holds a shard of
  every parameter, gradient and optimizer state.

A strategy owns everything that differs between them: wrapping the model, the
gradient-sync context of accumulation micro-batches, the global gradient norm and
clipping, how validation batches are fed, the model and optimizer state dicts, the
checkpoint format, and gathering the final model. The Trainer holds no branch on which
one it runs.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddp_train.checkpoint.single_file import FileCheckpointStore
from ddp_train.checkpoint.store import CheckpointStore
from ddp_train.components.weights import plain_state_dict
from ddp_train.config import CheckpointConfig, TrainConfig
from ddp_train.distributed.environment import DistEnv
from ddp_train.distributed.grad_norm import GradNorm
from ddp_train.distributed.precision import Precision

_REDUCE_AS_USUAL = nullcontext()  # reusable: one object for every micro-batch that reduces


class Strategy:
    """Training in one process with the model as it is (``train.strategy`` auto at world size 1).

    The base of the other strategies: what it does here is what they share.
    """

    name = "none"
    """How ``describe`` and the console name it."""

    def __init__(self, env: DistEnv, config: TrainConfig, precision: Precision) -> None:
        self.env = env
        self.config = config
        self.precision = precision
        self.module: nn.Module | None = None
        self._trainable: list[nn.Parameter] = []
        self._grad_norm: Callable[[list[torch.Tensor]], torch.Tensor] | None = None

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        """Reject what this strategy cannot combine with (ConfigError), before any process group."""

    def wrap(self, module: nn.Module) -> nn.Module:
        """Take ``module`` (on this rank's device, same weights on every rank) into training;
        returns the model each training step calls."""
        self.module = module
        # The parameters whose gradients each step measures, listed once instead of walking
        # the modules every step (FSDP's are its shards, the objects the optimizer holds).
        self._trainable = [p for p in module.parameters() if p.requires_grad]
        self._grad_norm = GradNorm(self._trainable)
        return module

    def gradients(self) -> list[torch.Tensor]:
        """This step's gradients (of the parameters that have one)."""
        return [p.grad for p in self._trainable if p.grad is not None]

    def gradient_sync(self, enabled: bool) -> ContextManager[Any]:
        """A context for one micro-batch's forward and backward that reduces gradients or not."""
        return _REDUCE_AS_USUAL

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The global 2-norm of ``grads``, the same on every rank (a 0-d tensor on their device)."""
        assert self._grad_norm is not None, "wrap() the model first"
        return self._grad_norm(grads)

    def clip_gradients(self, grads: list[torch.Tensor], grad_norm: torch.Tensor) -> None:
        """Clip by value and/or by the global norm (``train.clip_grad_*``; gradients unscaled)."""
        train = self.config.train
        if train.clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(self._trainable, train.clip_grad_value)
            if train.clip_grad_norm is not None:  # the values changed: measure again
                grad_norm = self.grad_norm(grads)
        if train.clip_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self._trainable, train.clip_grad_norm, grad_norm)

    def validation_batches(self, loader: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
        """``(batch, counts)`` for each validation batch of this rank; ``counts`` False marks a
        batch fed only so that every rank runs as many forwards (its outputs are not counted)."""
        return ((batch, True) for batch in loader)

    def state_dicts(self, module: nn.Module, optimizer: torch.optim.Optimizer
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The whole model and optimizer state, complete on rank 0 (a collective)."""
        return module.state_dict(), optimizer.state_dict()

    def checkpoint_state_dicts(self, module: nn.Module, optimizer: torch.optim.Optimizer
                               ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model and optimizer state in the form :meth:`checkpoint_store` saves (a collective)."""
        return self.state_dicts(module, optimizer)

    def load_state_dicts(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
        """Load the model and optimizer state of a checkpoint state (every rank passes it)."""
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def final_model_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``model.pt``'s state: plain, unwrapped, full, on CPU; complete on rank 0 (a collective)."""
        return plain_state_dict(module) if self.env.is_main else {}

    def checkpoint_store(self, directory: Path, config: CheckpointConfig) -> CheckpointStore:
        """The checkpoints of this run, in this strategy's format."""
        return FileCheckpointStore(directory, config, self.env)

    def release(self) -> None:
        """Drop what holds the process group (call while it is still alive)."""


class DDPStrategy(Strategy):
    """DistributedDataParallel: the whole model on every rank, gradients all-reduced in buckets."""

    name = "ddp"

    def __init__(self, env: DistEnv, config: TrainConfig, precision: Precision) -> None:
        super().__init__(env, config, precision)
        self.ddp: DistributedDataParallel | None = None

    def wrap(self, module: nn.Module) -> nn.Module:
        """The DDP wrapper of ``module``."""
        super().wrap(module)
        device, dist_config = self.env.device, self.config.dist
        self.ddp = DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=dist_config.bucket_cap_mb,
            find_unused_parameters=dist_config.find_unused_parameters,
            gradient_as_bucket_view=dist_config.gradient_as_bucket_view)
        return self.ddp

    def gradient_sync(self, enabled: bool) -> ContextManager[Any]:
        """``no_sync()`` on the micro-batches that do not reduce; it must cover both the
        forward and the backward pass to hold DDP's reducer back."""
        if enabled:
            return _REDUCE_AS_USUAL
        assert self.ddp is not None, "wrap() the model first"
        return self.ddp.no_sync()

    def release(self) -> None:
        """Drop DDP's reducer, which keeps the process group and its last pending work alive:
        left to interpreter shutdown, gloo's threads may release them after Python is gone."""
        self.ddp = None


def _strategy_class(name: str, world_size: int) -> type[Strategy]:
    """The class ``train.strategy`` names; ``auto`` is ddp with more than one rank, else none."""
    if name == "fsdp":
        # FSDP, DTensor and torch.distributed.checkpoint take about a second to import:
        # only FSDP runs load them.
        from ddp_train.distributed.fsdp import FSDPStrategy

        return FSDPStrategy
    if name == "ddp" or (name == "auto" and world_size > 1):
        return DDPStrategy
    return Strategy


def setup_environment(config: TrainConfig) -> DistEnv:
    """The launcher environment of a run of ``config``.

    An explicitly named strategy first checks what it cannot combine with, and gets a
    process group even at world size 1.
    """
    explicit = config.train.strategy != "auto"
    if explicit:
        _strategy_class(config.train.strategy, world_size=1).check_config(config)
    return DistEnv.setup(config.dist, config.run.device, force_process_group=explicit)


def build_strategy(config: TrainConfig, env: DistEnv, precision: Precision) -> Strategy:
    """The strategy ``train.strategy`` names, for this job's world size."""
    return _strategy_class(config.train.strategy, env.world_size)(env, config, precision)
