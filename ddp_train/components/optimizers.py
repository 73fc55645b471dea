"""Optimizers and learning-rate schedules (with linear warmup), both behind registries."""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Iterable

import torch

from ddp_train.config import OptimConfig, ScheduleConfig
from ddp_train.errors import ConfigError
from ddp_train.components.registry import Registry

OPTIMIZERS = Registry("optimizer", "optim.name")
SCHEDULES = Registry("schedule", "schedule.name")

OPTIMIZERS.register("sgd")(torch.optim.SGD)
OPTIMIZERS.register("adam")(torch.optim.Adam)
OPTIMIZERS.register("adamw")(torch.optim.AdamW)
OPTIMIZERS.register("rmsprop")(torch.optim.RMSprop)


def build_optimizer(params: Iterable[torch.nn.Parameter], config: OptimConfig
                    ) -> torch.optim.Optimizer:
    """The configured optimizer; the generic keys go only where the class accepts them."""
    cls = OPTIMIZERS.resolve(config.name)
    generic: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay,
                               "momentum": config.momentum, "betas": tuple(config.betas)}
    try:
        accepted = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        accepted = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    kwargs = {k: v for k, v in generic.items() if k in accepted or (takes_any and k == "lr")}
    kwargs.update(config.args)
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError("optim.args", f"do not fit optimizer {config.name!r}: {exc}") from None


class WarmupSchedule:
    """LR multiplier: linear warmup, then constant/linear/cosine/step decay.

    A callable object rather than a closure: LambdaLR stores an object's ``__dict__`` in its
    state_dict (plain numbers here, so checkpoints load with ``weights_only=True``).
    """

    def __init__(self, kind: str, warmup_steps: int, total_steps: int, min_lr_ratio: float,
                 step_size: int, gamma: float) -> None:
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = max(total_steps, 1)
        self.min_lr_ratio = min_lr_ratio
        self.step_size = step_size
        self.gamma = gamma

    def __call__(self, step: int) -> float:
        """Multiplier of the peak LR for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.gamma ** ((step - self.warmup_steps) // self.step_size)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "linear":
            shape = 1.0 - progress
        else:  # cosine
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


for _kind in ("constant", "linear", "cosine", "step"):
    SCHEDULES.register(_kind)(WarmupSchedule)


def build_schedule(optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int | None
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """The configured schedule over ``total_steps`` optimizer steps (None: unknown, a stream's
    length; only schedules that do not depend on it are allowed then)."""
    factory: Callable[..., Any] = SCHEDULES.resolve(config.name)
    if factory is WarmupSchedule:
        if total_steps is None and config.name in ("linear", "cosine"):
            raise ConfigError("schedule.name", f"{config.name!r} decays over the run's length, which "
                                               f"a stream of unknown length leaves open: set "
                                               f"data.steps_per_epoch or train.max_steps, or use "
                                               f"constant or step")
        multiplier = WarmupSchedule(config.name, config.warmup_steps, total_steps or 1,
                                    config.min_lr_ratio, config.step_size, config.gamma)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    scheduler = factory(optimizer, total_steps=total_steps, warmup_steps=config.warmup_steps)
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise ConfigError("schedule.name", f"expected {config.name!r} to return an LRScheduler, "
                                           f"got {type(scheduler).__name__}")
    return scheduler
