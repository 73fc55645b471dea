"""The parts of a run built from its config: data sets, model, loss and validation task.

The Trainer, ``ddp-train export`` (which rebuilds a finished run's model and validation
data from its ``config.yaml``) and ``ddp-train cv`` all build through
:class:`PartsBuilder`, so they cannot drift apart.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn
from torch.utils.data import Dataset

from ddp_train.components.datasets import DATASETS
from ddp_train.components.losses import LOSS_TASKS, LossFn, build_loss
from ddp_train.components.models import MODELS
from ddp_train.components.registry import resolve_callable
from ddp_train.config import TrainConfig
from ddp_train.errors import ConfigError, TrainingFailed, UsageError, failure_summary, first_line


def call_factory(factory: Callable[..., Any], args: dict[str, Any], key: str) -> Any:
    """``factory(**args)``; arguments that do not fit it, or that it fails on, are a ConfigError on ``key``.

    Whatever the factory raises while it builds from the user's arguments (ValueError for a
    value it rejects, torch's RuntimeError for a negative layer size, TypeError for a value
    of the wrong type) or from a bug in the user's own factory, the fix is in the config or
    in that factory: one line naming the key, the factory, the error and the line that
    raised it points there.
    """
    name = getattr(factory, "__name__", repr(factory))
    try:
        inspect.signature(factory).bind(**args)
    except TypeError as exc:
        raise ConfigError(key, f"do not fit {name}: {first_line(exc)}") from None
    except ValueError:  # no introspectable signature: let the call itself decide
        pass
    try:
        return factory(**args)
    except (ConfigError, UsageError, TrainingFailed):
        raise  # already a one-line report naming its own key
    except Exception as exc:
        raise ConfigError(key, f"rejected by {name} ({failure_summary(exc)})") from None


def with_hints(factory: Callable[..., Any], args: dict[str, Any], hints: dict[str, Any]
               ) -> dict[str, Any]:
    """``args`` plus the data set's size hints that the factory takes and the user left out."""
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return dict(args)
    return {**{k: v for k, v in hints.items() if k in accepted}, **args}


def build_datasets(factory: Callable[..., Any], name: str, args: dict[str, Any], key: str = "data"
                   ) -> tuple[Dataset, Dataset | None]:
    """``(train_dataset, val_dataset)`` from data set factory ``name``; errors name ``key``'s
    ``.args`` or ``.name``."""
    datasets = call_factory(factory, args, f"{key}.args")
    if not (isinstance(datasets, (tuple, list)) and len(datasets) == 2):
        raise ConfigError(f"{key}.name", f"expected {name!r} to return (train_dataset, val_dataset), "
                                         f"got {type(datasets).__name__}")
    return datasets[0], datasets[1]


def infer_task(eval_task: str, val_dataset: Dataset | None, builtin_loss_name: str | None) -> str:
    """The validation task: ``eval.task`` unless ``auto``; then the data set's, then the loss's.

    ``builtin_loss_name`` is ``loss.name`` when the loss comes from the config (a loss
    function passed in by a library user says nothing about the task: pass None).
    """
    if eval_task != "auto":
        return eval_task
    return getattr(val_dataset, "task", None) or (
        LOSS_TASKS.get(builtin_loss_name, "none") if builtin_loss_name is not None else "none")


@dataclass
class Parts:
    """What a run trains: the model (built, not yet initialised or moved), its data, loss and task."""

    model: nn.Module
    train_dataset: Dataset
    val_dataset: Dataset | None
    loss_fn: LossFn
    task: str
    """The validation metrics besides the loss: classification, regression, language_model or none."""
    collate: Callable[[list[Any]], Any] | None = None
    """data.collate: items → batch, for training and validation (None: torch's default)."""
    step_fn: Callable[[Any, Any], Any] | None = None
    """train.step_fn: ``fn(model, batch) -> loss`` or ``(loss, {name: float})``, replacing the loss."""


class PartsBuilder:
    """Builds a config's parts; what a library user passes in is used as it is.

    Every name is resolved (and every user module imported) when the builder is made, so a
    bad name fails before anything is built, any process group exists or any file is
    written; :meth:`build` then calls the factories.
    """

    def __init__(self, config: TrainConfig, *, model: nn.Module | None = None,
                 train_dataset: Dataset | None = None, val_dataset: Dataset | None = None,
                 loss_fn: LossFn | None = None) -> None:
        self.config = config
        self._model, self._datasets = model, (train_dataset, val_dataset)
        self._data_factory = DATASETS.resolve(config.data.name) if train_dataset is None else None
        self._model_factory = MODELS.resolve(config.model.name) if model is None else None
        # A loss passed in says nothing about the task; a configured one may (LOSS_TASKS).
        self._loss_name = config.loss.name if loss_fn is None else None
        self._loss_fn = loss_fn if loss_fn is not None else build_loss(config.loss.name, config.loss.args)
        self.collate = resolve_callable(config.data.collate, "data.collate") if config.data.collate else None
        self._step_fn = resolve_callable(config.train.step_fn, "train.step_fn") if config.train.step_fn else None

    def datasets(self) -> tuple[Dataset, Dataset | None]:
        """``(train_dataset, val_dataset)``: the ones passed in, or the data set factory's."""
        if self._data_factory is None:
            return self._datasets  # type: ignore[return-value]
        return build_datasets(self._data_factory, self.config.data.name, self.config.data.args)

    def build(self) -> Parts:
        """The data sets, then the model (with the sizes the data implies), the loss and the task.

        Factories draw from the global RNGs: seed them alike on every rank first, and every
        rank builds the same data and the same initial weights.
        """
        train_dataset, val_dataset = self.datasets()
        model = self._model
        if model is None:
            assert self._model_factory is not None
            model = self._build_model(self._model_factory, getattr(train_dataset, "model_hints", {}))
        # A step_fn's loss says nothing about the task either: its validation is the loss alone.
        loss_name = self._loss_name if self._step_fn is None else None
        task = infer_task(self.config.eval.task, val_dataset, loss_name)
        return Parts(model, train_dataset, val_dataset, self._loss_fn, task, self.collate, self._step_fn)

    def _build_model(self, factory: Callable[..., Any], hints: dict[str, Any]) -> nn.Module:
        """The model from the ``model.name`` factory; the data set's size ``hints`` fill in the
        arguments the user left out, and the resolved arguments are written back into
        ``model.args`` so that ``config.yaml`` records them."""
        model_config = self.config.model
        model_config.args = with_hints(factory, model_config.args, hints)
        model = call_factory(factory, model_config.args, "model.args")
        if not isinstance(model, nn.Module):
            raise ConfigError("model.name", f"expected {model_config.name!r} to return an "
                                            f"nn.Module, got {type(model).__name__}")
        return model
