"""Validation metrics from sums, so that they are exact at any world size.

Each rank accumulates sums over its own shard of the validation set (no padding, no
sample twice); one all-reduce adds the sums; the metrics are computed from the totals.
A mean of per-rank means would weight ranks with fewer samples wrongly.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ddp_train.distributed.environment import DistEnv
from ddp_train.distributed.precision import Precision
from ddp_train.errors import ConfigError
from ddp_train.training.batches import IGNORE_INDEX, describe, samples_in
from ddp_train.training.loaders import to_device
from ddp_train.training.objective import Objective


class MetricAccumulator:
    """Sums for the loss and the task's metrics over the batches one rank sees.

    The loss is summed weighted by what it averages over: the batch's samples, or for a
    language model its counted tokens (labels other than -100), so that the mean over
    all ranks is the mean over the whole validation set, however it is split.
    """

    def __init__(self, task: str, device: torch.device, label_shift: int = 0) -> None:
        self.task = task
        self.device = device
        self.label_shift = label_shift
        # Σ loss × weight, Σ weight, samples; for a language model also correct and counted tokens.
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.confusion: torch.Tensor | None = None  # [target, prediction] counts
        self.regression: torch.Tensor | None = None  # per output: Σy, Σy², Σ(ŷ-y)², Σ|ŷ-y|, n

    def update(self, batch_loss: torch.Tensor, prediction: torch.Tensor | None, targets: Any,
               samples: int) -> None:
        """Add one batch of ``samples`` samples; ``batch_loss`` is the loss's mean over it."""
        language_model = self.task == "language_model" and isinstance(targets, torch.Tensor)
        if language_model:
            targets = targets[..., self.label_shift:] if self.label_shift else targets
            counted = targets != IGNORE_INDEX
            weight = counted.sum().double()
        else:
            weight = torch.tensor(float(samples), dtype=torch.float64, device=self.device)
        self.sums[0] += batch_loss.detach().double() * weight
        self.sums[1] += weight
        self.sums[2] += samples
        if prediction is None or targets is None:
            return  # the loss is all there is (a train.step_fn, or a model that returned only a loss)
        prediction = prediction.detach()
        if language_model:
            if self.label_shift:
                prediction = prediction[..., :-self.label_shift, :]
            correct = (prediction.argmax(dim=-1) == targets) & counted
            self.sums[3] += correct.sum()
            self.sums[4] += weight
        elif self.task == "classification":
            _check_classes(prediction, targets)
            classes = prediction.shape[-1]
            predicted = prediction.reshape(-1, classes).argmax(dim=-1)
            labels = targets.reshape(-1).long()
            keep = labels != IGNORE_INDEX
            pairs = labels[keep] * classes + predicted[keep]
            counts = torch.bincount(pairs, minlength=classes * classes).reshape(classes, classes)
            self.confusion = counts if self.confusion is None else self.confusion + counts
        elif self.task == "regression":
            y = targets.detach().double().reshape(samples, -1)
            y_hat = prediction.double().reshape(samples, -1)
            if y.shape != y_hat.shape:
                raise ConfigError("eval.task", f"regression compares predictions with targets of the "
                                               f"same shape, got {describe(prediction)} against "
                                               f"{describe(targets)}; set eval.task to fit the data")
            stats = torch.stack([y.sum(0), (y * y).sum(0), ((y_hat - y) ** 2).sum(0),
                                 (y_hat - y).abs().sum(0), torch.full_like(y[0], samples)])
            self.regression = stats if self.regression is None else self.regression + stats

    def compute(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """Reduce the sums over ranks with ``reduce_sum`` and return ``val/...`` metrics."""
        parts = [self.sums]
        extra = self.confusion if self.confusion is not None else self.regression
        if extra is not None:
            parts.append(extra.double().reshape(-1))
        # One collective for everything; float64 holds counts exactly up to 2**53.
        totals = reduce_sum(torch.cat(parts))
        loss_sum, weight, samples, correct, tokens = totals[:5].tolist()
        metrics: dict[str, Any] = {"val/loss": loss_sum / max(weight, 1.0), "val/samples": int(samples)}
        if extra is not None:
            rest = totals[5:].reshape(extra.shape).cpu()
            if self.task == "regression":
                metrics.update(_regression_metrics(rest))
            else:
                metrics.update(_classification_metrics(rest.long()))
        if self.task == "language_model":
            if tokens > 0:
                metrics["val/accuracy"] = correct / tokens
            metrics["val/perplexity"] = math.exp(min(metrics["val/loss"], 700.0))
        return metrics


def _check_classes(prediction: torch.Tensor, targets: Any) -> None:
    """ConfigError unless the targets are class indices below the prediction's last dimension."""
    ok = (isinstance(targets, torch.Tensor) and not targets.is_floating_point() and prediction.dim() >= 1
          and targets.numel() * prediction.shape[-1] == prediction.numel())
    if ok:
        labels = targets[targets != IGNORE_INDEX]
        ok = labels.numel() == 0 or (int(labels.min()) >= 0 and int(labels.max()) < prediction.shape[-1])
    if not ok:
        raise ConfigError("eval.task", f"classification expects integer class indices in [0, "
                                       f"{prediction.shape[-1] if prediction.dim() else 0}) and one row "
                                       f"of scores per target, got {describe(prediction)} against "
                                       f"{describe(targets)}; set eval.task to fit the data")


def _classification_metrics(confusion: torch.Tensor) -> dict[str, Any]:
    total = confusion.sum().item()
    correct = confusion.diagonal().sum().item()
    metrics: dict[str, Any] = {"val/accuracy": correct / max(total, 1)}
    true_pos = confusion.diagonal().double()
    predicted = confusion.sum(0).double()
    actual = confusion.sum(1).double()
    # Macro averages over the classes present in the targets or the predictions (as
    # scikit-learn does over the labels it sees); a 0/0 ratio counts as 0.
    present = (actual + predicted) > 0
    precision = torch.where(predicted > 0, true_pos / predicted.clamp(min=1), torch.zeros_like(true_pos))
    recall = torch.where(actual > 0, true_pos / actual.clamp(min=1), torch.zeros_like(true_pos))
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp(min=1e-300),
                     torch.zeros_like(true_pos))
    metrics["val/precision_macro"] = precision[present].mean().item()
    metrics["val/recall_macro"] = recall[present].mean().item()
    metrics["val/f1_macro"] = f1[present].mean().item()
    metrics["val/confusion_matrix"] = confusion.tolist()
    return metrics


