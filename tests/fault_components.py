"""Factories for the fault-injection suite, named in configs as 'fault_components:...'."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from batch_components import LossReturningMLP


class AttemptLoggingMLP(LossReturningMLP):
    """:class:`LossReturningMLP` that logs each training forward's sample ids per restart attempt.

    With ``FAULT_ID_LOG`` set, every training forward appends one line of ids to
    ``FAULT_ID_LOG.attempt<a>.rank<r>`` (``a``: torchrun's restart count), so line ``k`` of
    an attempt's file is the ``k``-th step that attempt trained; ``seconds_per_forward``
    slows each forward down so that a test can interrupt a run mid-epoch.
    """

    def __init__(self, in_features: int, out_features: int, seconds_per_forward: float) -> None:
        super().__init__(in_features, out_features)
        self.seconds_per_forward = seconds_per_forward

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        log = os.environ.get("FAULT_ID_LOG")
        if log and self.training and ids is not None:
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            with Path(f"{log}.attempt{attempt}.rank{os.environ.get('RANK', '0')}").open("a") as file:
                file.write(" ".join(str(i) for i in ids.tolist()) + "\n")
        time.sleep(self.seconds_per_forward)
        return super().forward(x, labels)


def attempt_logging_mlp(in_features: int = 8, out_features: int = 3,
                        seconds_per_forward: float = 0.0) -> AttemptLoggingMLP:
    """The factory of :class:`AttemptLoggingMLP`."""
    return AttemptLoggingMLP(in_features, out_features, seconds_per_forward)


def read_attempt_ids(log: Path, attempt: int, steps: int | None = None) -> list[int]:
    """The sample ids attempt ``attempt`` trained on, over all its ranks; with ``steps``, only
    those of its first ``steps`` optimizer steps (one forward per step: no accumulation)."""
    ids: list[int] = []
    for path in sorted(log.parent.glob(f"{log.name}.attempt{attempt}.rank*")):
        lines = path.read_text().splitlines()
        ids += [int(token) for line in lines[:steps] for token in line.split()]
    return ids
