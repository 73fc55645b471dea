"""The health check before every optimizer step: a non-finite loss or gradient norm stops
training or skips the step, on every rank alike (``train.nonfinite``)."""

from __future__ import annotations

import logging
import math

import torch

from ddp_train.config import LoopConfig
from ddp_train.errors import TrainingFailed
from ddp_train.training.progress import TrainingProgress

log = logging.getLogger("ddp_train")


class NonfiniteGuard:
    """Whether a step may update the weights; the same answer on every rank.

    The gradient norm is computed from gradients the strategy has already reduced, so it is
    identical on every rank, and a non-finite loss on any rank makes it non-finite
    everywhere: deciding on it needs no extra collective. The loss itself can decide
    alone only at world size 1. Under fp16 the grad scaler owns overflowing gradients
    (it skips the step and lowers the scale), so only the loss is watched.
    """

    def __init__(self, config: LoopConfig, world_size: int, has_scaler: bool) -> None:
        self.config = config
        self._watch_loss = world_size == 1
        self._watch_norm = not has_scaler

    def allows(self, step_loss: torch.Tensor, grad_norm: torch.Tensor, progress: TrainingProgress) -> bool:
        """True when the step about to be taken (``progress.global_step + 1``) may update the weights.

        A refused step is counted in ``progress``; under ``train.nonfinite=stop``, or after
        ``train.max_nonfinite_skips`` refusals in a row, it raises TrainingFailed instead.
        """
        # Scalars read on the host with .item(): no tensor ops; on CUDA the first read is the
        # step's one sync.
        bad = []
        if self._watch_loss and not math.isfinite(step_loss.item()):
            bad.append("loss")
        if self._watch_norm and not math.isfinite(grad_norm.item()):
            bad.append("gradient norm")
        if not bad:
            progress.nonfinite_in_a_row = 0
            return True
        what = " and ".join(bad)
        step = progress.global_step + 1
        progress.nonfinite_skips += 1
        progress.nonfinite_in_a_row += 1
        if self.config.nonfinite == "stop":
            raise TrainingFailed(f"non-finite {what} at optimizer step {step} (train.nonfinite=stop): "
                                 f"lower optim.lr, set train.clip_grad_norm, check the data, or "
                                 f"use train.nonfinite=skip")
        if progress.nonfinite_in_a_row >= self.config.max_nonfinite_skips:
            raise TrainingFailed(f"non-finite {what} at optimizer step {step}: "
                                 f"{progress.nonfinite_in_a_row} steps in a row skipped "
                                 f"(train.max_nonfinite_skips)")
        log.warning("non-finite %s at optimizer step %d: step skipped (%d so far)", what, step,
                    progress.nonfinite_skips)
        return False
