"""The Trainer's public step and callbacks: a loop of train_step() is fit(), and every hook is
called where and as often as the callback protocol says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import read_metrics
from ddp_train import Trainer
from ddp_train.config import load_config
from ddp_train.training.callbacks import Callback, StepResult

COMMON = ["data.name=synthetic_classification", "data.args.n_samples=200", "data.batch_size=8",
          "model.args.hidden_sizes=[16]", "model.args.dropout=0.1", "logging.progress=none",
          "logging.system_metrics=false", "optim.lr=0.01", "schedule.name=cosine",
          "schedule.warmup_steps=3", "train.clip_grad_norm=0.5"]


def _config(workdir: Path, name: str, *extra: str) -> Any:
    return load_config(None, [*COMMON, f"run.output_dir={workdir}", f"run.name={name}", *extra])


@pytest.mark.parametrize("accum", [1, 3])
def test_a_loop_of_train_step_is_fit(workdir: Path, accum: int) -> None:
    """train_step() over step_batches() ends bitwise where fit() does, across epoch ends, with
    accumulation, clipping, dropout and an LR schedule; each StepResult says what happened.

    The loop validates where fit() does (every epoch end, and the last step): iterating the
    validation loader draws from the global RNG, which dropout draws from too."""
    steps = 45  # 160 training samples / (8 × accum) per epoch: several epochs either way
    extra = (f"train.grad_accum_steps={accum}", f"train.max_steps={steps}", "train.epochs=100")
    with Trainer(_config(workdir, "fit", *extra)) as trainer:
        trainer.fit()
        fitted = {k: v.clone() for k, v in trainer.module.state_dict().items()}
        fit_progress = trainer.progress.state_dict()
    with Trainer(_config(workdir, "loop", *extra)) as trainer:
        trainer.module.train()
        batches = trainer.step_batches()
        results: list[StepResult] = []
        lrs = []
        for step in range(1, steps + 1):
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
            results.append(trainer.train_step(next(batches)))
            if results[-1].epoch_end or step == steps:
                assert "val/loss" in trainer.evaluate()
        looped = trainer.module.state_dict()
        progress = trainer.progress
        assert progress.global_step == steps == fit_progress["global_step"]
        assert (progress.epoch, progress.step_in_epoch) == (fit_progress["epoch"], fit_progress["step_in_epoch"])
        epoch_ends = [i + 1 for i, result in enumerate(results) if result.epoch_end]
        assert epoch_ends == list(range(trainer.steps_per_epoch, steps + 1, trainer.steps_per_epoch))
        assert [result.epoch for result in results] == [i // trainer.steps_per_epoch for i in range(steps)]
        assert [result.lr for result in results] == lrs
        assert not any(result.skipped for result in results)
        assert all(torch.isfinite(result.loss) and result.grad_norm > 0 for result in results)
    for key, value in fitted.items():
        assert torch.equal(value, looped[key]), key


def test_train_step_refuses_the_wrong_number_of_micro_batches(workdir: Path) -> None:
    with Trainer(_config(workdir, "wrong", "train.grad_accum_steps=2")) as trainer:
        batches = next(trainer.step_batches())
        assert len(batches) == 2
        with pytest.raises(ValueError, match="expected 2 micro-batches"):
            trainer.train_step(batches[:1])


class _Recorder(Callback):
    """Records every hook call, with what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.calls.append(("fit_start", trainer.progress.global_step))

    def on_step_start(self, trainer: Trainer) -> None:
        self.calls.append(("step_start", trainer.progress.global_step))

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        self.calls.append(("step_end", trainer.progress.global_step))

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.calls.append(("validation_end", (trainer.progress.global_step, metrics["val/loss"])))

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        self.calls.append(("checkpoint", (trainer.progress.global_step, path)))

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self.calls.append(("fit_end", summary))


class _OnlyStepEnd:
    """A callback that is not a Callback subclass and has one hook."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        self.steps.append(trainer.progress.global_step)


def test_callbacks_are_called_at_every_hook_in_order(workdir: Path) -> None:
    recorder, partial = _Recorder(), _OnlyStepEnd()
    config = _config(workdir, "hooks", "train.epochs=2", "eval.every_steps=7", "checkpoint.every_steps=10")
    with Trainer(config, callbacks=[recorder, partial]) as trainer:
        summary = trainer.fit()
        total = trainer.total_steps
    names = [name for name, _ in recorder.calls]
    assert names[0] == "fit_start" and names[-1] == "fit_end"
    assert recorder.calls[-1][1] == summary
    step_calls = [(name, value) for name, value in recorder.calls if name.startswith("step_")]
    # Each step: a start before it (progress not yet advanced), an end after it.
    assert step_calls == [call for step in range(total)
                          for call in (("step_start", step), ("step_end", step + 1))]
    assert partial.steps == list(range(1, total + 1))
    validations = [value for name, value in recorder.calls if name == "validation_end"]
    logged = [(r["step"], r["val/loss"]) for r in read_metrics(workdir / "hooks") if "val/loss" in r]
    assert validations == logged and len(validations) >= 3
    checkpoints = [value for name, value in recorder.calls if name == "checkpoint"]
    assert [step for step, _ in checkpoints][:2] == [10, 20]
    assert all(path.name == f"step_{step:08d}.pt" for step, path in checkpoints)
    assert checkpoints[-1][1].exists()
