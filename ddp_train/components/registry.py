"""Name → factory registries that also accept ``package.module:attr`` paths.

Every pluggable building block (models, data sets, losses, optimizers, schedules) is
looked up through a :class:`Registry`, so a user's own factory is named in YAML exactly
like a built-in one, and a bad name fails with a :class:`ConfigError` that names the
config key, the closest valid name, or the part of an import path that did not resolve.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, TypeVar

from ddp_train.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


def import_object(path: str, key: str) -> Any:
    """Import ``package.module:attr`` (``attr`` may be dotted); errors name ``key`` and the failing part."""
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name or not attr_path:
        raise ConfigError(key, f"expected 'package.module:attribute', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Distinguish "your module does not exist" from "your module imports something missing".
        missing = exc.name or module_name
        where = "" if missing == module_name else f" (while importing {module_name!r})"
        raise ConfigError(key, f"cannot import module {missing!r}{where} from {path!r}") from None
    except Exception as exc:  # a user module that raises at import time
        raise ConfigError(key, f"importing module {module_name!r} from {path!r} failed: "
                               f"{type(exc).__name__}: {exc}") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(key, f"module {module_name!r} has no attribute {attr_path!r} "
                                   f"(looked up from {path!r})")
        obj = getattr(obj, part)
    return obj


def resolve_callable(path: str, key: str) -> Callable[..., Any]:
    """The callable at ``package.module:attr``; errors name ``key``."""
    obj = import_object(path, key)
    if not callable(obj):
        raise ConfigError(key, f"{path!r} is not callable (got {type(obj).__name__})")
    return obj


class Registry:
    """A named collection of factories for one kind of building block."""

    def __init__(self, kind: str, config_key: str) -> None:
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator that registers a factory under ``name``."""
        def decorate(factory: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            return factory
        return decorate

    def names(self) -> list[str]:
        """The built-in names, sorted."""
        return sorted(self._entries)

    def resolve(self, name: str, key: str | None = None) -> Callable[..., Any]:
        """The factory for a built-in ``name`` or a ``package.module:attr`` path.

        Errors name ``key``, by default the config key of this kind of block.
        """
        key = key or self.config_key
        if ":" in name:
            return resolve_callable(name, key)
        if name in self._entries:
            return self._entries[name]
        close = difflib.get_close_matches(name, self._entries, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(key, f"unknown {self.kind} {name!r}{hint} (built-in: "
                               f"{', '.join(self.names())}; or 'package.module:factory')")
