"""Printing a config: each field's one-line description, and YAML with those descriptions as comments.

The descriptions are the fields' docstrings in :mod:`ddp_train.config.sections`, read from
its source, so ``--print-config`` and ``config.yaml`` document every key.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from typing import Any

import yaml

from ddp_train.config.sections import TrainConfig

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
