"""Callbacks: code of yours that ``fit()`` calls at fixed points of training.

A callback is any object with some of the methods of :class:`Callback` (a subclass of it
that overrides what it needs, or any object with methods of those names); pass it in
``Trainer(config, callbacks=[...])``. Every rank calls its callbacks, in the order given.
``on_step_start`` and ``on_step_end`` run on every optimizer step, so they should be cheap;
read ``trainer.progress`` for where training stands.

```python
class PrintEveryHundred(Callback):
    def on_step_end(self, trainer, result):
        if trainer.progress.global_step % 100 == 0 and trainer.env.is_main:
            print(trainer.progress.global_step, result.loss.item(), result.lr)
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

if TYPE_CHECKING:
    from ddp_train.training.trainer import Trainer

HOOKS = ("on_fit_start", "on_step_start", "on_step_end", "on_validation_end", "on_checkpoint",
         "on_fit_end")
"""The methods a callback may have, in the order fit() reaches them."""


@dataclass(slots=True)
class StepResult:
    """What one optimizer step did (:meth:`Trainer.train_step`)."""

    loss: torch.Tensor
    """This rank's mean micro-batch loss, a 0-d tensor on the device (reading it syncs)."""
    grad_norm: torch.Tensor
    """The global gradient norm before clipping, the same on every rank (0-d, on the device)."""
    lr: float
    """The learning rate the step used (the first parameter group's)."""
    skipped: bool
    """True when the step updated nothing: its loss or gradient norm was not finite
    (``train.nonfinite=skip``)."""
    epoch: int
    """The epoch the step belongs to."""
    epoch_end: bool
    """True when the step was the last of its epoch."""


class Callback:
    """The callback protocol, with methods that do nothing: override what you need."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """At the start of ``fit()``, before the first step (``trainer.progress`` says where it resumes)."""

    def on_step_start(self, trainer: Trainer) -> None:
        """Before an optimizer step (and before its micro-batches are loaded)."""

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        """After an optimizer step, before it is logged and validated."""

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After a validation, with its ``val/...`` metrics (the same on every rank)."""

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        """After a checkpoint was saved to ``path`` (with async saving: handed to the writer)."""

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """At the end of ``fit()``, also when it failed, with the summary it returns."""


def _implements(callback: Any, hook: str) -> bool:
    """Whether ``callback`` has a method ``hook`` other than :class:`Callback`'s no-op."""
    return (callable(getattr(callback, hook, None))
            and getattr(type(callback), hook, None) is not getattr(Callback, hook))


class CallbackList:
    """The callbacks' methods, gathered per hook once, so that a step calls only what exists."""

    def __init__(self, callbacks: Sequence[Any]) -> None:
        self.callbacks = list(callbacks)
        self._hooks: dict[str, list[Callable[..., None]]] = {
            hook: [getattr(callback, hook) for callback in self.callbacks if _implements(callback, hook)]
            for hook in HOOKS}

    def call(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every callback that has it."""
        for method in self._hooks[hook]:
            method(*args)
