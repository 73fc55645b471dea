"""The Trainer: config → distributed environment → data and model → wrap → loop → outputs.

Read it top to bottom: ``__init__`` builds everything in data-flow order, :meth:`fit`
runs epochs of optimizer steps, validates, and writes the run directory on rank 0.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Literal, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

import ddp_train
from ddp_train.checkpoint.files import FORMAT_VERSION, CheckpointManager
from ddp_train.config import TrainConfig, config_to_dict, config_to_yaml
from ddp_train.training.loaders import eval_loader, to_device, train_loader
from ddp_train.components.datasets import DATASETS
from ddp_train.observability.diagnostics import ActivationStats, GradNormWatch, layer_grad_norms
from ddp_train.distributed.environment import DistEnv
from ddp_train.training.early_stopping import EarlyStopping
from ddp_train.errors import ConfigError, TrainingFailed
from ddp_train.components.parts import build_datasets, build_model, infer_task
from ddp_train.distributed.grad_norm import GradNorm
from ddp_train.components.losses import LossFn, build_loss
from ddp_train.observability.sinks import (ConsoleSink, CsvSink, JsonlSink, MetricSink, TensorBoardSink,
                                      require_tensorboard)
from ddp_train.training.metrics import MetricAccumulator
from ddp_train.components.models import MODELS, apply_init, apply_norm, plain_state_dict
from ddp_train.components.optimizers import build_optimizer, build_schedule
from ddp_train.distributed.precision import Precision
from ddp_train.distributed.preemption import PreemptionWatch
from ddp_train.observability.profiling import StepProfiler
from ddp_train.training.rng import capture_rng, restore_rng, seed_everything
from ddp_train.checkpoint.run_directory import RunDirectory
from ddp_train.observability.system_metrics import SystemMonitor, peak_flops, training_flops_per_sample

if TYPE_CHECKING:
    from ddp_train.checkpoint.sharded import ShardedCheckpointManager

log = logging.getLogger("ddp_train")

_REDUCE_AS_USUAL = nullcontext()  # reusable: one object for every step that all-reduces


@dataclass
class TrainingProgress:
    """Where training stands; saved in every checkpoint (plain types only)."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    epochs_completed: int = 0
    status: str = "running"
    last_val_step: int = -1
    last_val: dict[str, Any] = field(default_factory=dict)
    train_loss_since_val: float | None = None
    wall_time_s: float = 0.0
    nonfinite_skips: int = 0
    nonfinite_in_a_row: int = 0


def _tokens_per_sample(inputs: Any, task: str) -> int:
    """Tokens a sample carries: the sequence length for language models, else 1."""
    if task == "language_model" and isinstance(inputs, torch.Tensor) and inputs.dim() >= 2:
        return int(inputs.shape[1])
    return 1


# FSDP, DTensor and torch.distributed.checkpoint take about a second to import, so only
# FSDP runs load ddp_train.distributed.fsdp and ddp_train.checkpoint.sharded (imported where used).


def _resolve_strategy(strategy: str, world_size: int) -> Literal["none", "ddp", "fsdp"]:
    """``train.strategy`` as run: auto is ddp with more than one rank, else none."""
    if strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    return strategy  # type: ignore[return-value]

# Keys that may differ between a checkpoint's run and the resumed one without a warning.
_RESUME_FREE_KEYS = ("run.", "checkpoint.", "logging.", "dist.timeout_s", "dist.preemption_sync_s",
                     "train.max_steps", "train.epochs", "train.compile", "eval.")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "args":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _warn_config_changes(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """Warn when a resumed run changes what the checkpoint was trained with."""
    old, new = _flatten(saved), _flatten(current)
    changed = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
               if old.get(key) != new.get(key) and not key.startswith(_RESUME_FREE_KEYS)]
    if changed:
        log.warning("resuming from %s with a different config, so the run is not an exact "
                    "continuation: %s", path, "; ".join(changed))


