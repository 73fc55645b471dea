"""The config's sections: one dataclass each, every field with a default and a docstring.

A field's docstring is the string literal right below it (read back by
:func:`~ddp_train.config.printing.field_help` for ``--print-config``). Each section checks
its own values in ``validate(key)``, ``key`` being its dotted place in the file
(``train.fsdp``); :meth:`TrainConfig.validate` runs them all, then the rules that span
sections. Failures are :class:`~ddp_train.errors.ConfigError` naming the key, what was
expected and what was given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ddp_train.errors import ConfigError

InitScheme = Literal["default", "kaiming", "xavier", "normal", "orthogonal"]
"""``model.init``: the weight initialisations (``default`` keeps the factory's own)."""
WeightNorm = Literal["none", "weight", "spectral"]
"""``model.norm``: the weight reparametrisations."""
PrecisionName = Literal["fp32", "bf16", "fp16"]
"""``train.precision``."""
Task = Literal["classification", "regression", "language_model", "none"]
"""The validation tasks (which metrics besides the loss)."""


def _check(ok: bool, key: str, expected: str, given: Any) -> None:
    if not ok:
        raise ConfigError(key, f"expected {expected}, got {given!r}")


class _Section:
    """A config section that has nothing to check beyond its field types."""

    def validate(self, key: str) -> None:
        """Check this section's values (the loader has already checked their types)."""


@dataclass
class RunConfig:
    """Where the run lives and how it is seeded."""

    name: str = "default"
    """Run name; the run directory is <output_dir>/<name>."""
    output_dir: str = "runs"
    """Directory that holds the run directories."""
    seed: int = 0
    """Seed of every RNG; the model is built from it on every rank, rank r then draws from seed + r."""
    deterministic: bool = False
    """Ask torch for deterministic algorithms (slower on GPU; errors on ops that have none)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device: auto = cuda:<LOCAL_RANK> when CUDA is available, else cpu."""

    def validate(self, key: str) -> None:
        """Check this section's values; a ConfigError names the key at fault."""
        _check(self.name.strip() != "" and "/" not in self.name, f"{key}.name",
               "a non-empty name without '/'", self.name)


@dataclass
class ModelConfig(_Section):
    """The model to train."""

    name: str = "mlp"
    """Built-in model (mlp, cnn, gpt) or 'package.module:factory' returning an nn.Module."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the factory; sizes the data set implies are filled in when left out."""
    init: InitScheme = "default"
    """Weight initialisation; default keeps the factory's own."""
    norm: WeightNorm = "none"
    """Reparametrise Linear/Conv weights with weight or spectral normalisation."""


@dataclass
class DataConfig:
    """The data sets and how they are loaded."""

    name: str = "digits"
    """Built-in data set or 'package.module:factory' returning (train_dataset, val_dataset)."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the data set factory."""
    batch_size: int = 32
    """Micro-batch size per rank; the global batch is world_size * batch_size * grad_accum_steps."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 loads in the training process)."""
    shuffle: bool = True
    """Shuffle the training set each epoch (the order depends on run.seed and the epoch only)."""
    collate: str | None = None
    """'package.module:fn' collating a list of items into a batch (training and validation); null: torch's default."""
    target_key: str = "labels"
    """For mapping batches: the entry that holds the targets (the model still receives the whole mapping)."""
    steps_per_epoch: int | None = None
    """Optimizer steps that make an epoch (needed for endless iterable data); null: one pass over the data."""

    def validate(self, key: str) -> None:
        """Check this section's values; a ConfigError names the key at fault."""
        _check(self.batch_size >= 1, f"{key}.batch_size", "an integer >= 1", self.batch_size)
        _check(self.num_workers >= 0, f"{key}.num_workers", "an integer >= 0", self.num_workers)
        _check(self.collate is None or ":" in self.collate, f"{key}.collate",
               "null or 'package.module:fn'", self.collate)
        _check(self.target_key != "", f"{key}.target_key", "a non-empty key", self.target_key)
        _check(self.steps_per_epoch is None or self.steps_per_epoch >= 1, f"{key}.steps_per_epoch",
               "null or an integer >= 1", self.steps_per_epoch)


@dataclass
class LossConfig(_Section):
    """The training objective."""

    name: str = "cross_entropy"
    """Built-in loss (cross_entropy, mse, l1, smooth_l1, bce_with_logits) or 'package.module:fn'."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the built-in loss (e.g. label_smoothing) or of a user factory."""


@dataclass
class OptimConfig:
    """The optimizer."""

    name: str = "adamw"
    """Built-in optimizer (sgd, adam, adamw, rmsprop) or 'package.module:Class' taking (params, lr=..., ...)."""
    lr: float = 3.0e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for adamw)."""
    momentum: float = 0.9
    """Momentum (sgd, rmsprop)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    args: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments of the optimizer (e.g. nesterov: true)."""

    def validate(self, key: str) -> None:
        """Check this section's values; a ConfigError names the key at fault."""
        _check(self.lr >= 0, f"{key}.lr", "a number >= 0", self.lr)
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "a number >= 0", self.weight_decay)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{key}.betas",
               "two numbers in [0, 1)", self.betas)


