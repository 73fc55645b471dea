"""Gradient and activation diagnostics, gathered only on log steps to keep steps cheap."""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from torch import nn

log = logging.getLogger("ddp_train")


def layer_grad_norms(module: nn.Module) -> dict[str, float]:
    """``grad_norm/<parameter name>`` for every parameter that has a gradient.

    A sharded (FSDP) gradient's norm is reduced over its shards: a collective, so every
    rank calls this on the same steps.
    """
    # No DTensor exists unless FSDP imported its module: checking sys.modules spares every
    # other run that import (about a second).
    dtensor = sys.modules.get("torch.distributed.tensor")
    norms = {}
    for name, param in module.named_parameters():
        if param.grad is not None:
            norm = param.grad.detach().norm()
            sharded = dtensor is not None and isinstance(norm, dtensor.DTensor)
            norms[f"grad_norm/{name}"] = (norm.full_tensor() if sharded else norm).item()
    return norms


class ActivationStats:
    """Forward hooks on every leaf module that record its output's mean, std and absmax.

    The hooks cost a few reductions per module, so they only record while ``capture`` is
    set (the trainer sets it for the steps it logs).
    """

    def __init__(self, module: nn.Module) -> None:
        self.capture = False
        self._stats: dict[str, torch.Tensor] = {}
        self._handles = [child.register_forward_hook(self._hook(name))
                         for name, child in module.named_modules()
                         if name and not any(True for _ in child.children())]

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if self.capture and isinstance(output, torch.Tensor) and output.is_floating_point():
                detached = output.detach().float()
                self._stats[name] = torch.stack([detached.mean(), detached.std(), detached.abs().max()])
        return record

    def pop(self) -> dict[str, float]:
        """The recorded statistics as ``act/<module>/{mean,std,absmax}``; clears them."""
        metrics: dict[str, float] = {}
        for name, values in self._stats.items():
            mean, std, absmax = values.tolist()
            metrics.update({f"act/{name}/mean": mean, f"act/{name}/std": std, f"act/{name}/absmax": absmax})
        self._stats.clear()
        return metrics

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class GradNormWatch:
    """Warns when the global gradient norm suggests vanishing or exploding gradients."""

    MAX_WARNINGS = 5

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high
        self._warnings = 0

    def check(self, grad_norm: float, step: int) -> None:
        """Warn (a few times at most: a log full of the same line helps nobody)."""
        if self._warnings >= self.MAX_WARNINGS or not (grad_norm < self.low or grad_norm > self.high):
            return
        self._warnings += 1
        kind = ("vanishing: below debug.grad_norm_low" if grad_norm < self.low
                else "exploding: above debug.grad_norm_high")
        suffix = " (further warnings suppressed)" if self._warnings == self.MAX_WARNINGS else ""
        log.warning("step %d: global gradient norm %.3g looks %s; check the LR, the init and "
                    "train.clip_grad_norm%s", step, grad_norm, kind, suffix)
