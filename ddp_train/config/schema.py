"""Run configuration: nested dataclasses, YAML files, dotted ``key=value`` overrides.

Every field has a default and a one-line docstring (read back with :func:`field_help`,
so ``--print-config`` can show it). Loading checks every key and value and raises
:class:`ConfigError` naming the key, what was expected and what was given; unknown keys
come with the closest valid key. Sources stack as defaults < file < overrides.

This module does not import torch: a config error is reported before anything heavy
is imported, any process group exists, or any file is written.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ddp_train.errors import ConfigError

# ---------------------------------------------------------------------------------------
# Sections. A field's docstring is the string literal right below it.


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


@dataclass
class ModelConfig:
    """The model to train."""

    name: str = "mlp"
    """Built-in model (mlp, cnn, gpt) or 'package.module:factory' returning an nn.Module."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the factory; sizes the data set implies are filled in when left out."""
    init: Literal["default", "kaiming", "xavier", "normal", "orthogonal"] = "default"
    """Weight initialisation; default keeps the factory's own."""
    norm: Literal["none", "weight", "spectral"] = "none"
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


@dataclass
class LossConfig:
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


@dataclass
class FSDPConfig:
    """Fully sharded data parallel (train.strategy=fsdp): how the model is sharded."""

    shard_modules: list[str] = field(default_factory=list)
    """Module class names sharded as units (then the root); empty: GPT blocks, else every direct child with parameters."""
    reshard_after_forward: bool = True
    """Free gathered parameters after each unit's forward (less memory, one more all-gather in backward)."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state in CPU memory (for models larger than the GPUs)."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """With train.precision=bf16: dtype gradients are reduce-scattered in (fp32 keeps the reduction exact)."""


@dataclass
class LoopConfig:
    """The training loop (the `train` section)."""

    epochs: int = 10
    """Passes over the training set; training ends at epochs or max_steps, whichever comes first."""
    max_steps: int | None = None
    """Optimizer steps to stop at (null: no limit)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; gradients are all-reduced only on the last one."""
    clip_grad_norm: float | None = None
    """Clip the global gradient norm to this value (after unscaling), or null."""
    clip_grad_value: float | None = None
    """Clip every gradient element to [-value, value] (after unscaling), or null."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
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


