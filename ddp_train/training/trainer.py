"""The Trainer: config → launcher environment → parts → strategy → loop → checkpoints and logs.

Read it top to bottom: ``__init__`` builds everything in data-flow order, :meth:`Trainer.fit`
runs optimizer steps (:meth:`Trainer.train_step`) epoch after epoch, validates, and writes
the run directory on rank 0.
"""

from __future__ import annotations

import copy
import gc
import logging
import platform
import time
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ddp_train.checkpoint.atomic import atomic_write
from ddp_train.checkpoint.run_directory import RunDirectory
from ddp_train.checkpoint.store import FORMAT_VERSION
from ddp_train.components.losses import LossFn
from ddp_train.components.optimizers import build_optimizer, build_schedule
from ddp_train.components.parts import PartsBuilder
from ddp_train.components.weights import apply_init, apply_norm
from ddp_train.config import TrainConfig, config_to_dict, config_to_yaml
from ddp_train.distributed.precision import Precision
from ddp_train.distributed.preemption import PreemptionWatch
from ddp_train.distributed.strategy import build_strategy, setup_environment
from ddp_train.errors import ConfigError, TrainingFailed, first_line
from ddp_train.observability.profiling import StepProfiler
from ddp_train.observability.sinks import MetricSink, require_tensorboard, run_sinks
from ddp_train.observability.train_metrics import TrainMetrics, tokens_per_sample
from ddp_train.training.callbacks import CallbackList, StepResult
from ddp_train.training.early_stopping import EarlyStopping
from ddp_train.training.health import NonfiniteGuard
from ddp_train.training.batches import label_shift
from ddp_train.training.loaders import build_loaders, step_groups, to_device
from ddp_train.training.metrics import evaluate
from ddp_train.training.objective import Objective, token_weights
from ddp_train.training.progress import RunningExtras, RunningLoss, TrainingProgress
from ddp_train.training.resume import find_resume_state, warn_config_changes
from ddp_train.training.rng import capture_rng, configure_determinism, restore_rng, seed_everything
from ddp_train.version import __version__

log = logging.getLogger("ddp_train")


