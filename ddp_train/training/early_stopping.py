"""Best-metric tracking and early stopping, with state that survives a restart."""

from __future__ import annotations

import math
from typing import Any

from ddp_train.config import EarlyStoppingConfig
from ddp_train.config.sections import shown
from ddp_train.errors import ConfigError

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("val/loss", "val/accuracy", "val/precision_macro", "val/recall_macro",
                       "val/f1_macro"),
    "language_model": ("val/loss", "val/accuracy", "val/perplexity"),
    "regression": ("val/loss", "val/mse", "val/mae", "val/r2"),
    "none": ("val/loss",),
}
"""The metrics validation reports for each task (:mod:`ddp_train.training.metrics`) that can be
watched: numbers that can improve (``val/samples`` never does; the confusion matrix is not one)."""


def watchable_metrics(task: str, custom_step: bool) -> tuple[str, ...]:
    """The metrics a validation of ``task`` reports that early stopping can watch.

    With a ``train.step_fn`` (``custom_step``) the model's predictions are not seen, so
    only the loss and what follows from it alone (a language model's perplexity) are there.
    A task ddp_train does not know (a data set's own ``task``) gets the loss only.
    """
    if custom_step:
        return ("val/loss", "val/perplexity") if task == "language_model" else ("val/loss",)
    return TASK_METRICS.get(task, ("val/loss",))


class EarlyStopping:
    """Tracks the best value of one validation metric; says when patience has run out.

    Every rank computes the same reduced validation metrics, so every rank reaches the
    same decision; the trainer still reduces the decision so that no rank can differ.
    """

    def __init__(self, config: EarlyStoppingConfig) -> None:
        self.config = config
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_metrics: dict[str, Any] = {}
        self.bad_validations = 0

    def check_metric(self, task: str, custom_step: bool) -> None:
        """Raise a ConfigError, before training starts, when the watched metric is not one a
        validation of ``task`` (with a ``train.step_fn`` when ``custom_step``) reports."""
        available = watchable_metrics(task, custom_step)
        if self.config.metric not in available:
            source = f"task {task!r}" + (" with a train.step_fn" if custom_step else "")
            raise ConfigError("train.early_stopping.metric",
                              f"expected a metric that validation reports for {source} "
                              f"({', '.join(available)}), got {shown(self.config.metric)}")

    def _improves(self, value: float) -> bool:
        if self.best_value is None:
            return True
        if self.config.mode == "min":
            return value < self.best_value - self.config.min_delta
        return value > self.best_value + self.config.min_delta

    def update(self, metrics: dict[str, Any], step: int) -> bool:
        """Record one validation; True when training should stop on this rank."""
        if self.config.metric not in metrics:
            names = ", ".join(sorted(k for k in metrics if k.startswith("val/")))
            raise ConfigError("train.early_stopping.metric",
                              f"expected a metric this validation reports ({names}), "
                              f"got {self.config.metric!r}")
        value = float(metrics[self.config.metric])
        if not math.isnan(value) and self._improves(value):
            self.best_value, self.best_step = value, step
            self.best_metrics = dict(metrics)
            self.bad_validations = 0
        else:
            self.bad_validations += 1
        return self.config.enabled and self.bad_validations >= self.config.patience

    def best(self) -> dict[str, Any]:
        """The best validation so far: its ``step``, the ``metric`` watched, and its metrics ({} before any)."""
        if self.best_step is None:
            return {}
        return {"step": self.best_step, "metric": self.config.metric, **self.best_metrics}

    def state_dict(self) -> dict[str, Any]:
        """Plain-typed state (loadable with weights_only=True)."""
        return {"best_value": self.best_value, "best_step": self.best_step,
                "best_metrics": self.best_metrics, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        self.best_value = state["best_value"]
        self.best_step = state["best_step"]
        self.best_metrics = dict(state["best_metrics"])
        self.bad_validations = state["bad_validations"]
