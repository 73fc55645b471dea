"""Where training stands, and the training loss between two reads: state a restart restores."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ddp_train.errors import TrainingFailed


@dataclass
class TrainingProgress:
    """Where training stands; saved in every checkpoint (plain types only)."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    sample_offset: int = 0
    """Samples of the current epoch trained on, over all ranks: where a resumed run continues."""
    epochs_completed: int = 0
    status: str = "running"
    last_val_step: int = -1
    last_val: dict[str, Any] = field(default_factory=dict)
    train_loss_since_val: float | None = None
    wall_time_s: float = 0.0
    nonfinite_skips: int = 0
    nonfinite_in_a_row: int = 0

    def step_done(self, global_batch: int, epoch_end: bool) -> None:
        """Count one optimizer step over ``global_batch`` samples; ``epoch_end``: it was the epoch's last."""
        self.global_step += 1
        self.step_in_epoch += 1
        self.sample_offset += global_batch
        if epoch_end:
            self.epochs_completed += 1
            self.epoch += 1
            self.step_in_epoch = self.sample_offset = 0

    def summary(self, status: str, world_size: int, best: dict[str, Any]) -> dict[str, Any]:
        """``summary.json``: how the run ended (``status``), where, its last and ``best`` validation."""
        summary: dict[str, Any] = {
            "status": status, "global_step": self.global_step, "epochs_completed": self.epochs_completed,
            "world_size": world_size, "final": self.last_val, "best": best,
            "wall_time_s": self.wall_time_s}
        train_loss, val_loss = self.train_loss_since_val, self.last_val.get("val/loss")
        if train_loss is not None and val_loss is not None:
            # The over/underfitting signal: a large positive gap means the model fits the
            # training set much better than unseen data.
            summary["train_val_gap"] = {"train/loss": train_loss, "val/loss": val_loss,
                                        "gap": val_loss - train_loss}
        return summary

    def state_dict(self) -> dict[str, Any]:
        """Every field, as plain types."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the fields saved by :meth:`state_dict`; ValueError for fields it does not have."""
        unknown = set(state) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown progress fields {sorted(unknown)}")
        for key, value in state.items():
            setattr(self, key, value)


class RunningLoss:
    """This rank's training loss summed since it was last read, in two independent windows.

    Window 0 runs from one log step to the next, window 1 from one validation to the next.
    The sums stay on the device in float64 (no host sync in the hot loop, no rounding drift
    over a long window) and are read as the mean micro-batch loss over all ranks.
    """

    LOG, VALIDATION = 0, 1

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.micro_batches = [0, 0]

    def add(self, step_loss: torch.Tensor, micro_batches: int) -> None:
        """Add one optimizer step's summed micro-batch loss (no host sync) to both windows."""
        # A float32 loss is promoted by the in-place add exactly as .double() would.
        self.sums += step_loss
        self.micro_batches[0] += micro_batches
        self.micro_batches[1] += micro_batches

    def pending(self, window: int) -> bool:
        """Whether this rank added anything to ``window`` since it was last read."""
        return self.micro_batches[window] > 0

    def read(self, window: int, reduce_sum: Callable[[torch.Tensor], torch.Tensor], step: int
             ) -> float | None:
        """The mean micro-batch loss of ``window`` over all ranks (a collective), then reset it.

        None when no rank added a step to it (every step skipped as non-finite). ``step``
        names the optimizer step in the error raised for a non-finite mean.
        """
        count = torch.tensor(float(self.micro_batches[window]), dtype=torch.float64,
                             device=self.sums.device)
        totals = reduce_sum(torch.stack([self.sums[window], count]))
        self.sums[window] = 0.0
        self.micro_batches[window] = 0
        if totals[1].item() == 0:
            return None
        mean = (totals[0] / totals[1]).item()
        if not math.isfinite(mean):
            # Every rank sees the same reduced value, so every rank raises together.
            raise TrainingFailed(f"non-finite training loss ({mean}) at or before optimizer step "
                                 f"{step}: lower optim.lr, set train.clip_grad_norm, or check the data")
        return mean

    def state_dict(self) -> dict[str, Any]:
        """This rank's sums (on CPU) and micro-batch counts."""
        return {"loss_sums": self.sums.cpu(), "micro_since": list(self.micro_batches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.sums.copy_(state["loss_sums"])
        self.micro_batches = list(state["micro_since"])


class RunningExtras:
    """The values a ``train.step_fn`` returns besides its loss, summed since the last log step.

    Read as ``train/<name>`` means over every micro-batch of every rank. Logging only: a
    restart starts the window afresh.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.micro_batches = 0

    def add(self, values: dict[str, Any]) -> None:
        """Add one micro-batch's values."""
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.micro_batches += 1

    def read(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: torch.device
             ) -> dict[str, float]:
        """The means since the last read over all ranks (a collective when there are any), then reset."""
        if not self.sums:
            return {}  # no step_fn values: every rank alike (one function on the same data)
        names = sorted(self.sums)
        local = torch.tensor([self.sums[name] for name in names] + [float(self.micro_batches)],
                             dtype=torch.float64, device=device)
        totals = reduce_sum(local).tolist()
        self.sums, self.micro_batches = {}, 0
        return {f"train/{name}": total / max(totals[-1], 1.0) for name, total in zip(names, totals)}
