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
import math
import os
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


MAX_COUNT = 2**31 - 1
"""The largest count (of steps, epochs, samples, ...) any key accepts. A larger one is a typo,
and keeping counts within 32 bits keeps their products (steps x batch x world size, seed +
epoch) within the 64-bit integers torch computes with."""
MAX_SEED = 2**32 - 1
"""``run.seed``'s upper bound, NumPy's: torch takes seeds below 2**64, and the seeds derived
from run.seed (rank r's seed + r, the loaders' mix of seed, epoch and rank) stay below that."""
MAX_TIMEOUT_S = 7 * 24 * 3600.0
"""``dist.timeout_s``'s upper bound (7 days): a hung peer must fail the job at some point (an
infinite timeout overflows the process group's timedelta; 1e12 s would be none at all)."""
MAX_WORKERS = 256
"""``data.num_workers``'s upper bound: worker processes per rank. A fixed bound, not one
read from this machine, so that a config valid on a large node stays valid where it is
reloaded (``export`` reads a run's config.yaml on any machine)."""
MAX_BUCKET_MB = 65536.0
"""``dist.bucket_cap_mb``'s upper bound (64 GiB): larger than any device's gradients; DDP
turns the size into a C++ byte count, which a huge value would overflow."""
NAME_MAX_BYTES = 255
"""The longest file name (in bytes) Linux file systems take: ``run.name`` is one."""
PATH_MAX_BYTES = 4096 - 256
"""The longest run directory path: PATH_MAX, less room for the files written inside it."""
_SHOWN_CHARS = 80


def shown(value: Any) -> str:
    """``repr(value)`` cut to a readable length, for one-line error messages."""
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python will print
        return f"<{type(value).__name__} too long to print>"
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS - 3]}..."


def _check(ok: bool, key: str, expected: str, given: Any) -> None:
    if not ok:
        raise ConfigError(key, f"expected {expected}, got {shown(given)}")


def _check_number(key: str, value: float | None, low: float, high: float | None = None, *,
                  integer: bool = False, low_open: bool = False, high_open: bool = False,
                  nullable: bool = False, unit: str = "") -> None:
    """``value`` is finite and within ``low``..``high`` (closed unless ``*_open``; no upper
    bound when ``high`` is None); ``nullable`` lets None through. ``unit`` follows the range
    in the message (e.g. ``" seconds"``)."""
    if value is None and nullable:
        return
    # Integers are exact at any size (math.isfinite would overflow on a huge one).
    finite = value is not None and (isinstance(value, int) or math.isfinite(value))
    ok = finite and (value > low if low_open else value >= low)  # type: ignore[operator]
    if ok and high is not None:
        ok = value < high if high_open else value <= high  # type: ignore[operator]
    kind = "an integer" if integer else "a finite number"
    if high is None:
        expected = f"{kind} {'>' if low_open else '>='} {_number_text(low)}{unit}"
    else:
        expected = (f"{kind} in {'(' if low_open else '['}{_number_text(low)}, "
                    f"{_number_text(high)}{')' if high_open else ']'}{unit}")
    _check(ok, key, f"null or {expected}" if nullable else expected, value)


def _number_text(bound: float) -> str:
    """A range bound as the user would type it: integers in full, floats without trailing zeros."""
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _check_count(key: str, value: int | None, low: int, *, nullable: bool = False) -> None:
    """``value`` is an integer from ``low`` to :data:`MAX_COUNT` (or None when ``nullable``)."""
    _check_number(key, value, low, MAX_COUNT, integer=True, nullable=nullable)


def _check_import_path(key: str, path: str, expected: str) -> None:
    """``path`` is ``package.module:attr`` made of Python identifiers (what can be imported
    without importing anything the user did not name, such as a relative module)."""
    module, sep, attr = path.partition(":")
    parts = [*module.split("."), *attr.split(".")]
    _check(sep == ":" and all(part.isidentifier() for part in parts), key, expected, path)


