"""Loading a config: defaults < YAML file < dotted ``key=value`` overrides, every value checked.

Unknown keys come with the closest valid key; a value of the wrong type names the key, what
was expected and what was given (:class:`~ddp_train.errors.ConfigError`, exit code 2). This
module does not import torch: a config error is reported before anything heavy is imported,
any process group exists, or any file is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ddp_train.config.sections import TrainConfig
from ddp_train.errors import ConfigError

# PyYAML follows YAML 1.1, where "1e-3" is a string; users mean a float.

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


def format_override(key: str, value: Any) -> str:
    """A ``key=value`` override whose value reads back exactly (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


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


