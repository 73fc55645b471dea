"""Checkpoint files: atomic, rotated, validated on load, optionally written in the background.

Layout: ``<run_dir>/checkpoints/step_00000120.pt`` for periodic (and final and
preemption) checkpoints, ``best_00000080.pt`` for the best one (kept apart from
rotation). A file is written under a hidden temporary name, fsynced, and renamed, so a
checkpoint is complete or invisible; temporaries of a killed save are removed at the
next start. Everything in a checkpoint is tensors and plain Python types, so it loads
with ``torch.load(..., weights_only=True)``: loading never runs code from the file.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ddp_train.config import CheckpointConfig
from ddp_train.errors import ConfigError

log = logging.getLogger("ddp_train")

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "optimizer", "scheduler", "progress", "ranks")
_NAME = re.compile(r"^(step|best)_(\d{8})\.pt$")


@dataclass(frozen=True)
class CheckpointFile:
    """One complete checkpoint on disk."""

    path: Path
    step: int
    kind: str
    """'step' (periodic, final, preemption) or 'best'."""


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load and check a checkpoint; raises ValueError saying what is wrong with it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bit rot, not a torch file, unsafe pickle...
        raise ValueError(f"cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise ValueError("is not a ddp_train checkpoint (keys missing)")
    if state["format_version"] != FORMAT_VERSION:
        raise ValueError(f"has format version {state['format_version']}, expected {FORMAT_VERSION}")
    return state


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    _fsync_directory(path.parent)


class Snapshot:
    """Private CPU copies of a state's tensors, reused from one save to the next.

    Async saving copies the state so training can go on while the copy is written. New
    tensors for every save cost more in page faults than the copy itself, so buffers are
    kept (pinned when the source is on a GPU, for fast device-to-host copies) and refilled.
    Tensors that share storage (tied weights) stay shared, as torch.save would keep them.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, state: Any) -> Any:
        """A copy of ``state`` whose tensors live in this snapshot's buffers."""
        aliases: dict[tuple[Any, ...], torch.Tensor] = {}
        return self._copy(state, "", aliases)

    def _copy(self, value: Any, path: str, aliases: dict[tuple[Any, ...], torch.Tensor]) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            identity = (value.untyped_storage().data_ptr(), value.storage_offset(),
                        tuple(value.shape), value.stride(), value.dtype, value.device)
            if identity in aliases:
                return aliases[identity]
            buffer = self._buffers.get(path)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = torch.empty(value.shape, dtype=value.dtype,
                                     pin_memory=value.is_cuda and torch.cuda.is_available())
                self._buffers[path] = buffer
            buffer.copy_(value, non_blocking=value.is_cuda)
            aliases[identity] = buffer
            return buffer
        if isinstance(value, dict):
            return {key: self._copy(item, f"{path}/{key}", aliases) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(item, f"{path}/{i}", aliases) for i, item in enumerate(value))
        return value


