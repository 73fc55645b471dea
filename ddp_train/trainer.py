"""The Trainer: config → distributed environment → data and model → wrap → loop → outputs.

Read it top to bottom: ``__init__`` builds everything in data-flow order, :meth:`fit`
runs epochs of optimizer steps, validates, and writes the run directory on rank 0.
"""

from __future__ import annotations

import copy
import gc
import inspect
import logging
import math
import os
import platform
import random
import time
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

import ddp_train
from ddp_train.config import TrainConfig, config_to_yaml
from ddp_train.data import eval_loader, to_device, train_loader
from ddp_train.datasets import DATASETS
from ddp_train.distributed import DistEnv
from ddp_train.early_stopping import EarlyStopping
from ddp_train.errors import ConfigError, TrainingFailed
from ddp_train.losses import LOSS_TASKS, LossFn, build_loss
from ddp_train.metric_logging import ConsoleSink, JsonlSink, MetricSink
from ddp_train.metrics import MetricAccumulator
from ddp_train.models import MODELS, apply_init, apply_norm, plain_state_dict
from ddp_train.optim import build_optimizer, build_schedule
from ddp_train.precision import Precision
from ddp_train.run_dir import RunDirectory

log = logging.getLogger("ddp_train")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:  # NumPy is optional for library users; nothing to seed then
        return
    np.random.seed(seed % 2**32)


def _call_factory(factory: Callable[..., Any], args: dict[str, Any], key: str) -> Any:
    try:
        inspect.signature(factory).bind(**args)
    except TypeError as exc:
        raise ConfigError(key, f"do not fit {getattr(factory, '__name__', factory)}: {exc}") from None
    except ValueError:  # no introspectable signature: let the call itself decide
        pass
    try:
        return factory(**args)
    except ValueError as exc:  # a factory rejecting its arguments: bad input, not a bug
        raise ConfigError(key, f"rejected by {getattr(factory, '__name__', factory)}: {exc}") from None


def _with_hints(factory: Callable[..., Any], args: dict[str, Any], hints: dict[str, Any]
                ) -> dict[str, Any]:
    """``args`` plus the data set's size hints that the factory takes and the user left out."""
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return dict(args)
    return {**{k: v for k, v in hints.items() if k in accepted}, **args}


