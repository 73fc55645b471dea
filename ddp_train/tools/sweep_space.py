"""A sweep's search space: a YAML mapping of dotted config keys to distributions.

```yaml
optim.lr: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}
data.batch_size: {type: categorical, choices: [16, 32, 64]}
model.args.hidden: {type: int, low: 16, high: 128, step: 16}
```

Every entry is checked before the first trial: its fields, its bounds, and that its key
and values are accepted by the config (the same check as ``KEY=VALUE`` overrides), so a
typo fails at once with exit code 2 naming the file and the key: a
:class:`~ddp_train.errors.UsageError` for the file itself (not YAML, an unknown type or
field, bad bounds), a :class:`~ddp_train.errors.ConfigError` for a value the config refuses.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ddp_train.config import format_override, load_config, parse_yaml
from ddp_train.errors import ConfigError, UsageError, first_line

# The fields each distribution type takes (besides `type`), and which are required.
FIELDS = {
    "float": ({"low", "high"}, {"log", "step"}),
    "int": ({"low", "high"}, {"log", "step"}),
    "categorical": ({"choices"}, set()),
}
# Keys the sweep sets itself for every trial.
RESERVED_KEYS = ("run.name", "run.output_dir")


@dataclass(frozen=True)
class Parameter:
    """One searched config key and its distribution."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = field(default_factory=tuple)

    def distribution(self) -> Any:
        """The equivalent ``optuna.distributions`` object."""
        from optuna.distributions import (CategoricalDistribution, FloatDistribution,
                                          IntDistribution)

        if self.type == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.type == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log,  # type: ignore[arg-type]
                                   step=int(self.step or 1))
        return FloatDistribution(float(self.low), float(self.high), log=self.log,  # type: ignore[arg-type]
                                 step=None if self.step is None else float(self.step))

    def grid(self) -> list[Any]:
        """Every value the grid sampler visits; a UsageError for a continuous float range."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))  # type: ignore[arg-type]
        if self.step is None:
            raise UsageError(f"--space: {self.key}", "the grid sampler needs a finite set of "
                                                     "values: give this float range a step, or "
                                                     "make it categorical")
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1  # type: ignore[operator]
        return [self.low + i * self.step for i in range(count)]  # type: ignore[operator]


def _number(value: Any, integer: bool) -> bool:
    """Whether ``value`` is an integer (``integer``) or any number; booleans are neither."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integer else isinstance(value, (int, float))


def _parameter(key: str, spec: Any, where: str) -> Parameter:
    """Check one entry's fields and bounds (not yet against the config); errors name ``where``."""
    def error(at: str, message: str) -> UsageError:
        """The usage error of ``at`` (the entry's key, or one of its fields) in the space file."""
        return UsageError(f"{where}: {at}", message)

    if not isinstance(spec, dict):
        raise error(key, f"expected a mapping such as {{type: float, low: 1.0e-4, high: 1.0e-1, "
                         f"log: true}}, got {spec!r}")
    kind = spec.get("type")
    if kind not in FIELDS:
        close = difflib.get_close_matches(str(kind), FIELDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise error(f"{key}.type", f"unknown type {kind!r}{hint} (one of: {', '.join(FIELDS)})")
    required, optional = FIELDS[kind]
    allowed = required | optional | {"type"}
    for name in spec:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise error(f"{key}.{name}", f"unknown field for type {kind}{hint} "
                                         f"(valid: {', '.join(sorted(allowed))})")
    for name in sorted(required):
        if name not in spec:
            raise error(key, f"type {kind} needs {' and '.join(sorted(required))}; "
                             f"{name} is missing")
    if kind == "categorical":
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise error(f"{key}.choices", f"expected a non-empty list, got {choices!r}")
        for choice in choices:
            if not (choice is None or isinstance(choice, (bool, int, float, str))):
                raise error(f"{key}.choices", f"choices must be numbers, strings, booleans or "
                                              f"null, got {choice!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise error(f"{key}.choices", f"choices repeat a value: {choices!r}")
        return Parameter(key, kind, choices=tuple(choices))

    integer = kind == "int"
    expected = "an integer" if integer else "a number"
    low, high = spec["low"], spec["high"]
    for name, value in (("low", low), ("high", high)):
        if not _number(value, integer):
            raise error(f"{key}.{name}", f"expected {expected}, got {value!r}")
    if low > high:
        raise error(key, f"low ({low!r}) is greater than high ({high!r})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise error(f"{key}.log", f"expected true or false, got {log!r}")
    step = spec.get("step")
    if step is not None and (not _number(step, integer) or step <= 0):
        raise error(f"{key}.step", f"expected {expected} > 0, got {step!r}")
    if log and low <= 0:
        raise error(f"{key}.low", f"a log range must be positive, got low={low!r}")
    if log and step is not None and step != 1:
        raise error(f"{key}.step", "a log range cannot have a step")
    return Parameter(key, kind, low=low, high=high, step=step, log=log)


def _probe_values(parameter: Parameter) -> list[Any]:
    """Values that show whether the config accepts the parameter's key and type."""
    if parameter.type == "categorical":
        return list(parameter.choices)
    values = [parameter.low, parameter.high]
    if parameter.type == "float" and parameter.low != parameter.high:
        # A value between the bounds, so that a float range on an integer key fails here.
        values.append(parameter.low + (parameter.high - parameter.low) / 3)  # type: ignore[operator]
    return values


def read_space(path: Path, config_path: str | None, overrides: list[str]) -> list[Parameter]:
    """Read and check a search space file against the config it will modify.

    Raises UsageError (the file) or ConfigError (a value the config refuses) naming the file
    and the key at fault.
    """
    where = f"--space {path}"
    if not path.is_file():
        raise UsageError("--space", f"{str(path)!r} {'is a directory' if path.is_dir() else 'does not exist'}")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(where, f"not valid YAML: {first_line(exc)}") from None
    if not isinstance(raw, dict) or not raw:
        raise UsageError(where, "expected a non-empty mapping of dotted config keys to "
                                "distributions, e.g. 'optim.lr: {type: float, low: 1.0e-4, "
                                "high: 1.0e-1, log: true}'")
    parameters = []
    for key, spec in raw.items():
        if not isinstance(key, str) or not key or any(part == "" for part in key.split(".")):
            raise UsageError(where, f"expected dotted config keys such as 'optim.lr', got {key!r}")
        if key in RESERVED_KEYS:
            raise UsageError(f"{where}: {key}", "the sweep sets this key for each trial itself")
        parameter = _parameter(key, spec, where)
        for value in _probe_values(parameter):
            try:
                load_config(config_path, [*overrides, format_override(key, value)])
            except ConfigError as exc:
                at = key if exc.key in ("", key) else f"{key} (config key {exc.key})"
                raise ConfigError(f"{where}: {at}", f"{exc.message} (value {value!r} from the space)") from None
        parameters.append(parameter)
    return parameters
