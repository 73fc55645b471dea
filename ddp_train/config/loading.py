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

from ddp_train.config.sections import TrainConfig, shown
from ddp_train.errors import ConfigError, first_line

# PyYAML follows YAML 1.1, where "1e-3" is a string; users mean a float.

_FLOAT_RE = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (``1e-3``)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """Parse YAML text with the config's loader; any failure is a ``yaml.YAMLError``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except (ValueError, RecursionError) as exc:
        # Raised by the constructors, not the parser, for text that is malformed all the
        # same to the user: a date like 2020-13-45, '!!float abc', an int of more than
        # 4300 digits, lists nested past the recursion limit.
        raise yaml.YAMLError(first_line(exc)) from None


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
        problem = getattr(exc, "problem", None) or first_line(exc)
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
        raise ConfigError("", f"override {shown(override)} is not of the form dotted.key=value "
                              f"(e.g. optim.lr=3e-4)")
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise ConfigError(_key_text("", key), f"override value {shown(text)} is not valid YAML: "
                                             f"{problem}") from None
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(_key_text("", ".".join(parts[:depth + 1])),
                              f"cannot set {shown(key)}: this key holds a {type(child).__name__}, "
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


def _key_text(prefix: str, key: Any) -> str:
    """A key for a message: as written when it is short printable text, else its shortened repr
    (a key holding a newline must not break the one-line message)."""
    if isinstance(key, str) and key.isprintable() and len(key) <= 80:
        return prefix + key
    return prefix + shown(key)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip("."), f"expected a mapping of {cls.__name__} keys, "
                                             f"got {shown(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ConfigError(_key_text(prefix, key), f"unknown key{hint} (valid keys here: "
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
        if isinstance(value, str) and value in args:
            return value
        close = (difflib.get_close_matches(value, [str(a) for a in args], n=1)
                 if isinstance(value, str) else [])
        hint_text = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(key, f"expected one of {', '.join(map(str, args))}, got {shown(value)}"
                               f"{hint_text}")
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {shown(value)}")
        # Every such mapping is a factory's keyword arguments.
        for name in value:
            if not (isinstance(name, str) and name.isidentifier()):
                raise ConfigError(key, f"expected keyword argument names (Python identifiers) as "
                                       f"keys, got {shown(name)}")
        _check_size(value, key)
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {shown(value)}")
        return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {shown(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {shown(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an int beyond ~1.8e308
                raise ConfigError(key, f"expected a finite number, got {shown(value)}") from None
        raise ConfigError(key, f"expected a number, got {shown(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {shown(value)}")
    if hint is Any:
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {hint!r}")


_MAX_DEPTH = 100
"""How deeply a free-form value (``model.args``, ...) may nest lists and mappings."""
_MAX_ITEMS = 100_000
"""How many values a free-form value may hold, counted as written out."""


def _check_size(value: Any, key: str) -> None:
    """``value`` (a free-form value such as ``model.args``) nests at most :data:`_MAX_DEPTH`
    deep and holds at most :data:`_MAX_ITEMS` values, each alias counted as written out.

    YAML aliases repeat an object: a few nested ones expand exponentially, and one inside
    itself nests without end, when the config is copied, compared or written to
    ``config.yaml``. A list shared by two arguments is fine.
    """
    pending = [(value, 0)]
    items = 0
    while pending:
        item, depth = pending.pop()
        items += 1
        if depth > _MAX_DEPTH:
            raise ConfigError(key, f"expected values nested at most {_MAX_DEPTH} levels deep (a YAML "
                                   f"alias inside itself nests without end)")
        if items > _MAX_ITEMS:
            raise ConfigError(key, f"expected at most {_MAX_ITEMS} values, counting each YAML alias "
                                   f"as written out")
        if isinstance(item, dict):
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item)