def _regression_metrics(stats: torch.Tensor) -> dict[str, float]:
    sum_y, sum_y2, sse, sae, count = stats
    elements = count.sum().item()
    # Total sum of squares per output around its own mean; R² is variance-weighted over
    # outputs (scikit-learn's multioutput='variance_weighted'; plain R² for one output).
    sst = (sum_y2 - sum_y * sum_y / count.clamp(min=1)).sum().item()
    return {"val/mse": sse.sum().item() / max(elements, 1),
            "val/mae": sae.sum().item() / max(elements, 1),
            "val/r2": 1.0 - sse.sum().item() / sst if sst > 0 else float("nan")}


@torch.no_grad()
def evaluate(module: nn.Module, batches: Iterable[tuple[Any, bool]], objective: Objective, task: str,
             precision: Precision, env: DistEnv, label_shift: int = 0) -> dict[str, Any]:
    """``val/...`` metrics of ``module`` over this rank's ``(batch, counts)`` pairs, reduced over
    every rank (a collective); batches with ``counts`` False are run but not counted."""
    was_training = module.training
    module.eval()
    accumulator = MetricAccumulator(task, env.device, label_shift)
    move = env.device.type != "cpu"
    for batch, counts in batches:
        if move:
            batch = to_device(batch, env.device)
        with precision.autocast():
            result = objective(module, batch)
        if counts:
            prediction = result.prediction.float() if result.prediction is not None else None
            accumulator.update(result.loss.float(), prediction, result.targets, samples_in(batch))
    module.train(was_training)
    return accumulator.compute(env.all_reduce_sum)