class CheckpointDirectory:
    """The checkpoints of one run: listing, loading the newest that checks out, removal, rotation.

    Subclasses decide how a checkpoint is written (one file, or a sharded directory) and
    may list, read and delete more kinds of entries.
    """

    def __init__(self, directory: Path, config: CheckpointConfig) -> None:
        self.directory = directory
        self.config = config

    def list(self) -> list[CheckpointFile]:
        """Complete checkpoints (by name), oldest first; temporaries are never listed."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append(CheckpointFile(path, int(match.group(2)), match.group(1)))
        return sorted(found, key=lambda c: (c.step, c.kind == "step"))

    def read(self, path: Path) -> dict[str, Any]:
        """Load and check one checkpoint; ValueError saying what is wrong with it."""
        if path.is_dir():
            raise ValueError(f"is a sharded checkpoint: resume it with train.strategy=fsdp, or turn "
                             f"it into a file with 'ddp-train convert {path}'")
        return read_checkpoint(path)

    def delete(self, path: Path) -> None:
        """Remove one checkpoint or temporary."""
        path.unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> None:
        """Delete what a killed save left behind (rank 0, at start)."""
        if self.directory.is_dir():
            for path in self.directory.glob(".*.tmp-*"):
                log.warning("removing %s, left by a save that did not finish", path)
                self.delete(path)

    def remove_all(self) -> None:
        """Delete every checkpoint (``resume=never`` starts the run over)."""
        old = self.list()
        if old:
            log.warning("checkpoint.resume=never: removing %d checkpoint(s) of an earlier run in %s",
                        len(old), self.directory)
        for checkpoint in old:
            self.delete(checkpoint.path)

    def load_newest(self) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads; a broken one is named in a warning and skipped."""
        for checkpoint in reversed(self.list()):
            try:
                return self.read(checkpoint.path), checkpoint.path
            except ValueError as exc:
                log.warning("skipping checkpoint %s: it %s; trying the previous one",
                            checkpoint.path, exc)
        return None

    def is_checkpoint_directory(self, path: Path) -> bool:
        """Whether the directory ``path`` is one checkpoint (not a directory holding some)."""
        return (path / ".metadata").is_file()  # torch.distributed.checkpoint's index file

    def load_path(self, path: Path) -> tuple[dict[str, Any], Path]:
        """``checkpoint.resume=PATH``: a checkpoint, or a run or checkpoints directory (its newest)."""
        if path.is_dir() and not self.is_checkpoint_directory(path):
            other = copy.copy(self)
            other.directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            found = other.load_newest()
            if found is None:
                raise ConfigError("checkpoint.resume", f"expected a checkpoint, but {str(path)!r} "
                                                       f"holds no complete checkpoint")
            return found
        if not path.exists():
            raise ConfigError("checkpoint.resume", f"expected auto, never or an existing "
                                                   f"checkpoint, got {str(path)!r} (does not exist)")
        try:
            return self.read(path), path
        except ValueError as exc:
            raise ConfigError("checkpoint.resume", f"checkpoint {str(path)!r} {exc}") from None

    def _rotate(self, new_best: bool) -> None:
        """Keep the newest ``keep_last`` periodic checkpoints and, after a new best, only it."""
        checkpoints = self.list()
        periodic = [c for c in checkpoints if c.kind == "step"]
        for old in periodic[:-self.config.keep_last]:
            self.delete(old.path)
        if new_best:
            bests = [c for c in checkpoints if c.kind == "best"]
            for old in bests[:-1]:
                self.delete(old.path)


class CheckpointManager(CheckpointDirectory):
    """Single-file checkpoints, written by rank 0 (optionally in the background)."""

    def __init__(self, directory: Path, config: CheckpointConfig) -> None:
        super().__init__(directory, config)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._snapshot = Snapshot()

    # -- saving -----------------------------------------------------------------------

    def save(self, state: dict[str, Any], step: int, periodic: bool, best: bool) -> None:
        """Write the checkpoint of ``step`` as periodic and/or best, then rotate.

        With ``async_save`` the state is first copied to CPU (the only part the training
        loop waits for) and written by a background thread; a save waits for the
        previous one, so there are never two in flight. Either way, deleting rotated-out
        files (slow for large files on some file systems) happens in the background.
        """
        self.wait()
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.config.async_save:
            snapshot = self._snapshot.take(state)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the non-blocking device-to-host copies are done
            self._start(self._write, snapshot, step, periodic, best)
        else:
            self._write(state, step, periodic, best, rotate=False)
            self._start(self._rotate, best)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                target(*args)
            except BaseException as exc:  # reported by wait(), on the training thread
                self._error = exc
        self._thread = threading.Thread(target=run, name="ddp_train-checkpoint")
        self._thread.start()

    def wait(self) -> None:
        """Block until background work (an async save, rotation) is done; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {error}") from error

    def _write(self, state: dict[str, Any], step: int, periodic: bool, best: bool,
               rotate: bool = True) -> None:
        step_path = self.directory / f"step_{step:08d}.pt"
        best_path = self.directory / f"best_{step:08d}.pt"
        first = step_path if periodic else best_path
        _write_atomically(state, first)
        if periodic and best:
            # The same bytes under the second name: a hard link instead of a second write.
            tmp = best_path.with_name(f".{best_path.name}.tmp-{os.getpid()}")
            try:
                os.link(step_path, tmp)
                os.replace(tmp, best_path)
                _fsync_directory(self.directory)
            except OSError:  # a file system without hard links
                tmp.unlink(missing_ok=True)
                _write_atomically(state, best_path)
        if rotate:
            self._rotate(best)