class Trainer:
    """Trains one model with DDP (or a single process) as a TrainConfig describes.

    Library use: pass your own ``model``, ``train_dataset``/``val_dataset`` and ``loss_fn``;
    what you do not pass is built from the config's registries. The process group is taken
    from the launcher's environment (torchrun, srun) or an existing one.
    """

    def __init__(self, config: TrainConfig, *, model: nn.Module | None = None,
                 train_dataset: Dataset | None = None, val_dataset: Dataset | None = None,
                 loss_fn: LossFn | None = None, sinks: Sequence[MetricSink] = ()) -> None:
        # Our own copy: resolved model args are written back into it for config.yaml.
        self.config = config = copy.deepcopy(config)
        config.validate()
        # Resolve every named part first: a bad name fails before any process group or file.
        data_factory = DATASETS.resolve(config.data.name) if train_dataset is None else None
        model_factory = MODELS.resolve(config.model.name) if model is None else None
        self.loss_fn: LossFn = (loss_fn if loss_fn is not None
                                else build_loss(config.loss.name, config.loss.args))

        strategy = config.train.strategy
        self.env = DistEnv.setup(config.dist, config.run.device,
                                 force_process_group=strategy == "ddp")
        try:
            self._build(config, model, model_factory, train_dataset, val_dataset, data_factory,
                        loss_fn is None, sinks)
        except BaseException:
            self.env.close(barrier=False)
            raise

    def _build(self, config: TrainConfig, model: nn.Module | None,
               model_factory: Callable[..., Any] | None, train_dataset: Dataset | None,
               val_dataset: Dataset | None, data_factory: Callable[..., Any] | None,
               builtin_loss: bool, sinks: Sequence[MetricSink]) -> None:
        env, device = self.env, self.env.device
        if config.run.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        # Same seed on every rank: identical data sets and initial weights everywhere.
        seed_everything(config.run.seed)

        # Data.
        if data_factory is not None:
            datasets = _call_factory(data_factory, config.data.args, "data.args")
            if not (isinstance(datasets, (tuple, list)) and len(datasets) == 2):
                raise ConfigError("data.name", f"expected {config.data.name!r} to return "
                                               f"(train_dataset, val_dataset), got {type(datasets).__name__}")
            train_dataset, val_dataset = datasets
        assert train_dataset is not None
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        hints = getattr(train_dataset, "model_hints", {})

        # Model: built from the shared seed, then initialised, normalised and moved.
        if model is None:
            assert model_factory is not None
            config.model.args = _with_hints(model_factory, config.model.args, hints)
            model = _call_factory(model_factory, config.model.args, "model.args")
            if not isinstance(model, nn.Module):
                raise ConfigError("model.name", f"expected {config.model.name!r} to return an "
                                                f"nn.Module, got {type(model).__name__}")
        apply_init(model, config.model.init)
        apply_norm(model, config.model.norm)
        self.module: nn.Module = model.to(device)

        # Wrap: DDP when asked for or when there is more than one rank.
        strategy = config.train.strategy
        self.ddp: DistributedDataParallel | None = None
        if strategy == "ddp" or (strategy == "auto" and env.world_size > 1):
            self.ddp = DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None,
                bucket_cap_mb=config.dist.bucket_cap_mb,
                find_unused_parameters=config.dist.find_unused_parameters)
        wrapped: nn.Module = self.ddp if self.ddp is not None else self.module
        self.model: nn.Module = torch.compile(wrapped) if config.train.compile else wrapped

        # From here on each rank draws its own stream (dropout, augmentation).
        seed_everything(config.run.seed + env.rank)

        # Loaders: every micro-batch full, the same global order at every world size.
        pin = device.type == "cuda"
        self.train_loader = train_loader(train_dataset, config.data.batch_size, env.rank,
                                         env.world_size, config.data.shuffle, config.run.seed,
                                         config.data.num_workers, pin)
        self.val_loader = None
        if val_dataset is not None and len(val_dataset) > 0:  # type: ignore[arg-type]
            self.val_loader = eval_loader(val_dataset, config.eval.batch_size or config.data.batch_size,
                                          env.rank, env.world_size, config.data.num_workers, pin)
        accum = config.train.grad_accum_steps
        self.steps_per_epoch = len(self.train_loader) // accum
        if self.steps_per_epoch == 0:
            global_batch = env.world_size * config.data.batch_size * accum
            raise ConfigError("data.batch_size", f"expected a global batch (world size "
                                                 f"{env.world_size} × batch {config.data.batch_size} × "
                                                 f"accumulation {accum} = {global_batch}) no larger than "
                                                 f"the {len(train_dataset)} training samples")  # type: ignore[arg-type]
        epochs_steps = self.steps_per_epoch * config.train.epochs
        self.total_steps = min(epochs_steps, config.train.max_steps or epochs_steps)

        # Optimisation.
        self.optimizer = build_optimizer(self.module.parameters(), config.optim)
        self.scheduler = build_schedule(self.optimizer, config.schedule, self.total_steps)
        self.precision = Precision(config.train.precision, device)
        self.early_stopping = EarlyStopping(config.train.early_stopping)
        if config.train.early_stopping.enabled and self.val_loader is None:
            raise ConfigError("train.early_stopping.enabled", "expected a validation set to "
                                                              "watch, but the data has none")

        # Validation metrics: the data set says what it is; else the built-in loss does.
        task = config.eval.task
        if task == "auto":
            task = getattr(val_dataset, "task", None) or (
                LOSS_TASKS.get(config.loss.name, "none") if builtin_loss else "none")
        self.task = task

        # Progress: what must survive a restart lives in these counters.
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.epochs_completed = 0

        # Outputs (rank 0 only).
        self.run_dir = RunDirectory(config.run_dir)
        self.sinks: list[MetricSink] = list(sinks)
        self.console: ConsoleSink | None = None
        if env.is_main:
            self.run_dir.create()
            self.run_dir.write_config(config_to_yaml(config, {"versions": {
                "ddp_train": ddp_train.__version__, "torch": str(torch.__version__),
                "python": platform.python_version()}}))
            self.console = ConsoleSink(config.logging.progress, self.total_steps)
            self.sinks += [JsonlSink(self.run_dir.metrics_path), self.console]

    # -----------------------------------------------------------------------------------
    # Training.

    def fit(self) -> dict[str, Any]:
        """Train to the end (epochs, max_steps or early stopping); returns the summary.

        The summary is also written to ``summary.json`` by rank 0, with status ``failed``
        when training raised.
        """
        started = time.perf_counter()
        self._last_val: dict[str, Any] = {}
        self._last_val_step = -1
        self._train_loss_since_val: float | None = None
        status = "failed"
        try:
            status = self._train()
            self._write_model()
        finally:
            summary = self._summary(status, time.perf_counter() - started)
            if self.env.is_main:
                self.run_dir.write_summary(summary)
        return summary

    def _train(self) -> str:
        config = self.config
        accum = config.train.grad_accum_steps
        log_every = config.logging.every_steps
        val_every = config.eval.every_steps
        global_batch = self.env.world_size * config.data.batch_size * accum
        # Loss sums stay on the device between log steps: no host sync in the hot loop.
        # Index 0 sums since the last log, index 1 since the last validation.
        loss_sums = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        micro_since = [0, 0]
        window_start = time.perf_counter()
        grad_norm: torch.Tensor | None = None
        stop = False

        self.module.train()
        while self.epoch < config.train.epochs and self.global_step < self.total_steps and not stop:
            self.train_loader.sampler.set_epoch(self.epoch)  # type: ignore[union-attr]
            batches = iter(self.train_loader)
            while self.step_in_epoch < self.steps_per_epoch:
                for micro in range(accum):
                    inputs, targets = to_device(next(batches), self.env.device)
                    # Only the last micro-batch all-reduces; no_sync must cover both the
                    # forward and the backward pass to suppress DDP's reducer.
                    syncing = micro == accum - 1 or self.ddp is None
                    with nullcontext() if syncing else self.ddp.no_sync():  # type: ignore[union-attr]
                        with self.precision.autocast():
                            loss = self.loss_fn(self.model(inputs), targets)
                        self.precision.backward(loss / accum)
                    loss_sums += loss.detach()
                grad_norm = self._clip_gradients()
                self.precision.step(self.optimizer)
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.global_step += 1
                self.step_in_epoch += 1
                micro_since[0] += accum
                micro_since[1] += accum
                if self.console is not None:
                    self.console.advance(self.global_step)

                if self.global_step % log_every == 0:
                    now = time.perf_counter()
                    train_loss = self._mean_loss(loss_sums, micro_since, slot=0)
                    record: dict[str, Any] = {
                        "step": self.global_step, "epoch": self.epoch, "train/loss": train_loss,
                        "train/lr": lr,
                        "train/samples_per_s": global_batch * log_every / (now - window_start)}
                    if grad_norm is not None:
                        record["train/grad_norm"] = grad_norm.item()
                    self._log(record)
                    window_start = time.perf_counter()  # logging time is not step time

                done = self.global_step >= self.total_steps
                # Mid-epoch validation; the epoch's last step validates below instead.
                if (val_every and self.global_step % val_every == 0 and not done
                        and self.step_in_epoch < self.steps_per_epoch):
                    stop = self._validate(loss_sums, micro_since)
                if done or stop:
                    break
            del batches  # shuts worker processes of an unfinished epoch down
            if self.step_in_epoch == self.steps_per_epoch:
                self.epochs_completed += 1
                stop = self._validate(loss_sums, micro_since) or stop
                self.epoch += 1
                self.step_in_epoch = 0
        # Training ended mid-epoch (max_steps): validate the final model too.
        if self._last_val_step != self.global_step:
            stop = self._validate(loss_sums, micro_since) or stop
        return "early_stopped" if stop and self.global_step < self.total_steps else "completed"

    def _clip_gradients(self) -> torch.Tensor | None:
        """Unscale, then clip by value and/or norm; returns the pre-clip global norm if measured."""
        train = self.config.train
        if train.clip_grad_norm is None and train.clip_grad_value is None:
            return None
        self.precision.unscale_(self.optimizer)
        if train.clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(self.module.parameters(), train.clip_grad_value)
        if train.clip_grad_norm is not None:
            return torch.nn.utils.clip_grad_norm_(self.module.parameters(), train.clip_grad_norm)
        return None

    def _mean_loss(self, loss_sums: torch.Tensor, counts: list[int], slot: int) -> float:
        """Mean micro-batch loss over all ranks since the slot was last read; resets it."""
        totals = self.env.all_reduce_sum(
            torch.stack([loss_sums[slot], torch.tensor(float(counts[slot]), dtype=torch.float64,
                                                       device=loss_sums.device)]))
        loss_sums[slot] = 0.0
        counts[slot] = 0
        mean = (totals[0] / totals[1].clamp(min=1)).item()
        if not math.isfinite(mean):
            # Every rank sees the same reduced value, so every rank raises together.
            raise TrainingFailed(f"non-finite training loss ({mean}) at or before optimizer step "
                                 f"{self.global_step}: lower optim.lr, set train.clip_grad_norm, "
                                 f"or check the data")
        return mean

    def _validate(self, loss_sums: torch.Tensor, micro_since: list[int]) -> bool:
        """Validate, log, track the best; True when every rank should stop early."""
        self._last_val_step = self.global_step
        if micro_since[1]:
            self._train_loss_since_val = self._mean_loss(loss_sums, micro_since, slot=1)
        if self.val_loader is None:
            return False
        metrics = self.evaluate()
        self._last_val = metrics
        record = {"step": self.global_step, "epoch": self.epoch, **metrics}
        if self._train_loss_since_val is not None:
            record["train/loss_avg"] = self._train_loss_since_val
        self._log(record)
        return self.env.any_rank(self.early_stopping.update(metrics, self.global_step))

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation metrics over the whole validation set, each sample counted once.

        Runs the unwrapped module (no DDP collectives in forward, so ranks may hold
        shards of different sizes) and reduces sums, not means, across ranks.
        """
        if self.val_loader is None:
            return {}
        was_training = self.module.training
        self.module.eval()
        accumulator = MetricAccumulator(self.task, self.env.device)
        for batch in self.val_loader:
            inputs, targets = to_device(batch, self.env.device)
            with self.precision.autocast():
                outputs = self.module(inputs)
                loss = self.loss_fn(outputs, targets)
            accumulator.update(outputs.float(), targets, loss.float())
        self.module.train(was_training)
        return accumulator.compute(self.env.all_reduce_sum)

    # -----------------------------------------------------------------------------------
    # Outputs.

    def _log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record)

    def _write_model(self) -> None:
        if self.env.is_main:
            self.run_dir.write_model(plain_state_dict(self.module))

    def _summary(self, status: str, wall_time_s: float) -> dict[str, Any]:
        stopping = self.early_stopping
        best: dict[str, Any] = {}
        if stopping.best_step is not None:
            best = {"step": stopping.best_step, "metric": stopping.config.metric,
                    **stopping.best_metrics}
        summary: dict[str, Any] = {
            "status": status, "global_step": self.global_step,
            "epochs_completed": self.epochs_completed, "world_size": self.env.world_size,
            "final": self._last_val, "best": best, "wall_time_s": wall_time_s}
        train_loss, val_loss = self._train_loss_since_val, self._last_val.get("val/loss")
        if train_loss is not None and val_loss is not None:
            # The over/underfitting signal: a large positive gap means the model fits the
            # training set much better than unseen data.
            summary["train_val_gap"] = {"train/loss": train_loss, "val/loss": val_loss,
                                        "gap": val_loss - train_loss}
        return summary

    def close(self, clean_exit: bool = True) -> None:
        """Close the sinks and tear the process group down (if this trainer created it).

        ``clean_exit=False`` (after an error) skips the final barrier: a dead peer would
        hold it until the timeout.
        """
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        # DDP's reducer keeps the process group and its last pending work alive; left to
        # interpreter shutdown, gloo's threads may release them after Python is gone
        # (an abort at exit). Release them now, while everything is alive.
        self.ddp = None
        self.model = self.module
        gc.collect()
        self.env.close(barrier=clean_exit)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self.close(clean_exit=exc_type is None)


def describe(trainer: Trainer) -> str:
    """One line on what is being trained, for the console."""
    config = trainer.config
    params = sum(p.numel() for p in trainer.module.parameters())
    return (f"{config.model.name} ({params / 1e6:.3g}M parameters) on {config.data.name} | "
            f"world size {trainer.env.world_size} on {trainer.env.device} | "
            f"global batch {trainer.env.world_size * config.data.batch_size * config.train.grad_accum_steps} | "
            f"{trainer.total_steps} steps ({trainer.steps_per_epoch}/epoch) | "
            f"precision {config.train.precision} | run dir {config.run_dir}")