def _check_factory_name(key: str, name: str) -> None:
    """A built-in name is left to the registry (which suggests the closest one); a user's
    ``package.module:factory`` must be importable as written."""
    if ":" in name:
        _check_import_path(key, name, "a built-in name or 'package.module:factory' made of "
                                      "Python identifiers")


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
        """Check this section's values, and that the run directory can be a directory; a
        ConfigError names the key at fault."""
        # One directory level below output_dir: '.', '..' and '/' would leave it.
        _check(self.name.strip() not in ("", ".", "..") and "/" not in self.name
               and _is_path_text(self.name) and len(os.fsencode(self.name)) <= NAME_MAX_BYTES,
               f"{key}.name", f"a directory name: not empty, '.' or '..', without '/' or control "
                              f"characters, at most {NAME_MAX_BYTES} bytes", self.name)
        _check(_is_path_text(self.output_dir)
               and all(len(os.fsencode(part)) <= NAME_MAX_BYTES for part in Path(self.output_dir).parts),
               f"{key}.output_dir", f"a directory path without control characters, each part at "
                                    f"most {NAME_MAX_BYTES} bytes", self.output_dir)
        _check_number(f"{key}.seed", self.seed, 0, MAX_SEED, integer=True)
        _check_run_directory(key, Path(self.output_dir) / self.name)


def _is_path_text(text: str) -> bool:
    """No NUL, control character or lone surrogate: text the OS takes as a path as it reads."""
    return all(char.isprintable() or char == " " for char in text)


def _check_run_directory(key: str, run_dir: Path) -> None:
    """The run directory, or else the nearest of its parents that exists, is a directory this
    process may write into, and its path leaves room for the files written inside it.

    Read-only (nothing is created): run before any process group exists or any file is
    written, so that a path through a file fails as a config error, not as a traceback
    from the first mkdir.
    """
    # Not normalised: 'file/../x' fails at the OS, as 'file' is not a directory, so it fails here.
    absolute = Path.cwd() / run_dir
    _check(len(os.fsencode(str(absolute))) <= PATH_MAX_BYTES, f"{key}.output_dir",
           f"a run directory path of at most {PATH_MAX_BYTES} bytes", str(absolute))
    for path in (absolute, *absolute.parents):
        try:
            if not path.exists():
                continue
            is_dir = path.is_dir()
        except OSError as exc:
            raise ConfigError(f"{key}.output_dir", f"cannot inspect {str(path)!r}: "
                                                  f"{exc.strerror or exc}") from None
        at_fault = f"{key}.name" if path == absolute else f"{key}.output_dir"
        if not is_dir:
            raise ConfigError(at_fault, f"expected a directory (or a path that can be created), "
                                        f"but {str(path)!r} is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(at_fault, f"expected a directory this process may write into, "
                                        f"but {str(path)!r} is not writable")
        return


@dataclass
class ModelConfig:
    """The model to train."""

    name: str = "mlp"
    """Built-in model (mlp, cnn, gpt) or 'package.module:factory' returning an nn.Module."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the factory; sizes the data set implies are filled in when left out."""
    init: InitScheme = "default"
    """Weight initialisation; default keeps the factory's own."""
    norm: WeightNorm = "none"
    """Reparametrise Linear/Conv weights with weight or spectral normalisation."""

    def validate(self, key: str) -> None:
        """Check this section's values; a ConfigError names the key at fault."""
        _check_factory_name(f"{key}.name", self.name)


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
        _check_factory_name(f"{key}.name", self.name)
        _check_count(f"{key}.batch_size", self.batch_size, 1)
        _check_number(f"{key}.num_workers", self.num_workers, 0, MAX_WORKERS, integer=True,
                      unit=" (worker processes per rank; more would exhaust the machine's processes)")
        if self.collate is not None:
            _check_import_path(f"{key}.collate", self.collate, "null or 'package.module:fn'")
        _check(self.target_key != "", f"{key}.target_key", "a non-empty key", self.target_key)
        _check_count(f"{key}.steps_per_epoch", self.steps_per_epoch, 1, nullable=True)