@dataclass
class ScheduleConfig:
    """The learning-rate schedule, stepped once per optimizer step."""

    name: str = "constant"
    """constant, linear, cosine, step, or 'package.module:factory' taking (optimizer, total_steps, warmup_steps)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to optim.lr."""
    min_lr_ratio: float = 0.0
    """Final LR of linear/cosine as a fraction of optim.lr."""
    step_size: int = 100
    """step: multiply the LR by gamma every step_size optimizer steps."""
    gamma: float = 0.1
    """step: the decay factor."""

    def validate(self, key: str) -> None:
        """Check this section's values; a ConfigError names the key at fault."""
        _check(self.warmup_steps >= 0, f"{key}.warmup_steps", "an integer >= 0", self.warmup_steps)
        _check(0 <= self.min_lr_ratio <= 1, f"{key}.min_lr_ratio", "a number in [0, 1]",
               self.min_lr_ratio)
        _check(self.step_size >= 1, f"{key}.step_size", "an integer >= 1", self.step_size)


@dataclass
class EarlyStoppingConfig:
    """Stop when a validation metric stops improving; the best value is tracked either way."""

    enabled: bool = False
    """Stop training after `patience` validations without improvement."""
    metric: str = "val/loss"
    """Validation metric to watch; also defines the 'best' entry of summary.json."""
    mode: Literal["min", "max"] = "min"
    """Whether smaller (min) or larger (max) is better."""
    patience: int = 3
    """Validations without improvement before stopping."""
    min_delta: float = 0.0
    """Smallest change that counts as an improvement."""

    def validate(self, key: str) -> None:
        """Check this section's values; a ConfigError names the key at fault."""
        _check(self.metric.startswith("val/"), f"{key}.metric",
               "a validation metric such as 'val/loss' or 'val/accuracy'", self.metric)
        _check(self.patience >= 1, f"{key}.patience", "an integer >= 1", self.patience)
        _check(self.min_delta >= 0, f"{key}.min_delta", "a number >= 0", self.min_delta)


@dataclass
class FSDPConfig:
    """Fully sharded data parallel (train.strategy=fsdp): how the model is sharded."""

    shard_modules: list[str] = field(default_factory=list)
    """Module class names sharded as units (then the root); empty: the model's fsdp_units(), else every direct child with parameters."""
    reshard_after_forward: bool = True
    """Free gathered parameters after each unit's forward (less memory, one more all-gather in backward)."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state in CPU memory (for models larger than the GPUs)."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """With train.precision=bf16: dtype gradients are reduce-scattered in (fp32 keeps the reduction exact)."""

    def validate(self, key: str) -> None:
        """Check this section's values; a ConfigError names the key at fault."""
        for i, name in enumerate(self.shard_modules):
            _check(name.isidentifier(), f"{key}.shard_modules[{i}]",
                   "a module class name such as 'GPTBlock'", name)