@dataclass
class EvalConfig:
    """Validation: always at the end of each epoch and at the end of training."""

    every_steps: int = 0
    """Also validate every N optimizer steps (0: only at epoch ends)."""
    batch_size: int | None = None
    """Validation batch size per rank (null: data.batch_size)."""
    task: Literal["auto", "classification", "regression", "language_model", "none"] = "auto"
    """Which metrics besides the loss; auto asks the data set, then the loss."""


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
        """Check value ranges and cross-field rules; raises ConfigError naming the key."""
        _check(self.run.name.strip() != "" and "/" not in self.run.name, "run.name",
               "a non-empty name without '/'", self.run.name)
        _check(self.data.batch_size >= 1, "data.batch_size", "an integer >= 1", self.data.batch_size)
        _check(self.data.num_workers >= 0, "data.num_workers", "an integer >= 0", self.data.num_workers)
        _check(self.optim.lr >= 0, "optim.lr", "a number >= 0", self.optim.lr)
        _check(self.optim.weight_decay >= 0, "optim.weight_decay", "a number >= 0",
               self.optim.weight_decay)
        _check(len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas),
               "optim.betas", "two numbers in [0, 1)", self.optim.betas)
        _check(self.schedule.warmup_steps >= 0, "schedule.warmup_steps", "an integer >= 0",
               self.schedule.warmup_steps)
        _check(0 <= self.schedule.min_lr_ratio <= 1, "schedule.min_lr_ratio", "a number in [0, 1]",
               self.schedule.min_lr_ratio)
        _check(self.schedule.step_size >= 1, "schedule.step_size", "an integer >= 1",
               self.schedule.step_size)
        _check(self.train.epochs >= 1, "train.epochs", "an integer >= 1", self.train.epochs)
        _check(self.train.max_steps is None or self.train.max_steps >= 1, "train.max_steps",
               "null or an integer >= 1", self.train.max_steps)
        _check(self.train.grad_accum_steps >= 1, "train.grad_accum_steps", "an integer >= 1",
               self.train.grad_accum_steps)
        for key in ("clip_grad_norm", "clip_grad_value"):
            value = getattr(self.train, key)
            _check(value is None or value > 0, f"train.{key}", "null or a number > 0", value)
        self._validate_fsdp()
        stopping = self.train.early_stopping
        _check(stopping.metric.startswith("val/"), "train.early_stopping.metric",
               "a validation metric such as 'val/loss' or 'val/accuracy'", stopping.metric)
        _check(stopping.patience >= 1, "train.early_stopping.patience", "an integer >= 1",
               stopping.patience)
        _check(stopping.min_delta >= 0, "train.early_stopping.min_delta", "a number >= 0",
               stopping.min_delta)
        _check(self.eval.every_steps >= 0, "eval.every_steps", "an integer >= 0",
               self.eval.every_steps)
        _check(self.eval.batch_size is None or self.eval.batch_size >= 1, "eval.batch_size",
               "null or an integer >= 1", self.eval.batch_size)
        _check(self.logging.every_steps >= 1, "logging.every_steps", "an integer >= 1",
               self.logging.every_steps)
        for key in ("every_steps", "every_epochs"):
            value = getattr(self.checkpoint, key)
            _check(value >= 0, f"checkpoint.{key}", "an integer >= 0 (0: off)", value)
        _check(self.checkpoint.keep_last >= 1, "checkpoint.keep_last", "an integer >= 1",
               self.checkpoint.keep_last)
        _check(self.checkpoint.resume.strip() != "", "checkpoint.resume",
               "auto, never or a checkpoint path", self.checkpoint.resume)
        _check(self.train.max_nonfinite_skips >= 1, "train.max_nonfinite_skips", "an integer >= 1",
               self.train.max_nonfinite_skips)
        _check(self.logging.peak_flops is None or self.logging.peak_flops > 0, "logging.peak_flops",
               "null or a number of FLOP/s > 0", self.logging.peak_flops)
        for key in ("wait", "warmup", "active"):
            value = getattr(self.profile, key)
            _check(value >= (1 if key == "active" else 0), f"profile.{key}",
                   "an integer >= 1" if key == "active" else "an integer >= 0", value)
        _check(0 <= self.debug.grad_norm_low < self.debug.grad_norm_high, "debug.grad_norm_low",
               "0 <= grad_norm_low < grad_norm_high", self.debug.grad_norm_low)
        _check(self.dist.timeout_s > 0, "dist.timeout_s", "a number of seconds > 0",
               self.dist.timeout_s)
        _check(self.dist.bucket_cap_mb > 0, "dist.bucket_cap_mb", "a number > 0",
               self.dist.bucket_cap_mb)
        _check(0 <= self.dist.preemption_sync_s <= 60, "dist.preemption_sync_s",
               "a number of seconds from 0 to 60", self.dist.preemption_sync_s)

    def _validate_fsdp(self) -> None:
        """Rules of train.strategy=fsdp: what FSDP cannot combine with, said up front."""
        for i, name in enumerate(self.train.fsdp.shard_modules):
            _check(name.isidentifier(), f"train.fsdp.shard_modules[{i}]",
                   "a module class name such as 'GPTBlock'", name)
        if self.train.strategy != "fsdp":
            return
        # GradScaler's overflow check sees only this rank's gradient shards, so ranks
        # could disagree on skipping a step.
        _check(self.train.precision != "fp16", "train.precision",
               "fp32 or bf16 with train.strategy=fsdp (fp16's gradient scaler does not "
               "agree on overflows across shards)", self.train.precision)
        # A parametrized weight is computed from its parts, which FSDP would shard apart.
        _check(self.model.norm == "none", "model.norm",
               "none with train.strategy=fsdp (weight/spectral norm parametrizations cannot "
               "be sharded)", self.model.norm)
        _check(not self.checkpoint.async_save, "checkpoint.async_save",
               "false with train.strategy=fsdp (every rank already writes its own shard "
               "in parallel)", self.checkpoint.async_save)

    @property
    def run_dir(self) -> Path:
        """``<run.output_dir>/<run.name>``."""
        return Path(self.run.output_dir) / self.run.name


