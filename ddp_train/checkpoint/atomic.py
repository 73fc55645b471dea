"""How ddp_train makes a file or directory appear: complete or not at all, also across a power loss.

Everything the package writes goes through :func:`atomic_write`; a finished directory (a
sharded checkpoint) is renamed into place with :func:`publish`, and a second name for a
finished checkpoint is made with :func:`atomic_link`; JSON files are written with
:func:`atomic_write_json`, as strict JSON (:func:`json_text`). This module does not import
torch (the model server writes through it too).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable

TEMPORARY_MARK = ".tmp-"
"""Part of every temporary name (``.<name>.tmp-<pid>``): what a killed write leaves behind."""


def temporary_path(path: Path) -> Path:
    """The hidden temporary name ``path`` is written under before it is renamed into place.

    Hidden, so that nothing listing the directory takes it for a finished file; the process
    id keeps two writers of the same name apart.
    """
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")


def fsync_directory(directory: Path) -> None:
    """Make the renames and removals in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, content: bytes | Callable[[BinaryIO], object]) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a part.

    ``content`` is the bytes, or a function that writes them to a binary file (such as
    ``lambda file: torch.save(state, file)``). They go to :func:`temporary_path`, which
    is flushed and fsynced, renamed over ``path``, and the directory is fsynced so that the
    rename itself survives a power loss. A failed write removes its temporary file and
    raises the OSError that stopped it (a full disk), also where the writer's clean-up
    replaced it with an error of its own.
    """
    temporary = temporary_path(path)
    try:
        with temporary.open("wb") as file:
            if isinstance(content, bytes):
                file.write(content)
            else:
                content(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        masked = _masked_os_error(exc)
        if masked is not None:
            raise masked from None
        raise
    fsync_directory(path.parent)


def _masked_os_error(exc: BaseException) -> OSError | None:
    """The OSError that the error ``exc`` was raised while handling, if any.

    torch.save closes its archive after a failed write, and the close fails too: a full
    disk would read "RuntimeError: ... unexpected pos 257856 vs 257744".
    """
    if isinstance(exc, OSError) or not isinstance(exc, Exception):
        return None
    context = exc.__context__
    while context is not None and not isinstance(context, OSError):
        context = context.__context__
    return context


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _plain(value: Any) -> Any:
    """What ``json`` cannot write itself: a numpy or torch scalar as its number, anything
    else (a Path) as its ``str()``."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _finite(item())
        except (TypeError, ValueError, RuntimeError):  # an array of several numbers
            pass
    return str(value)


def json_text(value: Any, indent: int | None = None) -> str:
    """``value`` as strict JSON, with NaN and infinities written as ``null``.

    JSON has no NaN: by default Python writes a bare ``NaN`` that strict readers (jq,
    JavaScript) reject, and ``allow_nan=False`` raises instead, so one undefined metric
    (R² over a single sample) would cost the whole file.
    """
    return json.dumps(_finite(value), indent=indent, allow_nan=False, default=_plain)


def atomic_write_json(path: Path, value: Any) -> None:
    """Write ``value`` to ``path`` as indented strict JSON (:func:`json_text`), atomically."""
    atomic_write(path, (json_text(value, indent=2) + "\n").encode())


def remove(path: Path) -> None:
    """Delete a file or a directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(temporary: Path, final: Path) -> None:
    """Rename a finished temporary file or directory to its final name, replacing an older one."""
    if final.is_dir() and not final.is_symlink():
        # A directory cannot be renamed over a non-empty one: move the old one aside first.
        # Between the two renames neither is listed; a crash there loses only this entry.
        aside = temporary_path(final.with_name(f"{final.name}-old"))
        remove(aside)
        os.rename(final, aside)
        os.rename(temporary, final)
        remove(aside)
    else:
        os.replace(temporary, final)
    fsync_directory(final.parent)


def _link_or_copy(source: str, destination: str) -> None:
    """A hard link; a durable copy on a file system without hard links."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
        with open(destination, "rb+") as file:
            os.fsync(file.fileno())


def atomic_link(source: Path, target: Path) -> None:
    """Give the finished file or directory ``source`` the second name ``target`` without a
    second write: hard links (copies where the file system has none), published atomically."""
    temporary = temporary_path(target)
    remove(temporary)
    if source.is_dir():
        shutil.copytree(source, temporary, copy_function=_link_or_copy)
        fsync_directory(temporary)
    else:
        _link_or_copy(str(source), str(temporary))
    publish(temporary, target)