@dataclass
class LoopConfig:
    """The training loop (the `train` section)."""

    epochs: int = 10
    """Passes over the training set; training ends at epochs or max_steps, whichever comes first."""
    max_steps: int | None = None
    """Optimizer steps to stop at (null: no limit)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; gradients are all-reduced only on the last one."""
    step_fn: str | None = None
    """'package.module:fn' with fn(model, batch) -> loss or (loss, {name: float}), replacing loss(model(inputs), targets)."""
    clip_grad_norm: float | None = None
    """Clip the global gradient norm to this value (after unscaling), or null."""
    clip_grad_value: float | None = None
    """Clip every gradient element to [-value, value] (after unscaling), or null."""
    precision: PrecisionName = "fp32"
    """fp32; bf16 autocast; fp16 autocast with a gradient scaler (CUDA only)."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """auto = ddp when world size > 1, none otherwise; ddp; fsdp (sharded parameters, gradients and optimizer state)."""
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    """FSDP sharding (train.strategy=fsdp only)."""
    compile: bool = False
    """Compile the model with torch.compile."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient norm: stop (exit 1, status failed) or skip that step on all ranks."""
    max_nonfinite_skips: int = 10
    """With nonfinite=skip: stop after this many skipped steps in a row."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Early stopping."""

    def validate(self, key: str) -> None:
        """Check this section's values and its subsections'; a ConfigError names the key at fault."""
        _check(self.epochs >= 1, f"{key}.epochs", "an integer >= 1", self.epochs)
        _check(self.max_steps is None or self.max_steps >= 1, f"{key}.max_steps",
               "null or an integer >= 1", self.max_steps)
        _check(self.grad_accum_steps >= 1, f"{key}.grad_accum_steps", "an integer >= 1",
               self.grad_accum_steps)
        for name in ("clip_grad_norm", "clip_grad_value"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"{key}.{name}", "null or a number > 0", value)
        _check(self.step_fn is None or ":" in self.step_fn, f"{key}.step_fn",
               "null or 'package.module:fn'", self.step_fn)
        _check(self.max_nonfinite_skips >= 1, f"{key}.max_nonfinite_skips", "an integer >= 1",
               self.max_nonfinite_skips)
        self.fsdp.validate(f"{key}.fsdp")
        self.early_stopping.validate(f"{key}.early_stopping")


@dataclass
class EvalConfig:
    """Validation: always at the end of each epoch and at the end of training."""

    every_steps: int = 0
    """Also validate every N optimizer steps (0: only at epoch ends)."""
    batch_size: int | None = None
    """Validation batch size per rank (null: data.batch_size)."""
    task: Literal["auto", Task] = "auto"
    """Which metrics besides the loss; auto asks the data set, then the loss."""

    def validate(self, key: str) -> None:
        """Check this section's values; a ConfigError names the key at fault."""
        _check(self.every_steps >= 0, f"{key}.every_steps", "an integer >= 0", self.every_steps)
        _check(self.batch_size is None or self.batch_size >= 1, f"{key}.batch_size",
               "null or an integer >= 1", self.batch_size)


@dataclass
class LoggingConfig:
    """Metrics and console output (rank 0 only)."""

    every_steps: int = 10
    """Log train/* metrics every N optimizer steps."""
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    """auto = a progress bar on a terminal (tqdm installed), plain lines otherwise."""
    system_metrics: bool = True
    """Log CPU/RAM (psutil) and, with nvidia-ml-py and a GPU, GPU use, memory, power, temperature."""
    tensorboard: bool = False
    """Also write TensorBoard event files under <run_dir>/tensorboard (extra: tensorboard)."""
    csv: bool = False
    """Also write <run_dir>/metrics.csv."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for train/mfu (null: from a table of known GPUs; none on CPU)."""

    def validate(self, key: str) -> None:
        """Check this section's values; a ConfigError names the key at fault."""
        _check(self.every_steps >= 1, f"{key}.every_steps", "an integer >= 1", self.every_steps)
        _check(self.peak_flops is None or self.peak_flops > 0, f"{key}.peak_flops",
               "null or a number of FLOP/s > 0", self.peak_flops)


@dataclass
class ProfileConfig:
    """torch.profiler over a few optimizer steps; a Chrome trace per rank under <run_dir>/profile."""

    enabled: bool = False
    """Profile training steps."""
    wait: int = 1
    """Steps to skip before profiling."""
    warmup: int = 1
    """Steps profiled but discarded (warms the profiler up)."""
    active: int = 3
    """Steps recorded."""
    record_shapes: bool = False
    """Record operator input shapes."""
    memory: bool = False
    """Record tensor allocations."""

    def validate(self, key: str) -> None:
        """Check this section's values; a ConfigError names the key at fault."""
        for name in ("wait", "warmup"):
            _check(getattr(self, name) >= 0, f"{key}.{name}", "an integer >= 0", getattr(self, name))
        _check(self.active >= 1, f"{key}.active", "an integer >= 1", self.active)


