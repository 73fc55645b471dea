"""What a log step adds to the training loss and LR: throughput, MFU, system metrics and
the diagnostics asked for (``train/...``, ``sys/...``, ``grad_norm/...``, ``act/...``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ddp_train.config import DebugConfig, LoggingConfig
from ddp_train.observability.diagnostics import ActivationStats, GradNormWatch, layer_grad_norms
from ddp_train.observability.system_metrics import SystemMonitor, peak_flops, training_flops_per_sample


def tokens_per_sample(batch: Any, task: str) -> int:
    """Tokens a sample of ``batch`` carries: the sequence length for language models, else 1.

    The inputs of a pair, or a mapping's ``input_ids`` (else its first tensor).
    """
    if task != "language_model":
        return 1
    inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(inputs, Mapping):
        inputs = inputs.get("input_ids", next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None))
    if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2:
        return int(inputs.shape[1])
    return 1


class TrainMetrics:
    """The metrics of a log step beyond the loss and LR, and the diagnostics behind them.

    Expensive diagnostics are gathered only on the steps that are logged: the trainer calls
    :meth:`capture` before each step and :meth:`after_backward` once its gradients are
    final. System metrics are read on rank 0 only (the only rank that logs).
    """

    def __init__(self, module: nn.Module, device: torch.device, world_size: int, is_main: bool,
                 logging: LoggingConfig, debug: DebugConfig) -> None:
        self.world_size = world_size
        self.num_params = sum(p.numel() for p in module.parameters())
        self.tokens_per_sample: int | None = None
        """Set by the trainer from the first batch (1 unless the task is language modelling)."""
        self._peak_flops = peak_flops(device, logging.peak_flops)
        self.system = SystemMonitor(device) if is_main and logging.system_metrics else None
        self.grad_watch = GradNormWatch(debug.grad_norm_low, debug.grad_norm_high)
        self.activation_stats = ActivationStats(module) if debug.activation_stats else None
        self._layer_grad_norms = debug.layer_grad_norms
        self.diagnostics = debug.activation_stats or debug.layer_grad_norms
        """Whether any diagnostic is gathered on logged steps (else :meth:`capture` and
        :meth:`after_backward` have nothing to do and need not be called)."""
        self._capturing = False
        self._layer_norms: dict[str, float] = {}

    def capture(self, enabled: bool) -> None:
        """Whether the next step is logged, so that its diagnostics are gathered."""
        self._capturing = enabled
        if self.activation_stats is not None:
            self.activation_stats.capture = enabled

    def after_backward(self, module: nn.Module) -> None:
        """Read the per-parameter gradient norms of a captured step (a collective under FSDP)."""
        if self._capturing and self._layer_grad_norms:
            self._layer_norms = layer_grad_norms(module)

    def add_throughput(self, record: dict[str, Any], samples_per_s: float) -> None:
        """Add samples/s (all ranks together), tokens/s and MFU to a log step's ``record``."""
        record["train/samples_per_s"] = samples_per_s
        tokens = self.tokens_per_sample or 1
        if tokens > 1:
            record["train/tokens_per_s"] = samples_per_s * tokens
        if self._peak_flops is not None:
            # Model FLOPs utilisation: the 6·N·tokens estimate of a training step's FLOPs.
            achieved = training_flops_per_sample(self.num_params, tokens) * samples_per_s
            record["train/mfu"] = achieved / (self._peak_flops * self.world_size)

    def add_diagnostics(self, record: dict[str, Any], grad_norm: float) -> None:
        """Add system metrics and the captured diagnostics to ``record``; warn of a vanishing or
        exploding gradient norm."""
        if self.system is not None:
            record.update(self.system.read())
            record.update(self.system.peak_memory())
        record.update(self._layer_norms)
        if self.activation_stats is not None:
            record.update(self.activation_stats.pop())
        self.grad_watch.check(grad_norm, int(record["step"]))

    def close(self) -> None:
        """Remove the activation hooks from the model."""
        if self.activation_stats is not None:
            self.activation_stats.remove()
