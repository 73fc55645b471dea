"""Resuming: which checkpoint ``checkpoint.resume`` names, chosen once for every rank, and what
the resumed run changed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ddp_train.checkpoint.store import CheckpointStore
from ddp_train.distributed.environment import DistEnv
from ddp_train.errors import ConfigError, TrainingFailed

log = logging.getLogger("ddp_train")

RESUME_FREE_KEYS = ("run.", "checkpoint.", "logging.", "dist.timeout_s", "dist.preemption_sync_s",
                    "train.max_steps", "train.epochs", "train.compile", "eval.")
"""Config keys that may differ between a checkpoint's run and the resumed one without a warning."""


def find_resume_state(store: CheckpointStore, mode: str, env: DistEnv) -> tuple[dict[str, Any], str] | None:
    """The state of the checkpoint ``mode`` (``checkpoint.resume``) names and its path, on every
    rank; None to start fresh.

    Rank 0 chooses (``auto``: the newest complete checkpoint; ``never``: none, and the old
    ones are removed; else the path given) so that every rank resumes from the same
    checkpoint; the other ranks then read it themselves. The run's checkpoints newer than
    the chosen one are moved aside (:meth:`CheckpointStore.set_aside_newer`), so that the
    next ``auto`` resume continues this run, not them.
    """
    found: tuple[dict[str, Any], Path] | None = None
    error: tuple[str, str] | None = None
    if env.is_main:
        store.remove_stale_temporaries()
        try:
            if mode == "never":
                store.remove_all()
            elif mode == "auto":
                found = store.load_newest()
                if found is not None:
                    store.set_aside_newer(found[0]["progress"]["global_step"], "they could not be loaded")
            else:
                found = store.load_path(Path(mode))
                step = found[0]["progress"]["global_step"]
                store.set_aside_newer(step, f"the branch abandoned by resuming from step {step} of "
                                            f"{found[1]}")
        except ConfigError as exc:
            error = (exc.key, exc.message)
    path, error = env.broadcast_from_main((str(found[1]) if found else None, error))
    if error is not None:
        raise ConfigError(*error)
    if path is None:
        return None
    if found is not None:
        return found[0], path
    try:
        return store.read(Path(path)), path
    except ValueError as exc:
        raise TrainingFailed(f"rank {env.rank} cannot read checkpoint {path} that rank 0 chose: "
                             f"it {exc} (is the run directory shared?)", shared=False) from None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "args":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def warn_config_changes(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """Warn when a resumed run changes what the checkpoint was trained with."""
    old, new = _flatten(saved), _flatten(current)
    changed = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
               if old.get(key) != new.get(key) and not key.startswith(RESUME_FREE_KEYS)]
    if changed:
        log.warning("resuming from %s with a different config, so the run is not an exact "
                    "continuation: %s", path, "; ".join(changed))