@dataclass
class LossConfig:
    """The training objective."""

    name: str = "cross_entropy"
    """Built-in loss (cross_entropy, mse, l1, smooth_l1, bce_with_logits) or 'package.module:fn'."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the built-in loss (e.g. label_smoothing) or of a user factory."""

    def validate(self, key: str) -> None:
        """Check this section's values; a ConfigError names the key at fault."""
        _check_factory_name(f"{key}.name", self.name)


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
        _check_factory_name(f"{key}.name", self.name)
        _check_number(f"{key}.lr", self.lr, 0, low_open=True)
        _check_number(f"{key}.weight_decay", self.weight_decay, 0)
        _check_number(f"{key}.momentum", self.momentum, 0, 1, high_open=True)
        _check(len(self.betas) == 2, f"{key}.betas", "two numbers in [0, 1)", self.betas)
        for i, beta in enumerate(self.betas):
            _check_number(f"{key}.betas[{i}]", beta, 0, 1, high_open=True)


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
        _check_factory_name(f"{key}.name", self.name)
        _check_count(f"{key}.warmup_steps", self.warmup_steps, 0)
        _check_number(f"{key}.min_lr_ratio", self.min_lr_ratio, 0, 1)
        _check_count(f"{key}.step_size", self.step_size, 1)
        # 0 would stop learning after step_size steps; above 1 the LR would grow without end.
        _check_number(f"{key}.gamma", self.gamma, 0, 1, low_open=True)


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
        _check_count(f"{key}.patience", self.patience, 1)
        _check_number(f"{key}.min_delta", self.min_delta, 0)


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
        _check_count(f"{key}.epochs", self.epochs, 1)
        _check_count(f"{key}.max_steps", self.max_steps, 1, nullable=True)
        _check_count(f"{key}.grad_accum_steps", self.grad_accum_steps, 1)
        for name in ("clip_grad_norm", "clip_grad_value"):
            # No clipping is null, not infinity.
            _check_number(f"{key}.{name}", getattr(self, name), 0, low_open=True, nullable=True)
        if self.step_fn is not None:
            _check_import_path(f"{key}.step_fn", self.step_fn, "null or 'package.module:fn'")
        _check_count(f"{key}.max_nonfinite_skips", self.max_nonfinite_skips, 1)
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
        _check_count(f"{key}.every_steps", self.every_steps, 0)
        _check_count(f"{key}.batch_size", self.batch_size, 1, nullable=True)


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
        _check_count(f"{key}.every_steps", self.every_steps, 1)
        _check_number(f"{key}.peak_flops", self.peak_flops, 0, low_open=True, nullable=True,
                      unit=" FLOP/s")


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
            _check_count(f"{key}.{name}", getattr(self, name), 0)
        _check_count(f"{key}.active", self.active, 1)


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
        _check_number(f"{key}.grad_norm_high", self.grad_norm_high, 0, low_open=True)
        _check_number(f"{key}.grad_norm_low", self.grad_norm_low, 0, self.grad_norm_high,
                      high_open=True, unit=" (below grad_norm_high)")


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
            _check_count(f"{key}.{name}", getattr(self, name), 0)
        _check_count(f"{key}.keep_last", self.keep_last, 1)
        _check(self.resume.strip() != "" and _is_path_text(self.resume), f"{key}.resume",
               "auto, never or a checkpoint path without control characters", self.resume)


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
        _check_number(f"{key}.timeout_s", self.timeout_s, 0, MAX_TIMEOUT_S, low_open=True,
                      unit=" seconds (at most 7 days)")
        _check_number(f"{key}.bucket_cap_mb", self.bucket_cap_mb, 0, MAX_BUCKET_MB, low_open=True,
                      unit=" MiB")
        _check_number(f"{key}.preemption_sync_s", self.preemption_sync_s, 0, 60, unit=" seconds")


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