class Trainer:
    """Trains one model with DDP, FSDP (or a single process) as a TrainConfig describes.

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

        if config.logging.tensorboard:
            require_tensorboard()  # before any rank waits on another
        strategy = config.train.strategy
        self.env = DistEnv.setup(config.dist, config.run.device,
                                 force_process_group=strategy in ("ddp", "fsdp"))
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
            train_dataset, val_dataset = build_datasets(data_factory, config.data)
        assert train_dataset is not None
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        hints = getattr(train_dataset, "model_hints", {})

        # Model: built from the shared seed, then initialised, normalised and moved.
        if model is None:
            assert model_factory is not None
            model = build_model(model_factory, config.model, hints)
        apply_init(model, config.model.init)
        apply_norm(model, config.model.norm)
        self.module: nn.Module = model.to(device)

        # Wrap: DDP when asked for or when there is more than one rank; FSDP when asked for
        # (it shards self.module in place: its parameters become this rank's shards).
        self.strategy = _resolve_strategy(config.train.strategy, env.world_size)
        self.ddp: DistributedDataParallel | None = None
        if self.strategy == "ddp":
            self.ddp = DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None,
                bucket_cap_mb=config.dist.bucket_cap_mb,
                find_unused_parameters=config.dist.find_unused_parameters,
                gradient_as_bucket_view=config.dist.gradient_as_bucket_view)
        elif self.strategy == "fsdp":
            from ddp_train.distributed.fsdp import apply_fsdp, global_grad_norm

            apply_fsdp(self.module, config.train.fsdp, config.train.precision, device)
        wrapped: nn.Module = self.ddp if self.ddp is not None else self.module
        # The parameters whose gradients each step measures (FSDP's are its shards, the same
        # objects the optimizer holds), listed once instead of walking the modules every step.
        self._trainable = [p for p in self.module.parameters() if p.requires_grad]
        # The global 2-norm of the gradients: over every rank's shards under FSDP, else over
        # this rank's own (DDP has already all-reduced them).
        self._grad_norm: Callable[[list[torch.Tensor]], torch.Tensor] = (
            global_grad_norm if self.strategy == "fsdp" else GradNorm(self._trainable))
        self.model: nn.Module = torch.compile(wrapped) if config.train.compile else wrapped

        # From here on each rank draws its own stream (dropout, augmentation).
        seed_everything(config.run.seed + env.rank)

        # Loaders: every micro-batch full, the same global order at every world size.
        pin = device.type == "cuda"
        # The loaders collate on the CPU: a CPU run's batches are already where they are
        # needed, and skipping the move takes a few calls out of every step.
        self._move_batches = device.type != "cpu"
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
        self.task = infer_task(config.eval.task, val_dataset, config.loss.name if builtin_loss else None)

        # What must survive a restart: progress here, the rest in the objects above.
        self.progress = TrainingProgress()
        # Loss sums stay on the device between log steps (no host sync in the hot loop):
        # index 0 since the last log, index 1 since the last validation.
        self._loss_sums = torch.zeros(2, dtype=torch.float64, device=device)
        self._micro_since = [0, 0]

        # Resume (every rank loads the checkpoint rank 0 chose), then the outputs.
        self.checkpoints: CheckpointManager | ShardedCheckpointManager
        if self.strategy == "fsdp":
            from ddp_train.checkpoint.sharded import ShardedCheckpointManager

            self.checkpoints = ShardedCheckpointManager(config.run_dir / "checkpoints", config.checkpoint, env)
        else:
            self.checkpoints = CheckpointManager(config.run_dir / "checkpoints", config.checkpoint)
        resumed = self._resume()
        self.run_dir = RunDirectory(config.run_dir)
        self.sinks: list[MetricSink] = list(sinks)
        self.console: ConsoleSink | None = None
        if env.is_main:
            self.run_dir.create()
            self.run_dir.write_config(config_to_yaml(config, {"versions": {
                "ddp_train": ddp_train.__version__, "torch": str(torch.__version__),
                "python": platform.python_version()}}))
            self.console = ConsoleSink(config.logging.progress, self.total_steps,
                                       initial=self.progress.global_step)
            # A resumed run keeps the metrics up to its checkpoint and drops those of the
            # steps it is about to redo, so metrics.jsonl reads as one uninterrupted run.
            jsonl = JsonlSink(self.run_dir.metrics_path,
                              keep_through_step=self.progress.global_step if resumed else None)
            self.sinks += [jsonl, self.console]
            if config.logging.csv:
                csv_sink = CsvSink(config.run_dir / "metrics.csv")
                # A resumed run's CSV starts with the history metrics.jsonl kept.
                for line in self.run_dir.metrics_path.read_text(encoding="utf-8").splitlines():
                    csv_sink.log(json.loads(line))
                self.sinks.append(csv_sink)
            if config.logging.tensorboard:
                self.sinks.append(TensorBoardSink(config.run_dir / "tensorboard",
                                                  keep_through_step=self.progress.global_step if resumed else None))

        # Monitoring and diagnostics (see the log step in _train).
        self._num_params = sum(p.numel() for p in self.module.parameters())
        self._tokens_per_sample: int | None = None
        self._peak_flops = peak_flops(device, config.logging.peak_flops)
        self.system = SystemMonitor(device) if env.is_main and config.logging.system_metrics else None
        self.grad_watch = GradNormWatch(config.debug.grad_norm_low, config.debug.grad_norm_high)
        self.activation_stats = ActivationStats(self.module) if config.debug.activation_stats else None
        self._capture = False  # this step is logged: gather the expensive diagnostics
        self._layer_norms: dict[str, float] = {}

    # -----------------------------------------------------------------------------------
    # State: everything a restart needs, loadable with weights_only=True.

    def state_dict(self) -> dict[str, Any]:
        """The full training state; a collective (call on every rank), complete on rank 0.

        Per-rank parts (RNG streams, unlogged loss sums) are gathered from every rank;
        other ranks get an empty dict. Under FSDP the shards are gathered into full tensors.
        """
        if self.strategy == "fsdp":
            from ddp_train.checkpoint.sharded import full_optimizer_state_dict
            from ddp_train.distributed.fsdp import full_model_state_dict

            model, optimizer = (full_model_state_dict(self.module),
                                full_optimizer_state_dict(self.module, self.optimizer))
        else:
            model, optimizer = self.module.state_dict(), self.optimizer.state_dict()
        state = self._trainer_state()
        return {**state, "model": model, "optimizer": optimizer} if state else {}

    def _trainer_state(self) -> dict[str, Any]:
        """Everything but the model and optimizer tensors; a collective, complete on rank 0."""
        per_rank = {"rng": capture_rng(self.env.device), "loss_sums": self._loss_sums.cpu(),
                    "micro_since": list(self._micro_since)}
        ranks = self.env.gather_to_main(per_rank)
        if not self.env.is_main:
            return {}
        return {"format_version": FORMAT_VERSION, "scheduler": self.scheduler.state_dict(),
                "precision": self.precision.state_dict(),
                "early_stopping": self.early_stopping.state_dict(),
                "progress": dataclasses.asdict(self.progress),
                "sampler": self.train_loader.sampler.state_dict(),  # type: ignore[union-attr]
                "ranks": ranks, "world_size": self.env.world_size,
                "config": config_to_dict(self.config)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` as if never interrupted (same data order and RNG streams).

        ``state`` is a single-file checkpoint's, or a sharded checkpoint's trainer state
        (with its ``path``), whose tensors every rank then reads from its directory.
        """
        if "path" in state:
            from ddp_train.checkpoint.sharded import load_sharded

            load_sharded(Path(state["path"]), self.module, self.optimizer, state["optimizer_plain"])
        elif self.strategy == "fsdp":
            from ddp_train.checkpoint.sharded import load_full_state

            load_full_state(self.module, self.optimizer, state["model"], state["optimizer"])
        else:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state["precision"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        self.progress = TrainingProgress(**state["progress"])
        ranks = state["ranks"]
        if len(ranks) == self.env.world_size:
            mine = ranks[self.env.rank]
            restore_rng(mine["rng"], self.env.device)
            self._loss_sums.copy_(mine["loss_sums"])
            self._micro_since = list(mine["micro_since"])
        else:
            log.warning("the checkpoint comes from world size %d, this job has %d: the data "
                        "order is kept, but per-rank random streams (dropout) start afresh",
                        len(ranks), self.env.world_size)

    def _resume(self) -> bool:
        """Load the checkpoint ``checkpoint.resume`` names; True when one was loaded."""
        mode = self.config.checkpoint.resume
        found: tuple[dict[str, Any], Path] | None = None
        error: tuple[str, str] | None = None
        if self.env.is_main:
            self.checkpoints.remove_stale_temporaries()
            try:
                if mode == "never":
                    self.checkpoints.remove_all()
                elif mode == "auto":
                    found = self.checkpoints.load_newest()
                else:
                    found = self.checkpoints.load_path(Path(mode))
            except ConfigError as exc:
                error = (exc.key, exc.message)
        # Rank 0 chooses, so that every rank resumes from the same file.
        path, error = self.env.broadcast_from_main((str(found[1]) if found else None, error))
        if error is not None:
            raise ConfigError(*error)
        if path is None:
            return False
        if found is not None:
            state = found[0]
        else:
            try:
                state = self.checkpoints.read(Path(path))
            except ValueError as exc:
                raise TrainingFailed(f"rank {self.env.rank} cannot read checkpoint {path} that "
                                     f"rank 0 chose: it {exc} (is the run directory shared?)",
                                     shared=False) from None
        if self.env.is_main:
            _warn_config_changes(state.get("config", {}), config_to_dict(self.config), path)
        try:
            self.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError) as exc:
            # Typically a run name reused for a different model or optimizer.
            raise ConfigError("checkpoint.resume", f"checkpoint {path} does not fit this run "
                                                   f"({str(exc).splitlines()[0][:300]}); start over "
                                                   f"with checkpoint.resume=never or choose another "
                                                   f"run.name") from None
        if self.progress.status == "completed" and self.progress.global_step < self.total_steps:
            self.progress.status = "running"  # the config now asks for more steps
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
        started = time.perf_counter()
        previous_wall_time = self.progress.wall_time_s
        status = "failed"
        profile = self.config.profile
        self.profiler = StepProfiler(self.config.run_dir, self.env.rank, self.env.device, profile.wait,
                                     profile.warmup, profile.active, profile.record_shapes,
                                     profile.memory) if profile.enabled else None
        # The handlers stay installed until summary.json is written: a signal that comes
        # after the last step (while model.pt is written) must not kill the process with
        # neither file on disk; the run then simply completes.
        with PreemptionWatch(self.env, self.config.dist.preemption_sync_s) as preemption:
            try:
                try:
                    if self.profiler is not None:
                        self.profiler.start(self.progress.global_step)
                    status = self._train(preemption, started, previous_wall_time)
                except torch.cuda.OutOfMemoryError:
                    raise self._out_of_memory() from None
                finally:
                    preemption.drain()
                    self._stop_profiler()
                if status != "preempted":
                    self._write_model()
            finally:
                if self.env.is_main:
                    self.checkpoints.wait()
                self.progress.wall_time_s = previous_wall_time + time.perf_counter() - started
                summary = self._summary(status)
                if self.env.is_main:
                    self.run_dir.write_summary(summary)
        return summary

    def _stop_profiler(self) -> None:
        if self.profiler is None:
            return
        table = self.profiler.stop()
        if table:
            log.info("top operators by self time (rank 0; traces in %s):\n%s",
                     self.config.run_dir / "profile", table)
        self.profiler = None

    def _out_of_memory(self) -> TrainingFailed:
        """Write the CUDA memory summary next to the run and explain what to change."""
        path = self.config.run_dir / f"oom_memory_summary_rank{self.env.rank}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(torch.cuda.memory_summary(self.env.device))
        batch, accum = self.config.data.batch_size, self.config.train.grad_accum_steps
        smaller = f"data.batch_size={max(batch // 2, 1)} train.grad_accum_steps={accum * 2}" if batch > 1 else \
            "a smaller model, or train.precision=bf16"
        return TrainingFailed(f"rank {self.env.rank}: CUDA out of memory at optimizer step "
                              f"{self.progress.global_step + 1} (memory summary: {path}); try {smaller}, "
                              f"which keeps the global batch", shared=False)

    def _train(self, preemption: PreemptionWatch, started: float, previous_wall_time: float) -> str:
        config, progress = self.config, self.progress
        if progress.status != "running" or progress.global_step >= self.total_steps:
            return progress.status if progress.status != "running" else "completed"
        accum = config.train.grad_accum_steps
        log_every, val_every = config.logging.every_steps, config.eval.every_steps
        global_batch = self.env.world_size * config.data.batch_size * accum
        batches: Iterator[Any] | None = None
        window_start, window_steps = time.perf_counter(), 0

        self.module.train()
        while True:
            if batches is None:
                batches = self._epoch_batches()
            self._capture = (progress.global_step + 1) % log_every == 0
            if self.activation_stats is not None:
                self.activation_stats.capture = self._capture
            grad_norm, lr = self._optimizer_step(batches)
            progress.global_step += 1
            progress.step_in_epoch += 1
            window_steps += 1
            if self.profiler is not None:
                self.profiler.step()
            if self.console is not None:
                self.console.advance(progress.global_step)

            if self._capture:
                samples_per_s = global_batch * window_steps / (time.perf_counter() - window_start)
                self._log(self._train_record(grad_norm.item(), lr, samples_per_s))
                window_start, window_steps = time.perf_counter(), 0  # logging is not step time

            done = progress.global_step >= self.total_steps
            epoch_end = progress.step_in_epoch == self.steps_per_epoch
            validated = stop = False
            if epoch_end or done or (val_every and progress.global_step % val_every == 0):
                stop, validated = self._validate(), True
                window_start, window_steps = time.perf_counter(), 0  # validation is not step time
            if epoch_end:
                progress.epochs_completed += 1
                progress.epoch += 1
                progress.step_in_epoch = 0
                batches = None  # ends the epoch's iterator (and its worker processes)
            preempted = preemption.agreed()

            status = ("completed" if done else "early_stopped" if stop
                      else "preempted" if preempted else "running")
            if status != "preempted":
                progress.status = status
            best = (validated and config.checkpoint.save_best
                    and self.early_stopping.best_step == progress.global_step)
            if self._checkpoint_due(epoch_end, status) or best:
                progress.wall_time_s = previous_wall_time + time.perf_counter() - started
                self._save_checkpoint(periodic=self._checkpoint_due(epoch_end, status), best=best)
            if status != "running":
                return status

    def train_steps(self) -> Iterator[float | None]:
        """Optimizer steps over the training data in fit()'s order, endlessly, for probes such as
        the LR range test; no validation, logging or checkpoints.

        Yields after each step its loss, averaged over micro-batches and ranks (a collective:
        every rank must advance together), or None when the step was skipped as non-finite
        (``train.nonfinite=skip``). An LR set on the optimizer before a step is the one it uses.
        """
        self.module.train()
        batches: Iterator[Any] | None = None
        while True:
            if batches is None:
                batches = self._epoch_batches()
            self._optimizer_step(batches)
            self.progress.global_step += 1
            self.progress.step_in_epoch += 1
            if self.progress.step_in_epoch == self.steps_per_epoch:
                self.progress.epoch += 1
                self.progress.step_in_epoch = 0
                batches = None
            yield self._mean_loss(slot=0)

    def _train_record(self, grad_norm: float, lr: float, samples_per_s: float) -> dict[str, Any]:
        """The train/* metrics of a log step (plus sys/*, grad_norm/*, act/* when enabled)."""
        progress, config = self.progress, self.config
        record: dict[str, Any] = {"step": progress.global_step, "epoch": progress.epoch}
        train_loss = self._mean_loss(slot=0)
        if train_loss is not None:  # None when every step since the last log was skipped
            record["train/loss"] = train_loss
        record.update({"train/lr": lr, "train/grad_norm": grad_norm, "train/samples_per_s": samples_per_s})
        tokens = self._tokens_per_sample or 1
        if tokens > 1:
            record["train/tokens_per_s"] = samples_per_s * tokens
        if self._peak_flops is not None:
            # Model FLOPs utilisation: the 6·N·tokens estimate of a training step's FLOPs.
            achieved = training_flops_per_sample(self._num_params, tokens) * samples_per_s
            record["train/mfu"] = achieved / (self._peak_flops * self.env.world_size)
        if config.train.nonfinite == "skip":
            record["train/nonfinite_skips"] = progress.nonfinite_skips
        if self.system is not None:
            record.update(self.system.read())
            record.update(self.system.peak_memory())
        record.update(self._layer_norms)
        if self.activation_stats is not None:
            record.update(self.activation_stats.pop())
        self.grad_watch.check(grad_norm, progress.global_step)
        return record

    def _epoch_batches(self) -> Iterator[Any]:
        """An iterator over the rest of the current epoch (all of it, unless resuming mid-epoch)."""
        config, progress, env = self.config, self.progress, self.env
        # Worker seeds depend on (seed, rank, epoch) only, so a resumed run draws the same.
        self.train_loader.generator.manual_seed(  # type: ignore[union-attr]
            (config.run.seed * 1_000_003 + progress.epoch) * 1009 + env.rank)
        start = progress.step_in_epoch * config.train.grad_accum_steps * config.data.batch_size
        self.train_loader.sampler.set_position(progress.epoch, start)  # type: ignore[union-attr]
        return iter(self.train_loader)

    def _optimizer_step(self, batches: Iterator[Any]) -> tuple[torch.Tensor, float]:
        """One optimizer step over grad_accum_steps micro-batches; returns (grad norm, LR used).

        The grad norm is the global, pre-clip norm. A step whose loss or gradient norm is
        not finite updates nothing (``train.nonfinite=skip``) or ends training (``stop``).
        """
        accum = self.config.train.grad_accum_steps
        micro_losses = []
        for micro in range(accum):
            batch = next(batches)
            inputs, targets = to_device(batch, self.env.device) if self._move_batches else batch
            # Only the last micro-batch all-reduces; no_sync must cover both the forward
            # and the backward pass to suppress DDP's reducer.
            with self._gradient_sync(micro == accum - 1):
                with self.precision.autocast():
                    loss = self.loss_fn(self.model(inputs), targets)
                # The mean over micro-batches; no extra autograd node when there is one.
                self.precision.backward(loss / accum if accum > 1 else loss)
            micro_losses.append(loss.detach())
        # Summed in float64 on the device: no host sync, no rounding drift over a long log
        # window. One micro-batch's loss is added into the float64 sums as it is (the
        # in-place add promotes it exactly as .double() would, one op fewer).
        step_loss = micro_losses[0] if accum == 1 else torch.stack(micro_losses).double().sum()
        if self._tokens_per_sample is None:
            self._tokens_per_sample = _tokens_per_sample(inputs, self.task)
        self.precision.unscale_(self.optimizer)
        grads = [p.grad for p in self._trainable if p.grad is not None]
        grad_norm = self._grad_norm(grads)
        if self._capture and self.config.debug.layer_grad_norms:
            self._layer_norms = layer_grad_norms(self.module)
        lr = self.optimizer.param_groups[0]["lr"]
        if self._step_is_finite(step_loss, grad_norm):
            self._clip_gradients(grads, grad_norm)
            self.precision.step(self.optimizer)
            self._loss_sums += step_loss
            self._micro_since[0] += accum
            self._micro_since[1] += accum
        elif self.precision.scaler is not None:
            self.precision.scaler.update()  # forget this step's unscaling
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm, lr

    def _gradient_sync(self, enabled: bool) -> ContextManager[Any]:
        """A context for one micro-batch's forward and backward: reduce gradients or not."""
        if self.strategy == "fsdp":
            from ddp_train.distributed.fsdp import gradient_sync

            return gradient_sync(self.module, enabled)
        if self.ddp is not None and not enabled:
            return self.ddp.no_sync()
        return _REDUCE_AS_USUAL

    def _step_is_finite(self, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether this step may update the weights; the same answer on every rank.

        The gradient norm is computed from gradients DDP has already all-reduced, so it is
        identical on every rank, and a non-finite loss on any rank makes it non-finite
        everywhere: deciding on it needs no extra collective. The loss itself can decide
        alone only at world size 1. Under fp16 the grad scaler owns overflowing gradients
        (it skips the step and lowers the scale), so only the loss is watched.
        """
        # Scalars read on the host with .item(): no tensor ops; on CUDA the first read is the
        # step's one sync.
        bad = []
        if self.env.world_size == 1 and not math.isfinite(step_loss.item()):
            bad.append("loss")
        if self.precision.scaler is None and not math.isfinite(grad_norm.item()):
            bad.append("gradient norm")
        if not bad:
            self.progress.nonfinite_in_a_row = 0
            return True
        progress, train = self.progress, self.config.train
        what = " and ".join(bad)
        step = progress.global_step + 1
        progress.nonfinite_skips += 1
        progress.nonfinite_in_a_row += 1
        if train.nonfinite == "stop":
            raise TrainingFailed(f"non-finite {what} at optimizer step {step} (train.nonfinite=stop): "
                                 f"lower optim.lr, set train.clip_grad_norm, check the data, or "
                                 f"use train.nonfinite=skip")
        if progress.nonfinite_in_a_row >= train.max_nonfinite_skips:
            raise TrainingFailed(f"non-finite {what} at optimizer step {step}: "
                                 f"{progress.nonfinite_in_a_row} steps in a row skipped "
                                 f"(train.max_nonfinite_skips)")
        log.warning("non-finite %s at optimizer step %d: step skipped (%d so far)", what, step,
                    progress.nonfinite_skips)
        return False

    def _checkpoint_due(self, epoch_end: bool, status: str) -> bool:
        every_steps, every_epochs = self.config.checkpoint.every_steps, self.config.checkpoint.every_epochs
        if status == "preempted":
            return True
        if status != "running":  # the end of training, if checkpointing is on at all
            return every_steps > 0 or every_epochs > 0
        return ((every_steps > 0 and self.progress.global_step % every_steps == 0)
                or (epoch_end and every_epochs > 0 and self.progress.epochs_completed % every_epochs == 0))

    def _save_checkpoint(self, periodic: bool, best: bool) -> None:
        if self.strategy == "fsdp":
            # Every rank writes its own shards; rank 0 adds the rest.
            self.checkpoints.save(self.module, self.optimizer, self._trainer_state(),
                                  self.progress.global_step, periodic=periodic, best=best)
            return
        state = self.state_dict()  # a collective: every rank takes part
        if self.env.is_main:
            self.checkpoints.save(state, self.progress.global_step, periodic=periodic, best=best)

    def _clip_gradients(self, grads: list[torch.Tensor], grad_norm: torch.Tensor) -> None:
        """Clip by value and/or by the global norm (gradients are already unscaled)."""
        train = self.config.train
        if train.clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(self.module.parameters(), train.clip_grad_value)
            if train.clip_grad_norm is not None:  # the values changed: measure again
                grad_norm = self._grad_norm(grads)
        if train.clip_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.module.parameters(), train.clip_grad_norm, grad_norm)

    def _mean_loss(self, slot: int) -> float | None:
        """Mean micro-batch loss over all ranks since the slot was last read (None: no step); resets it."""
        count = torch.tensor(float(self._micro_since[slot]), dtype=torch.float64,
                             device=self._loss_sums.device)
        totals = self.env.all_reduce_sum(torch.stack([self._loss_sums[slot], count]))
        self._loss_sums[slot] = 0.0
        self._micro_since[slot] = 0
        if totals[1].item() == 0:
            return None
        mean = (totals[0] / totals[1]).item()
        if not math.isfinite(mean):
            # Every rank sees the same reduced value, so every rank raises together.
            raise TrainingFailed(f"non-finite training loss ({mean}) at or before optimizer step "
                                 f"{self.progress.global_step}: lower optim.lr, set "
                                 f"train.clip_grad_norm, or check the data")
        return mean

    def _validate(self) -> bool:
        """Validate, log, track the best; True when every rank should stop early."""
        progress = self.progress
        progress.last_val_step = progress.global_step
        if self._micro_since[1]:
            progress.train_loss_since_val = self._mean_loss(slot=1)
        if self.val_loader is None:
            return False
        metrics = self.evaluate()
        progress.last_val = metrics
        record = {"step": progress.global_step, "epoch": progress.epoch, **metrics}
        if progress.train_loss_since_val is not None:
            record["train/loss_avg"] = progress.train_loss_since_val
        self._log(record)
        return self.env.any_rank(self.early_stopping.update(metrics, progress.global_step))

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation metrics over the whole validation set, each sample counted once.

        Runs the unwrapped module (no DDP collectives in forward, so ranks may hold
        shards of different sizes; under FSDP short shards repeat a batch that is not
        counted) and reduces sums, not means, across ranks.
        """
        if self.val_loader is None:
            return {}
        was_training = self.module.training
        self.module.eval()
        accumulator = MetricAccumulator(self.task, self.env.device)
        # A sharded model's forward is a collective: every rank runs as many batches.
        if self.strategy == "fsdp":
            from ddp_train.distributed.fsdp import even_batches

            batches = even_batches(self.val_loader, self.env)
        else:
            batches = ((batch, True) for batch in self.val_loader)
        for batch, counts in batches:
            inputs, targets = to_device(batch, self.env.device)
            with self.precision.autocast():
                outputs = self.module(inputs)
                loss = self.loss_fn(outputs, targets)
            if counts:
                accumulator.update(outputs.float(), targets, loss.float())
        self.module.train(was_training)
        return accumulator.compute(self.env.all_reduce_sum)

    # -----------------------------------------------------------------------------------
    # Outputs.

    def _log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record)

    def _write_model(self) -> None:
        if self.strategy == "fsdp":
            from ddp_train.distributed.fsdp import full_model_state_dict

            state = full_model_state_dict(self.module)  # a collective: every rank takes part
            if self.env.is_main:
                self.run_dir.write_model(state)
        elif self.env.is_main:
            self.run_dir.write_model(plain_state_dict(self.module))

    def _summary(self, status: str) -> dict[str, Any]:
        progress, stopping = self.progress, self.early_stopping
        best: dict[str, Any] = {}
        if stopping.best_step is not None:
            best = {"step": stopping.best_step, "metric": stopping.config.metric,
                    **stopping.best_metrics}
        summary: dict[str, Any] = {
            "status": status, "global_step": progress.global_step,
            "epochs_completed": progress.epochs_completed, "world_size": self.env.world_size,
            "final": progress.last_val, "best": best, "wall_time_s": progress.wall_time_s}
        train_loss, val_loss = progress.train_loss_since_val, progress.last_val.get("val/loss")
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
        if self.env.is_main:
            self.checkpoints.wait()
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
            f"world size {trainer.env.world_size} on {trainer.env.device} ({trainer.strategy}) | "
            f"global batch {trainer.env.world_size * config.data.batch_size * config.train.grad_accum_steps} | "
            f"{trainer.total_steps} steps ({trainer.steps_per_epoch}/epoch) | "
            f"precision {config.train.precision} | run dir {config.run_dir}")
