"""Built-in losses. A loss is a callable ``(outputs, targets) -> scalar`` averaged over the batch.

Validation turns the batch mean back into a sum (mean × batch size), so a user loss must
average over the samples of the batch, as every built-in does.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ddp_train.errors import ConfigError
from ddp_train.components.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOSSES = Registry("loss", "loss.name")

# The task a built-in loss implies, for eval.task=auto when the data set does not say.
LOSS_TASKS = {"cross_entropy": "classification", "mse": "regression", "l1": "regression",
              "smooth_l1": "regression"}


def _match_shape(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # A regression head of width 1 against 1-d targets is the common case; align it
    # instead of letting broadcasting silently compute a B×B loss.
    if outputs.shape != targets.shape and outputs.numel() == targets.numel():
        return outputs.reshape(targets.shape)
    return outputs


@LOSSES.register("cross_entropy")
def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    """Cross entropy over the last dimension; (B, T, C) sequence logits are flattened."""
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # (B, C) against (B,) needs no view (it would add an autograd node to every step).
        if outputs.dim() > 2 or targets.dim() > 1:
            outputs, targets = outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)
        return F.cross_entropy(outputs.float(), targets, label_smoothing=label_smoothing)
    return loss


@LOSSES.register("mse")
def mse() -> LossFn:
    """Mean squared error."""
    return lambda outputs, targets: F.mse_loss(_match_shape(outputs, targets).float(), targets.float())


@LOSSES.register("l1")
def l1() -> LossFn:
    """Mean absolute error."""
    return lambda outputs, targets: F.l1_loss(_match_shape(outputs, targets).float(), targets.float())


@LOSSES.register("smooth_l1")
def smooth_l1(beta: float = 1.0) -> LossFn:
    """Huber-like smooth L1 loss."""
    return lambda outputs, targets: F.smooth_l1_loss(_match_shape(outputs, targets).float(),
                                                     targets.float(), beta=beta)


@LOSSES.register("bce_with_logits")
def bce_with_logits() -> LossFn:
    """Binary cross entropy on logits (multi-label or binary targets)."""
    return lambda outputs, targets: F.binary_cross_entropy_with_logits(
        _match_shape(outputs, targets).float(), targets.float())


def build_loss(name: str, args: dict[str, Any]) -> LossFn:
    """A built-in loss made with ``args``, or a user's ``module:attr``.

    A user's attribute is either the loss itself (``fn(outputs, targets)``) or, when
    ``loss.args`` is given, a factory called with them that returns the loss.
    """
    factory = LOSSES.resolve(name)
    if ":" in name and not args:
        return factory
    try:
        return factory(**args)
    except TypeError as exc:
        raise ConfigError("loss.args", f"do not fit loss {name!r}: {exc}") from None
