"""A user's own factories, named in configs as 'user_components:...' (tests/ is on PYTHONPATH)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset


def tiny_mlp(in_features: int = 8, out_features: int = 3, hidden: int = 16) -> nn.Module:
    """A small MLP without dropout or batch norm (equivalence tests need neither)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, out_features))


def blobs(n_train: int = 256, n_val: int = 101, in_features: int = 8, classes: int = 3,
          seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Separable-ish Gaussian blobs as plain TensorDatasets (no hints, no task attribute)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, in_features, generator=generator) * 2
    def make(n: int) -> TensorDataset:
        labels = torch.randint(0, classes, (n,), generator=generator)
        inputs = centres[labels] + torch.randn(n, in_features, generator=generator)
        return TensorDataset(inputs, labels)
    return make(n_train), make(n_val)


def nan_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A loss that becomes NaN from the 3rd call on."""
    nan_loss.calls = getattr(nan_loss, "calls", 0) + 1  # type: ignore[attr-defined]
    loss = nn.functional.cross_entropy(outputs, targets)
    return loss * float("nan") if nan_loss.calls >= 3 else loss  # type: ignore[attr-defined]


def rank1_crashes(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy, except that rank 1 raises on its 5th call (a user bug on one rank)."""
    rank1_crashes.calls = getattr(rank1_crashes, "calls", 0) + 1  # type: ignore[attr-defined]
    if os.environ.get("RANK") == "1" and rank1_crashes.calls == 5:  # type: ignore[attr-defined]
        raise RuntimeError("user loss exploded on rank 1")
    return nn.functional.cross_entropy(outputs, targets)


def not_a_module() -> int:
    """A 'model factory' that returns the wrong thing."""
    return 42


NOT_CALLABLE = 3


def killer_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy; on the first attempt of a torchrun job, rank KILL_RANK SIGKILLs itself
    at its KILL_AT-th call (training and validation calls both count)."""
    killer_loss.calls = getattr(killer_loss, "calls", 0) + 1  # type: ignore[attr-defined]
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if (first_attempt and os.environ.get("RANK") == os.environ.get("KILL_RANK")
            and killer_loss.calls == int(os.environ.get("KILL_AT", "-1"))):  # type: ignore[attr-defined]
        Path(f"killed-rank{os.environ['RANK']}").write_text(str(killer_loss.calls))  # type: ignore[attr-defined]
        os.kill(os.getpid(), signal.SIGKILL)
    return nn.functional.cross_entropy(outputs, targets)


def slow_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy that takes at least 10 ms: gives a test time to signal a running job."""
    time.sleep(0.01)
    return nn.functional.cross_entropy(outputs, targets)


def sometimes_nan_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy, NaN on every 7th training call (validation, without grad, is never NaN)."""
    loss = nn.functional.cross_entropy(outputs, targets)
    if not torch.is_grad_enabled():
        return loss
    sometimes_nan_loss.calls = getattr(sometimes_nan_loss, "calls", 0) + 1  # type: ignore[attr-defined]
    return loss * float("nan") if sometimes_nan_loss.calls % 7 == 0 else loss  # type: ignore[attr-defined]


def rank1_nan_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy; on rank 1 only, NaN on every 5th training call."""
    loss = nn.functional.cross_entropy(outputs, targets)
    if not torch.is_grad_enabled() or os.environ.get("RANK") != "1":
        return loss
    rank1_nan_loss.calls = getattr(rank1_nan_loss, "calls", 0) + 1  # type: ignore[attr-defined]
    return loss * float("nan") if rank1_nan_loss.calls % 5 == 0 else loss  # type: ignore[attr-defined]


def linear(in_features: int = 8, out_features: int = 3) -> nn.Module:
    """Multinomial logistic regression: with cross entropy, a convex problem."""
    return nn.Linear(in_features, out_features)


def onehot_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Least-squares classification: MSE between the outputs and one-hot targets.

    With :func:`linear` a convex quadratic, on which plain SGD diverges above a known LR.
    """
    return nn.functional.mse_loss(outputs, nn.functional.one_hot(targets, outputs.shape[-1]).float())


def wide_mlp(in_features: int = 32, out_features: int = 4, hidden: int = 256, depth: int = 2) -> nn.Module:
    """A Linear-heavy MLP (nearly all of its bytes are Linear weights): export and int8 tests."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, out_features))


class BranchOnValues(nn.Module):
    """Python control flow on a tensor's values: torch.export cannot capture it."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


def branchy(in_features: int = 8, out_features: int = 3) -> nn.Module:
    """A model that branches on its input's values (unexportable by torch.export)."""
    return BranchOnValues(in_features, out_features)


class SvdHead(nn.Module):
    """Uses an operator (SVD) that torch.export captures but ONNX has no translation for."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) @ torch.linalg.svd(self.linear.weight @ self.linear.weight.T)[0]


def svd_model(in_features: int = 8, out_features: int = 3) -> nn.Module:
    """A model with an operator ONNX cannot express."""
    return SvdHead(in_features, out_features)
