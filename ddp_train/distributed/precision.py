"""Mixed-precision policy: the autocast context, an optional gradient scaler, and its state.

It sits beside the strategies because they depend on it: FSDP casts parameters and
reduces gradients in the dtypes named here, and cannot combine with fp16's scaler.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

from ddp_train.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtype of each precision name (``train.precision``, ``train.fsdp.reduce_dtype``)."""
_NO_AUTOCAST = contextlib.nullcontext()  # reusable: one object for every fp32 step


class Precision:
    """fp32 (no autocast), bf16 (autocast), or fp16 (autocast + GradScaler, CUDA only)."""

    def __init__(self, kind: str, device: torch.device) -> None:
        if kind == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision", "expected fp32 or bf16 on CPU: fp16 needs CUDA "
                                                 "(its gradient scaler is for CUDA)")
        self.kind = kind
        self.device_type = device.type
        self.dtype = None if kind == "fp32" else DTYPES[kind]
        """The autocast dtype; None for fp32 (no autocast)."""
        self.scaler = torch.amp.GradScaler("cuda") if kind == "fp16" else None

    def autocast(self) -> ContextManager[Any]:
        """Context for the forward pass and the loss."""
        if self.dtype is None:
            return _NO_AUTOCAST
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass, through the scaler under fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true scale (before clipping or measuring them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer step; under fp16 skipped when gradients overflowed, and the scale updated."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (empty without a scaler)."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scaler's state."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
