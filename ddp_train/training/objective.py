"""The objective: how one micro-batch becomes the loss that is trained and validated.

In order of precedence: the user's ``train.step_fn(model, batch)``; the loss the model
returns itself (a Hugging Face model given ``labels``); ``loss.name`` applied to the
model's prediction and the batch's targets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from ddp_train.components.losses import LossFn
from ddp_train.errors import BatchError, ConfigError, failure_summary
from ddp_train.training.batches import (ModelCall, check_batch, check_signature, counted_targets, describe,
                                        read_output, split_batch)

StepFn = Callable[[Any, Any], Any]
"""``fn(model, batch) -> loss`` or ``-> (loss, {name: float})``."""


@dataclass(slots=True)
class Evaluation:
    """One micro-batch through the objective."""

    loss: torch.Tensor
    """The scalar loss (a mean over the batch, or over its counted tokens)."""
    prediction: torch.Tensor | None
    """The model's prediction, None under a step_fn or when the model returned only a loss."""
    targets: Any
    """The batch's targets, None when it has none."""
    extras: dict[str, float] = field(default_factory=dict)
    """Further values a step_fn returned, logged as train/<name>."""


class Objective:
    """Turns micro-batches into losses; the first batch of each kind is checked against the contract."""

    def __init__(self, loss_fn: LossFn, step_fn: StepFn | None, target_key: str) -> None:
        self.loss_fn = loss_fn
        self.step_fn = step_fn
        self.target_key = target_key
        self._checked = False

    def __call__(self, model: Callable[..., Any], batch: Any) -> Evaluation:
        """The loss (and prediction) of ``model`` on ``batch``; BatchError outside the contract."""
        if self.step_fn is not None:
            return self._user_step(model, batch)
        if self._checked and type(batch) in (list, tuple) and len(batch) == 2 and type(batch[0]) is torch.Tensor:
            # The common case, (tensor, targets) → tensor, without the general path's objects:
            # the hot loop of a small model feels every microsecond.
            output = model(batch[0])
            if type(output) is torch.Tensor:
                return Evaluation(self.loss_fn(output, batch[1]), output, batch[1])
            return self._from_output(output, split_batch(batch, self.target_key), batch)
        call = split_batch(batch, self.target_key)
        if self._checked:
            return self._from_output(call.run(model), call, batch)
        check_batch(call)
        check_signature(model, call)
        with _first_batch("model", batch):
            evaluation = self._from_output(call.run(model), call, batch)
        _check_scalar(evaluation.loss, "the loss")
        self._checked = True
        return evaluation

    def _from_output(self, raw_output: Any, call: ModelCall, batch: Any) -> Evaluation:
        output = read_output(raw_output)
        if output.loss is not None:
            loss = output.loss
        elif output.prediction is not None and call.targets is not None:
            loss = self.loss_fn(output.prediction, call.targets)
        else:
            raise BatchError(f"the model returned no loss and the batch has no targets to apply "
                             f"the loss to (data.target_key={self.target_key!r}); the batch was "
                             f"{describe(batch)}")
        return Evaluation(loss, output.prediction, call.targets)

    def _user_step(self, model: Callable[..., Any], batch: Any) -> Evaluation:
        if self._checked:
            result = self.step_fn(model, batch)  # type: ignore[misc]
        else:
            with _first_batch("train.step_fn", batch):
                result = self.step_fn(model, batch)  # type: ignore[misc]
        extras: dict[str, Any] = {}
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping):
            result, extras = result
        if not self._checked:
            _check_scalar(result, "train.step_fn's loss")
            self._checked = True
        return Evaluation(result, None, None, dict(extras))


@contextmanager
def _first_batch(key: str, batch: Any) -> Iterator[None]:
    """The first batch's failure in the user's model, loss or step_fn as one line (exit 2).

    On the first batch such an error almost always means that the config and the data do
    not fit each other (a layer size, the number of classes, a loss argument, eval.task);
    the line that raised points at the fix. Later batches keep their tracebacks.
    """
    try:
        yield
    except (ConfigError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:
        raise BatchError(f"the first batch failed ({failure_summary(exc)}); check that model.args, "
                         f"loss.args and eval.task fit the data, whose batches are {describe(batch)}",
                         key) from None


def _check_scalar(loss: Any, what: str) -> None:
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point()):
        raise BatchError(f"expected {what} to be a floating-point scalar tensor, got {describe(loss)}",
                         "train.step_fn" if what.startswith("train.step_fn") else "loss.name")


def token_weights(micro_batches: Sequence[Any], target_key: str, label_shift: int, world_size: int,
                  reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: torch.device
                  ) -> torch.Tensor | None:
    """Per micro-batch factors that make a step's gradient the mean over all its counted tokens.

    A language model's loss is a mean over the tokens it counts (labels other than -100),
    and padding makes that count differ from micro-batch to micro-batch and rank to rank.
    Scaling micro-batch i's loss by ``n_i × world_size / N`` (N: the step's count over every
    micro-batch and rank; DDP then averages over the ranks) weights every token alike, so
    2 ranks × B train exactly as 1 rank × 2B, and accumulation as one big batch. One
    collective of a single number per step; None when the batches carry no targets.
    """
    counts = []
    for batch in micro_batches:
        targets = split_batch(batch, target_key).targets
        if not isinstance(targets, torch.Tensor):
            return None
        counts.append(counted_targets(targets, label_shift))
    local = torch.stack(counts).to(device=device, dtype=torch.float64)
    total = reduce_sum(local.sum()) if world_size > 1 else local.sum()
    return (local * world_size / total.clamp(min=1.0)).float()
