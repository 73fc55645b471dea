"""Optional dependencies: a missing one is a usage error that names the extra to install."""

from __future__ import annotations

import importlib

from ddp_train.errors import ConfigError


def require(modules: tuple[str, ...], extra: str, purpose: str, key: str = "") -> None:
    """Import each of ``modules``; raise a ConfigError naming ``extra`` when any is missing."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(key, f"{purpose} needs {', '.join(missing)}, which "
                               f"{'is' if len(missing) == 1 else 'are'} not installed: "
                               f'pip install "ddp_train[{extra}]"')