@dataclass
class DebugConfig:
    """Gradient and activation diagnostics (at log steps)."""

    layer_grad_norms: bool = False
    """Log grad_norm/<parameter> for every parameter."""
    activation_stats: bool = False
    """Log act/<module>/mean, std and absmax of every leaf module's output (forward hooks)."""
    grad_norm_low: float = 1.0e-7
    """Warn of vanishing gradients when the global norm falls below this."""
    grad_norm_high: float = 1.0e3
    """Warn of exploding gradients when the global norm exceeds this."""

    def validate(self, key: str) -> None:
        """Check this section's values; a ConfigError names the key at fault."""
        _check(0 <= self.grad_norm_low < self.grad_norm_high, f"{key}.grad_norm_low",
               "0 <= grad_norm_low < grad_norm_high", self.grad_norm_low)


@dataclass
class CheckpointConfig:
    """Checkpoints for exact resume (rank 0 writes them under <run_dir>/checkpoints)."""

    every_steps: int = 0
    """Save every N optimizer steps (0: not by steps)."""
    every_epochs: int = 1
    """Save at the end of every N epochs (0: not by epochs); with either on, also at the end."""
    keep_last: int = 2
    """How many of the newest periodic checkpoints to keep."""
    save_best: bool = False
    """Also keep the checkpoint with the best train.early_stopping.metric, apart from keep_last."""
    resume: str = "auto"
    """auto: the newest complete checkpoint of this run (else start fresh); never; or a path."""
    async_save: bool = False
    """Copy the state to CPU, then write it in a background thread while training goes on."""

    def validate(self, key: str) -> None:
        """Check this section's values; a ConfigError names the key at fault."""
        for name in ("every_steps", "every_epochs"):
            value = getattr(self, name)
            _check(value >= 0, f"{key}.{name}", "an integer >= 0 (0: off)", value)
        _check(self.keep_last >= 1, f"{key}.keep_last", "an integer >= 1", self.keep_last)
        _check(self.resume.strip() != "", f"{key}.resume", "auto, never or a checkpoint path",
               self.resume)


@dataclass
class DistConfig:
    """The process group and the DDP wrapper."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto = nccl on CUDA, gloo on CPU."""
    timeout_s: float = 300.0
    """Seconds a collective may wait for a peer before the job fails."""
    bucket_cap_mb: float = 25.0
    """DDP gradient bucket size in MiB."""
    find_unused_parameters: bool = False
    """DDP: allow parameters that get no gradient in some steps (costs a graph traversal)."""
    gradient_as_bucket_view: bool = True
    """DDP: gradients are views into the all-reduce buckets (no copy, less memory); false if code detach_()es .grad."""
    preemption_sync_s: float = 0.2
    """Seconds between the ranks' checks for a preemption signal (0: after every step)."""

    def validate(self, key: str) -> None:
        """Check this section's values; a ConfigError names the key at fault."""
        _check(self.timeout_s > 0, f"{key}.timeout_s", "a number of seconds > 0", self.timeout_s)
        _check(self.bucket_cap_mb > 0, f"{key}.bucket_cap_mb", "a number > 0", self.bucket_cap_mb)
        _check(0 <= self.preemption_sync_s <= 60, f"{key}.preemption_sync_s",
               "a number of seconds from 0 to 60", self.preemption_sync_s)


@dataclass
class TrainConfig:
    """The whole configuration of a run (the root of the YAML file)."""

    run: RunConfig = field(default_factory=RunConfig)
    """Run directory and seeding."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """LR schedule."""
    train: LoopConfig = field(default_factory=LoopConfig)
    """Training loop."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """Profiler."""
    debug: DebugConfig = field(default_factory=DebugConfig)
    """Diagnostics."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Distributed."""

    def validate(self) -> None:
        """Check every section, then the rules across sections; a ConfigError names the key."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate(section.name)

    @property
    def run_dir(self) -> Path:
        """``<run.output_dir>/<run.name>``."""
        return Path(self.run.output_dir) / self.run.name