def _check(ok: bool, key: str, expected: str, given: Any) -> None:
    if not ok:
        raise ConfigError(key, f"expected {expected}, got {given!r}")


# ---------------------------------------------------------------------------------------
# Field documentation, read from the attribute docstrings in this file's source.


@functools.cache
def _docstrings(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source shipped (e.g. a zipped install): no help text
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = following.value.value.strip()
    return docs


def field_help(cls: type, name: str) -> str:
    """The one-line description of field ``name`` of config section ``cls``."""
    return _docstrings(cls).get(name, "")


# ---------------------------------------------------------------------------------------
# YAML: PyYAML follows YAML 1.1, where "1e-3" is a string; users mean a float.

_FLOAT_RE = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (``1e-3``)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """Parse YAML text with the config's loader."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping; every failure is a ConfigError."""
    file = Path(path)
    if not file.is_file():
        reason = "is a directory" if file.is_dir() else "does not exist"
        raise ConfigError("", f"config file {str(file)!r} {reason}")
    try:
        data = parse_yaml(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("", f"config file {str(file)!r} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("", f"config file {str(file)!r} is not valid YAML{where}: {problem}") from None
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {str(file)!r}: {exc.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"config file {str(file)!r} must hold a mapping of sections at the "
                              f"top level (run:, model:, ...), got a {type(data).__name__}")
    # config.yaml of a finished run records versions; it stays loadable as a config file.
    data.pop("versions", None)
    return data


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` override to a raw (not yet validated) mapping."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key or any(part == "" for part in key.split(".")):
        raise ConfigError("", f"override {override!r} is not of the form dotted.key=value "
                              f"(e.g. optim.lr=3e-4)")
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(key, f"override value {text!r} is not a YAML scalar or list") from None
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[:depth + 1]),
                              f"cannot set {key!r}: this key holds a {type(child).__name__}, "
                              f"not a mapping")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
                ) -> TrainConfig:
    """Defaults, then the YAML file at ``path``, then ``overrides``; validated."""
    raw = read_config_file(path) if path is not None else {}
    for override in overrides:
        apply_override(raw, override)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Build and validate a TrainConfig from a nested mapping of plain values."""
    config = _build(TrainConfig, raw, prefix="")
    config.validate()
    return config


# ---------------------------------------------------------------------------------------
# Type checking against the dataclass annotations.


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip("."), f"expected a mapping of {cls.__name__} keys, "
                                             f"got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ConfigError(f"{prefix}{key}", f"unknown key{hint} (valid keys here: "
                                                f"{', '.join(names)})")
    kwargs = {name: _coerce(raw[name], hints[name], f"{prefix}{name}")
              for name in names if name in raw}
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Return ``value`` as type ``hint`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        try:
            return _coerce(value, inner, key)
        except ConfigError as exc:
            raise ConfigError(key, exc.message.replace("expected ", "expected null or ", 1)) from None
    if origin is Literal:
        if value in args and isinstance(value, str):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_text = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(key, f"expected one of {', '.join(map(str, args))}, got {value!r}{hint_text}")
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, f"expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    if hint is Any:
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {hint!r}")


# ---------------------------------------------------------------------------------------
# Output.


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as a nested mapping of plain values."""
    return dataclasses.asdict(config)


def config_to_yaml(config: TrainConfig, extra: dict[str, Any] | None = None) -> str:
    """The config as YAML with each key's description as a comment; loadable again."""
    lines: list[str] = []
    _emit(config, lines, indent=0)
    if extra:
        lines.append(yaml.safe_dump(extra, sort_keys=False).rstrip())
    return "\n".join(lines) + "\n"


def _emit(section: Any, lines: list[str], indent: int) -> None:
    pad = "  " * indent
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        help_text = field_help(type(section), f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:  # {help_text}" if help_text else f"{pad}{f.name}:")
            _emit(value, lines, indent + 1)
            continue
        dumped = yaml.safe_dump({f.name: value}, default_flow_style=True, sort_keys=False,
                                width=10_000).strip()
        dumped = dumped[1:-1] if dumped.startswith("{") else dumped  # "{k: v}" -> "k: v"
        lines.append(f"{pad}{dumped}  # {help_text}" if help_text else f"{pad}{dumped}")