class Trainer:
    """Trains one model with DDP, FSDP (or a single process) as a TrainConfig describes.

    Library use: pass your own ``model``, ``train_dataset``/``val_dataset`` and ``loss_fn``;
    what you do not pass is built from the config's registries. ``sinks`` receive every
    metric record (rank 0), ``callbacks`` are called at fixed points of :meth:`fit`
    (:mod:`ddp_train.training.callbacks`). The process group is taken from the launcher's
    environment (torchrun, srun) or an existing one.
    """

    def __init__(self, config: TrainConfig, *, model: nn.Module | None = None,
                 train_dataset: Dataset | None = None, val_dataset: Dataset | None = None,
                 loss_fn: LossFn | None = None, sinks: Sequence[MetricSink] = (),
                 callbacks: Sequence[Any] = ()) -> None:
        # Our own copy: resolved model args are written back into it for config.yaml.
        self.config = config = copy.deepcopy(config)
        config.validate()
        # Every named part is resolved first: a bad name fails before any process group or file.
        builder = PartsBuilder(config, model=model, train_dataset=train_dataset,
                               val_dataset=val_dataset, loss_fn=loss_fn)
        if config.logging.tensorboard:  # before any rank waits on another
            require_tensorboard()
        self.env = setup_environment(config)
        self.run_dir = RunDirectory(config.run_dir)
        try:
            self._build(builder, sinks, callbacks)
        except BaseException:
            self.run_dir.unlock()
            self._close_process_group(barrier=False)
            raise

    def _build(self, builder: PartsBuilder, sinks: Sequence[MetricSink], callbacks: Sequence[Any]) -> None:
        config, env = self.config, self.env
        configure_determinism(config.run.deterministic)
        # Same seed on every rank: identical data sets and initial weights everywhere.
        seed_everything(config.run.seed)
        parts = builder.build()
        self.train_dataset, self.val_dataset = parts.train_dataset, parts.val_dataset
        self.loss_fn, self.task = parts.loss_fn, parts.task
        self.objective = Objective(parts.loss_fn, parts.step_fn, config.data.target_key)
        # A Hugging Face causal LM predicts token t+1 at position t: counts and accuracy shift too.
        self.label_shift = label_shift(parts.model)
        apply_init(parts.model, config.model.init)
        apply_norm(parts.model, config.model.norm)

        # The strategy spreads the model over the ranks (FSDP shards self.module in place).
        self.precision = Precision(config.train.precision, env.device)
        self.strategy = build_strategy(config, env, self.precision)
        self.module: nn.Module = parts.model.to(env.device)
        wrapped = self.strategy.wrap(self.module)
        self.model: nn.Module = torch.compile(wrapped) if config.train.compile else wrapped
        # From here on each rank draws its own stream (dropout, augmentation).
        seed_everything(config.run.seed + env.rank)

        # Every micro-batch full, the same global order at every world size.
        loaders = build_loaders(self.train_dataset, self.val_dataset, config, env, parts.collate)
        self.train_data, self.val_loader = loaders.train, loaders.val
        self.steps_per_epoch, self.total_steps = loaders.steps_per_epoch, loaders.total_steps
        self._last_of_epoch = False  # set by step_batches for the step it hands out
        # Padding makes a language model's token counts differ between micro-batches: weight them.
        self._token_weighted = (self.task == "language_model" and parts.step_fn is None
                                and env.world_size * config.train.grad_accum_steps > 1)
        # The loaders collate on the CPU: a CPU run's batches are already where they are
        # needed, and skipping the move takes a few calls out of every step.
        self._move_batches = env.device.type != "cpu"
        self.optimizer = build_optimizer(self.module.parameters(), config.optim)
        self.scheduler = build_schedule(self.optimizer, config.schedule, self.total_steps)
        self.early_stopping = EarlyStopping(config.train.early_stopping)
        self.early_stopping.check_metric(self.task, custom_step=parts.step_fn is not None)
        if config.train.early_stopping.enabled and self.val_loader is None:
            raise ConfigError("train.early_stopping.enabled", "expected a validation set to "
                                                              "watch, but the data has none")
        self.health = NonfiniteGuard(config.train, env.world_size, self.precision.scaler is not None)

        # What must survive a restart: these objects' state dicts; then resume, then the outputs.
        self.progress = TrainingProgress()
        self.running_loss = RunningLoss(env.device)
        self.running_extras = RunningExtras()
        # One run at a time in a run directory: locked before anything in it is read or written
        # (resume, metrics), and only now, so that a config error above leaves no trace there.
        self.run_dir.lock(env)
        self.checkpoints = self.strategy.checkpoint_store(self.run_dir.checkpoints_path, config.checkpoint)
        resumed = self._resume()
        self.sinks: list[MetricSink] = list(sinks)
        callbacks = list(callbacks)
        if env.is_main:
            self.run_dir.create()
            self.run_dir.write_config(config_to_yaml(config, {"versions": {
                "ddp_train": __version__, "torch": str(torch.__version__),
                "python": platform.python_version()}}))
            # A resumed run keeps the metrics up to its checkpoint and drops those of the
            # steps it is about to redo, so metrics.jsonl reads as one uninterrupted run.
            own_sinks = run_sinks(config.logging, self.run_dir, self.total_steps, self.progress.global_step,
                                  self.progress.global_step if resumed else None)
            self.sinks += own_sinks
            callbacks += own_sinks  # the console's progress bar follows the steps
        if config.profile.enabled:
            profile = config.profile
            callbacks.append(StepProfiler(config.run_dir, env.rank, env.device, profile.wait,
                                          profile.warmup, profile.active, profile.record_shapes,
                                          profile.memory))
        self.callbacks = CallbackList(callbacks)
        self.metrics = TrainMetrics(self.module, env.device, env.world_size, env.is_main,
                                    config.logging, config.debug)

    # -----------------------------------------------------------------------------------
    # State: everything a restart needs, loadable with weights_only=True.

    def state_dict(self) -> dict[str, Any]:
        """The full training state; a collective (call on every rank), complete on rank 0.

        Per-rank parts (RNG streams, unlogged loss sums) are gathered from every rank;
        other ranks get an empty dict. Under FSDP the shards are gathered into full tensors.
        """
        model, optimizer = self.strategy.state_dicts(self.module, self.optimizer)
        state = self._trainer_state()
        return {**state, "model": model, "optimizer": optimizer} if state else {}

    def _trainer_state(self) -> dict[str, Any]:
        """Everything but the model and optimizer tensors; a collective, complete on rank 0."""
        per_rank = {"rng": capture_rng(self.env.device), **self.running_loss.state_dict()}
        ranks = self.env.gather_to_main(per_rank)
        if not self.env.is_main:
            return {}
        return {"format_version": FORMAT_VERSION, "scheduler": self.scheduler.state_dict(),
                "precision": self.precision.state_dict(),
                "early_stopping": self.early_stopping.state_dict(),
                "progress": self.progress.state_dict(),
                "ranks": ranks, "world_size": self.env.world_size,
                "config": config_to_dict(self.config)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` as if never interrupted (same data order and RNG streams).

        ``state`` is a checkpoint's (either format: the strategy loads its tensors).
        """
        self.strategy.load_state_dicts(self.module, self.optimizer, state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state["precision"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        progress = dict(state["progress"])
        if "sample_offset" not in progress:  # saved before offsets were: at the saved global batch
            data, loop = state["config"]["data"], state["config"]["train"]
            progress["sample_offset"] = (progress["step_in_epoch"] * len(state["ranks"]) *
                                         data["batch_size"] * loop["grad_accum_steps"])
        self.progress.load_state_dict(progress)
        ranks = state["ranks"]
        if len(ranks) == self.env.world_size:
            mine = ranks[self.env.rank]
            restore_rng(mine["rng"], self.env.device)
            self.running_loss.load_state_dict(mine)
        else:
            log.warning("the checkpoint comes from world size %d, this job has %d: the epoch "
                        "continues at global sample %d (none skipped or repeated), but per-rank "
                        "random streams (dropout) start afresh", len(ranks), self.env.world_size,
                        self.progress.sample_offset)

    def _resume(self) -> bool:
        """Load the checkpoint ``checkpoint.resume`` names; True when one was loaded."""
        found = find_resume_state(self.checkpoints, self.config.checkpoint.resume, self.env)
        if found is None:
            return False
        state, path = found
        if self.env.is_main:
            warn_config_changes(state.get("config", {}), config_to_dict(self.config), path)
        try:
            self.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError) as exc:
            # Typically a run name reused for a different model or optimizer.
            raise ConfigError("checkpoint.resume", f"checkpoint {path} does not fit this run "
                                                   f"({first_line(exc)}); start over with "
                                                   f"checkpoint.resume=never or choose another "
                                                   f"run.name") from None
        progress, loop = self.progress, self.config.train
        # From where the checkpoint stands: another global batch changes the epoch's remaining steps.
        self.total_steps = self.train_data.total_steps(
            loop.epochs, loop.max_steps, progress.global_step, progress.epoch, progress.sample_offset,
            progress.step_in_epoch) or self.total_steps
        if progress.status == "completed" and not self._finished():
            progress.status = "running"  # the config now asks for more steps
        log.info("resuming from %s at step %d (epoch %d, step %d of it)", path,
                 self.progress.global_step, self.progress.epoch, self.progress.step_in_epoch)
        return True

    # -----------------------------------------------------------------------------------
    # Training.

    def fit(self) -> dict[str, Any]:
        """Train to the end (epochs, max_steps, early stopping or preemption); returns the summary.

        The summary is also written to ``summary.json`` by rank 0, with status ``failed``
        when training raised.
        """
        started, previous_wall_time = time.perf_counter(), self.progress.wall_time_s
        status = "failed"
        failure: BaseException | None = None
        # The handlers stay installed until summary.json is written (under the command line,
        # until the process exits): a signal that comes after the last step (while model.pt
        # is written) must not kill the process with neither file on disk; the run then
        # simply completes.
        with PreemptionWatch(self.env, self.config.dist.preemption_sync_s) as preemption:
            try:
                self.callbacks.call("on_fit_start", self)
                try:
                    status = self._train(preemption, started, previous_wall_time)
                except torch.cuda.OutOfMemoryError:
                    raise _out_of_memory(self.config, self.env.rank, self.env.device,
                                         self.progress.global_step) from None
                finally:
                    preemption.drain()
                if status != "preempted":
                    model = self.strategy.final_model_state(self.module)  # a collective
                    if self.env.is_main:
                        self.run_dir.write_model(model)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                wall_time_s = previous_wall_time + time.perf_counter() - started
                summary = _end_fit(self, "failed" if failure else status, wall_time_s, failure)
        return summary

    def _train(self, preemption: PreemptionWatch, started: float, previous_wall_time: float) -> str:
        """Optimizer steps until training ends; returns how it ended (the summary's status)."""
        config, progress = self.config, self.progress
        if progress.status != "running" or self._finished():
            return progress.status if progress.status != "running" else "completed"
        log_every, val_every = config.logging.every_steps, config.eval.every_steps
        global_batch = self.env.world_size * config.data.batch_size * config.train.grad_accum_steps
        window_start, window_steps = time.perf_counter(), 0
        self.module.train()
        batches = self.step_batches()
        while True:
            self.callbacks.call("on_step_start", self)
            result = self.train_step(next(batches))
            self.checkpoints.check_background()  # a failed background save stops the run now
            window_steps += 1
            self.callbacks.call("on_step_end", self, result)
            if progress.global_step % log_every == 0:
                samples_per_s = global_batch * window_steps / (time.perf_counter() - window_start)
                self._log(self._train_record(result, samples_per_s))
                window_start, window_steps = time.perf_counter(), 0  # logging is not step time

            done = self._finished()
            validated = stop = False
            if result.epoch_end or done or (val_every and progress.global_step % val_every == 0):
                stop, validated = self._validate(result.epoch), True
                window_start, window_steps = time.perf_counter(), 0  # validation is not step time
            preempted = preemption.agreed()  # a collective on its own schedule: every step, every rank

            status = ("completed" if done else "early_stopped" if stop
                      else "preempted" if preempted else "running")
            if status != "preempted":
                progress.status = status
            best = (validated and config.checkpoint.save_best
                    and self.early_stopping.best_step == progress.global_step)
            periodic = self._checkpoint_due(result.epoch_end, status)
            if periodic or best:
                progress.wall_time_s = previous_wall_time + time.perf_counter() - started
                self._save_checkpoint(periodic, best)
            if status != "running":
                return status

    def _finished(self) -> bool:
        """Whether the run has trained all it should (train.max_steps, train.epochs)."""
        return ((self.total_steps is not None and self.progress.global_step >= self.total_steps)
                or self.progress.epochs_completed >= self.config.train.epochs)

    def step_batches(self) -> Iterator[list[Any]]:
        """The micro-batches of each next optimizer step in training order, endlessly.

        Follows :attr:`progress` (which :meth:`train_step` advances): epoch after epoch,
        and a resumed run from the sample it stopped at. Hand each step's list to
        :meth:`train_step` before asking for the next.
        """
        config, data, progress = self.config, self.train_data, self.progress
        while True:
            batches = data.epoch(config.run.seed, self.env.rank, progress.epoch, progress.sample_offset)
            steps = data.steps_from(progress.sample_offset, progress.step_in_epoch)
            groups = step_groups(batches, config.train.grad_accum_steps, steps, self.env.any_rank)
            del batches  # step_groups holds the epoch's iterator (and its workers) until it ends
            last = False
            for micro_batches, last in groups:
                self._last_of_epoch = last
                yield micro_batches
            if not last:  # a stream that ran out before a single step
                raise TrainingFailed(f"the training data yielded no full step in epoch {progress.epoch}")

    def train_step(self, micro_batches: Sequence[Any]) -> StepResult:
        """One optimizer step over ``train.grad_accum_steps`` micro-batches; advances :attr:`progress`.

        Gradients are reduced on the last micro-batch only. The step is skipped
        (``train.nonfinite=skip``) or training ends (``stop``, TrainingFailed) when the loss or
        the global gradient norm is not finite. The LR set on the optimizer before the call
        is the one the step uses.
        """
        accum = len(micro_batches)
        if accum != self.config.train.grad_accum_steps:
            raise ValueError(f"expected {self.config.train.grad_accum_steps} micro-batches "
                             f"(train.grad_accum_steps), got {accum}")
        progress, strategy, precision, metrics = self.progress, self.strategy, self.precision, self.metrics
        if metrics.diagnostics:  # gathered on the steps that are logged
            metrics.capture((progress.global_step + 1) % self.config.logging.every_steps == 0)
        weights = (token_weights(micro_batches, self.config.data.target_key, self.label_shift,
                                 self.env.world_size, self.env.all_reduce_sum, self.env.device)
                   if self._token_weighted else None)
        micro_losses = []
        for index, batch in enumerate(micro_batches):
            if self._move_batches:
                batch = to_device(batch, self.env.device)
            with strategy.gradient_sync(index == accum - 1):
                with precision.autocast():
                    result = self.objective(self.model, batch)
                loss = result.loss
                # The mean over micro-batches (or their tokens); no extra autograd node for one.
                precision.backward(loss * weights[index] if weights is not None
                                   else loss / accum if accum > 1 else loss)
            micro_losses.append(loss.detach())
            if result.extras:
                self.running_extras.add(result.extras)
        step_loss = micro_losses[0] if accum == 1 else torch.stack(micro_losses).double().sum()
        if metrics.tokens_per_sample is None:
            metrics.tokens_per_sample = tokens_per_sample(batch, self.task)
        precision.unscale_(self.optimizer)
        grads = strategy.gradients()
        grad_norm = strategy.grad_norm(grads)
        if metrics.diagnostics:
            metrics.after_backward(self.module)
        lr = self.optimizer.param_groups[0]["lr"]
        finite = self.health.allows(step_loss, grad_norm, progress)
        if finite:
            strategy.clip_gradients(grads, grad_norm)
            precision.step(self.optimizer)
            self.running_loss.add(step_loss, accum)
        elif precision.scaler is not None:
            precision.scaler.update()  # forget this step's unscaling
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        epoch, epoch_end = progress.epoch, self._last_of_epoch
        progress.step_done(self.train_data.global_batch, epoch_end)
        self._last_of_epoch = False
        return StepResult(step_loss / accum if accum > 1 else step_loss, grad_norm, lr,
                          not finite, epoch, epoch_end)

    def _checkpoint_due(self, epoch_end: bool, status: str) -> bool:
        every_steps, every_epochs = self.config.checkpoint.every_steps, self.config.checkpoint.every_epochs
        if status == "preempted":
            return True
        if status != "running":  # the end of training, if checkpointing is on at all
            return every_steps > 0 or every_epochs > 0
        return ((every_steps > 0 and self.progress.global_step % every_steps == 0)
                or (epoch_end and every_epochs > 0 and self.progress.epochs_completed % every_epochs == 0))

    def _save_checkpoint(self, periodic: bool, best: bool) -> None:
        """Save a checkpoint in the strategy's format (a collective: every rank takes part)."""
        model, optimizer = self.strategy.checkpoint_state_dicts(self.module, self.optimizer)
        state = {**self._trainer_state(), "model": model, "optimizer": optimizer}
        path = self.checkpoints.save(state, self.progress.global_step, periodic=periodic, best=best)
        self.callbacks.call("on_checkpoint", self, path)

    def mean_train_loss(self, window: int = RunningLoss.LOG) -> float | None:
        """The mean micro-batch loss over all ranks since ``window`` was last read (a collective),
        None when every step in it was skipped; resets the window."""
        return self.running_loss.read(window, self.env.all_reduce_sum, self.progress.global_step)

    def _validate(self, epoch: int) -> bool:
        """Validate, log, track the best; True when every rank should stop early."""
        progress = self.progress
        progress.last_val_step = progress.global_step
        if self.running_loss.pending(RunningLoss.VALIDATION):
            progress.train_loss_since_val = self.mean_train_loss(RunningLoss.VALIDATION)
        if self.val_loader is None:
            return False
        metrics = self.evaluate()
        progress.last_val = metrics
        record = {"step": progress.global_step, "epoch": epoch, **metrics}
        if progress.train_loss_since_val is not None:
            record["train/loss_avg"] = progress.train_loss_since_val
        self._log(record)
        self.callbacks.call("on_validation_end", self, metrics)
        return self.env.any_rank(self.early_stopping.update(metrics, progress.global_step))

    def evaluate(self) -> dict[str, Any]:
        """Validation metrics over the whole validation set, each sample counted once (a collective).

        Runs the unwrapped module (no DDP collectives in forward, so ranks may hold shards of
        different sizes) and reduces sums, not means, across ranks.
        """
        if self.val_loader is None:
            return {}
        return evaluate(self.module, self.strategy.validation_batches(self.val_loader), self.objective,
                        self.task, self.precision, self.env, self.label_shift)

    # -----------------------------------------------------------------------------------
    # Outputs.

    def _train_record(self, result: StepResult, samples_per_s: float) -> dict[str, Any]:
        """The train/* metrics of a log step (plus sys/*, grad_norm/*, act/* when enabled)."""
        progress = self.progress
        record: dict[str, Any] = {"step": progress.global_step, "epoch": result.epoch}
        train_loss = self.mean_train_loss()
        if train_loss is not None:  # None when every step since the last log was skipped
            record["train/loss"] = train_loss
        grad_norm = result.grad_norm.item()
        record.update({"train/lr": result.lr, "train/grad_norm": grad_norm})
        self.metrics.add_throughput(record, samples_per_s)
        record.update(self.running_extras.read(self.env.all_reduce_sum, self.env.device))
        if self.config.train.nonfinite == "skip":
            record["train/nonfinite_skips"] = progress.nonfinite_skips
        self.metrics.add_diagnostics(record, grad_norm)
        return record

    def _log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self, clean_exit: bool = True) -> None:
        """Close the sinks and tear the process group down (if this trainer created it).

        ``clean_exit=False`` (after an error) skips the final barrier: a dead peer would
        hold it until the timeout.
        """
        if self.env.is_main:
            self.checkpoints.wait()
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        self.metrics.close()
        self.run_dir.unlock()  # every file of the run is written: the directory is free
        self._close_process_group(clean_exit)

    def _close_process_group(self, barrier: bool) -> None:
        """Release what holds the process group (DDP's reducer, wrappers) while everything is
        alive, then tear it down: left to interpreter shutdown, gloo's threads abort the process."""
        if hasattr(self, "strategy"):  # a failed __init__ may not have built it
            self.strategy.release()
            self.model = getattr(self, "module", None)
        gc.collect()
        self.env.close(barrier=barrier)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self.close(clean_exit=exc_type is None)


def _end_fit(trainer: Trainer, status: str, wall_time_s: float, failure: BaseException | None
             ) -> dict[str, Any]:
    """The end of :meth:`Trainer.fit`, however training ended: the last save, summary.json,
    on_fit_end. Every step is attempted; their errors are reported by :func:`_report_end_errors`."""
    env = trainer.env
    late: list[tuple[str, Exception]] = []
    if env.is_main:
        _attempt(late, "the last checkpoint save", trainer.checkpoints.wait)
        # A save that failed (a full disk) leaves a temporary behind: removed now, not at
        # the next start, which may never come.
        _attempt(late, "removing temporary files", trainer.checkpoints.remove_stale_temporaries)
    trainer.progress.wall_time_s = wall_time_s
    summary = trainer.progress.summary("failed" if late else status, env.world_size,
                                       trainer.early_stopping.best())
    if env.is_main:
        _attempt(late, "writing summary.json", lambda: trainer.run_dir.write_summary(summary))
    if failure is None and not late:
        trainer.callbacks.call("on_fit_end", trainer, summary)  # a bug there: its traceback helps
    else:
        _attempt(late, "a callback's on_fit_end",
                 lambda: trainer.callbacks.call("on_fit_end", trainer, summary))
    _report_end_errors(late, failure)
    return summary


def _attempt(errors: list[tuple[str, Exception]], what: str, action: Callable[[], object]) -> None:
    """Run ``action``; an error it raises is appended to ``errors`` as ``(what, error)``."""
    try:
        action()
    except Exception as exc:
        errors.append((what, exc))


def _report_end_errors(errors: list[tuple[str, Exception]], failure: BaseException | None) -> None:
    """The errors of a run's end: logged after a ``failure``, which is what the user must see
    (not that its summary could not be written); after a success the first fails the run
    (TrainingFailed: one line, exit 1) and the others are logged."""
    if failure is not None or not errors:
        for what, error in errors:
            log.error("after training failed, %s failed too: %s", what, first_line(error))
        return
    (what, error), *others = errors
    for other, other_error in others:
        log.error("%s failed too: %s", other, first_line(other_error))
    if isinstance(error, TrainingFailed):
        raise error
    raise TrainingFailed(f"{what} failed: {first_line(error)}", shared=False) from error


def _out_of_memory(config: TrainConfig, rank: int, device: torch.device, global_step: int) -> TrainingFailed:
    """Write the CUDA memory summary next to the run and explain what to change."""
    path = config.run_dir / f"oom_memory_summary_rank{rank}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, torch.cuda.memory_summary(device).encode())
    batch, accum = config.data.batch_size, config.train.grad_accum_steps
    smaller = f"data.batch_size={max(batch // 2, 1)} train.grad_accum_steps={accum * 2}" if batch > 1 else \
        "a smaller model, or train.precision=bf16"
    return TrainingFailed(f"rank {rank}: CUDA out of memory at optimizer step {global_step + 1} "
                          f"(memory summary: {path}); try {smaller}, which keeps the global batch",
                          shared=False)


def describe(trainer: Trainer) -> str:
    """One line on what is being trained, for the console."""
    config = trainer.config
    return (f"{config.model.name} ({trainer.metrics.num_params / 1e6:.3g}M parameters) on {config.data.name} | "
            f"world size {trainer.env.world_size} on {trainer.env.device} ({trainer.strategy.name}) | "
            f"global batch {trainer.env.world_size * config.data.batch_size * config.train.grad_accum_steps} | "
            f"{trainer.total_steps or 'until the stream ends'} steps "
            f"({trainer.steps_per_epoch or 'a pass over the stream'}/epoch) | "
            f"precision {config.train.precision} | run dir {config.run_dir}")
