"""Single-file checkpoints (no strategy or DDP): one file per checkpoint, written by rank 0,
optionally in the background.

``<run_dir>/checkpoints/step_00000120.pt`` holds the whole training state: tensors and
plain Python types only, so it loads with ``torch.load(..., weights_only=True)`` and
loading never runs code from the file.
"""

from __future__ import annotations

import logging
import pickle
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from ddp_train.checkpoint.atomic import atomic_link, atomic_write, remove, temporary_path
from ddp_train.checkpoint.store import (FORMAT_VERSION, REQUIRED_KEYS, SINGLE_PROCESS, CheckpointStore, Ranks,
                                        save_failure)
from ddp_train.config import CheckpointConfig
from ddp_train.errors import TrainingFailed, first_line

log = logging.getLogger("ddp_train")


def load_plain(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU: tensors and plain values only, so no code
    from the file runs.

    ValueError saying what is wrong with the file, worded to follow "it" (``it is empty
    (0 bytes)``): empty, cut short, holding pickled objects, or otherwise unreadable.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ValueError(f"cannot be read ({type(exc).__name__}: {first_line(exc, 200)})") from None
    if size == 0:  # the commonest corruption: a full disk, or a kill between create and write
        raise ValueError("is empty (0 bytes)")
    # torch.save writes a zip archive whose index is at its very end: a file cut short
    # anywhere is told apart here, before any of it is unpickled.
    if not zipfile.is_zipfile(path):
        raise ValueError(f"is truncated or not a checkpoint ({size} bytes, not a complete "
                         f"torch.save archive)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise ValueError("holds pickled objects, not only tensors and plain values: refused, "
                             "since loading them could run code") from None
        raise ValueError(f"cannot be loaded ({type(exc).__name__}: {first_line(exc, 200)})") from None
    except Exception as exc:  # bit rot inside the archive, a file system error...
        raise ValueError(f"cannot be loaded ({type(exc).__name__}: {first_line(exc, 200)})") from None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load and check a checkpoint file; raises ValueError saying what is wrong with it."""
    state = load_plain(path)
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise ValueError("is not a ddp_train checkpoint (keys missing)")
    if state["format_version"] != FORMAT_VERSION:
        raise ValueError(f"has format version {state['format_version']}, expected {FORMAT_VERSION}")
    return state


def save_file(state: dict[str, Any], path: Path) -> None:
    """``torch.save(state)`` to ``path``, atomically."""
    atomic_write(path, lambda file: torch.save(state, file))


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


class FileCheckpointStore(CheckpointStore):
    """Single-file checkpoints, written by rank 0 (optionally in the background)."""

    def __init__(self, directory: Path, config: CheckpointConfig, ranks: Ranks = SINGLE_PROCESS) -> None:
        super().__init__(directory, config, ranks)
        self._thread: threading.Thread | None = None
        self._error: TrainingFailed | None = None
        self._snapshot = Snapshot()

    def read(self, path: Path) -> dict[str, Any]:
        """Load and check one checkpoint file; ValueError saying what is wrong with it."""
        if path.is_dir():
            raise ValueError(f"is a sharded checkpoint: resume it with train.strategy=fsdp, or turn "
                             f"it into a file with 'ddp-train convert {path}'")
        return read_checkpoint(path)

    def save(self, state: dict[str, Any], step: int, *, periodic: bool, best: bool) -> Path:
        """Write the checkpoint of ``step`` as periodic and/or best (rank 0), then rotate.

        With ``async_save`` the state is first copied to CPU (the only part the training
        loop waits for) and written by a background thread; a save waits for the
        previous one, so there are never two in flight. Either way, deleting rotated-out
        files (slow for large files on some file systems) happens in the background.
        A failed write is TrainingFailed (here, or from :meth:`check_background` and
        :meth:`wait` when it ran in the background) and leaves no temporary file.
        """
        path = self.directory / f"{'step' if periodic else 'best'}_{step:08d}.pt"
        if not self.ranks.is_main:
            return path
        self.wait()
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.config.async_save:
            snapshot = self._snapshot.take(state)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the non-blocking device-to-host copies are done
            self._start(f"writing checkpoint {path.name}", self._write, snapshot, step, periodic, best)
        else:
            try:
                self._write(state, step, periodic, best, rotate=False)
            except Exception as exc:
                raise save_failure(f"writing checkpoint {path.name}", exc) from None
            self._start("removing old checkpoints", self._rotate, step, periodic, best)
        return path

    def _start(self, what: str, target: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                target(*args)
            except BaseException as exc:  # raised on the training thread by check_background() or wait()
                failure = save_failure(what, exc)
                # Said now, not at the next save or the end of the run, which may be hours away.
                log.error("%s; the run stops", failure)
                self._error = failure
        self._thread = threading.Thread(target=run, name="ddp_train-checkpoint")
        self._thread.start()

    def check_background(self) -> None:
        """TrainingFailed if the background save or rotation has failed; returns at once otherwise."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait(self) -> None:
        """Block until background work (an async save, rotation) is done; TrainingFailed if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check_background()

    def _write(self, state: dict[str, Any], step: int, periodic: bool, best: bool,
               rotate: bool = True) -> None:
        step_path = self.directory / f"step_{step:08d}.pt"
        best_path = self.directory / f"best_{step:08d}.pt"
        try:
            save_file(state, step_path if periodic else best_path)
            if periodic and best:
                atomic_link(step_path, best_path)
        except BaseException:
            # atomic_write removes its own temporary; a failed link may leave one too.
            remove(temporary_path(best_path))
            raise
        if rotate:
            self._rotate(step, periodic, best)
