"""Data sets and models built from the config's registries: what training and export share.

The Trainer builds its parts through these functions, and ``ddp-train export`` rebuilds
the very same model and validation data from a run's ``config.yaml`` with them, so the
two cannot drift apart.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn
from torch.utils.data import Dataset

from ddp_train.config import DataConfig, ModelConfig
from ddp_train.errors import ConfigError
from ddp_train.components.losses import LOSS_TASKS


def call_factory(factory: Callable[..., Any], args: dict[str, Any], key: str) -> Any:
    """``factory(**args)``; arguments that do not fit, or that it rejects, are a ConfigError on ``key``."""
    try:
        inspect.signature(factory).bind(**args)
    except TypeError as exc:
        raise ConfigError(key, f"do not fit {getattr(factory, '__name__', factory)}: {exc}") from None
    except ValueError:  # no introspectable signature: let the call itself decide
        pass
    try:
        return factory(**args)
    except ValueError as exc:  # a factory rejecting its arguments: bad input, not a bug
        raise ConfigError(key, f"rejected by {getattr(factory, '__name__', factory)}: {exc}") from None


def with_hints(factory: Callable[..., Any], args: dict[str, Any], hints: dict[str, Any]
               ) -> dict[str, Any]:
    """``args`` plus the data set's size hints that the factory takes and the user left out."""
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return dict(args)
    return {**{k: v for k, v in hints.items() if k in accepted}, **args}


def build_datasets(factory: Callable[..., Any], config: DataConfig) -> tuple[Dataset, Dataset | None]:
    """``(train_dataset, val_dataset)`` from the resolved ``data.name`` factory and ``data.args``."""
    datasets = call_factory(factory, config.args, "data.args")
    if not (isinstance(datasets, (tuple, list)) and len(datasets) == 2):
        raise ConfigError("data.name", f"expected {config.name!r} to return "
                                       f"(train_dataset, val_dataset), got {type(datasets).__name__}")
    return datasets[0], datasets[1]


def build_model(factory: Callable[..., Any], config: ModelConfig, hints: dict[str, Any]) -> nn.Module:
    """The model from the resolved ``model.name`` factory, before init, norm and wrapping.

    The data set's size ``hints`` fill in the arguments the user left out; the resolved
    arguments are written back into ``config.args`` so that ``config.yaml`` records them.
    """
    config.args = with_hints(factory, config.args, hints)
    model = call_factory(factory, config.args, "model.args")
    if not isinstance(model, nn.Module):
        raise ConfigError("model.name", f"expected {config.name!r} to return an "
                                        f"nn.Module, got {type(model).__name__}")
    return model


def infer_task(eval_task: str, val_dataset: Dataset | None, builtin_loss_name: str | None) -> str:
    """The validation task: ``eval.task`` unless ``auto``; then the data set's, then the loss's.

    ``builtin_loss_name`` is ``loss.name`` when the loss comes from the config (a loss
    function passed in by a library user says nothing about the task: pass None).
    """
    if eval_task != "auto":
        return eval_task
    return getattr(val_dataset, "task", None) or (
        LOSS_TASKS.get(builtin_loss_name, "none") if builtin_loss_name is not None else "none")
