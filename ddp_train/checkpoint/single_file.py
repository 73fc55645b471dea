"""Single-file checkpoints (no strategy or DDP): one file per checkpoint, written by rank 0,
optionally in the background.

``<run_dir>/checkpoints/step_00000120.pt`` holds the whole training state: tensors and
plain Python types only, so it loads with ``torch.load(..., weights_only=True)`` and
loading never runs code from the file.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import torch

from ddp_train.checkpoint.atomic import atomic_link, atomic_write
from ddp_train.checkpoint.store import FORMAT_VERSION, REQUIRED_KEYS, SINGLE_PROCESS, CheckpointStore, Ranks
from ddp_train.config import CheckpointConfig
from ddp_train.errors import first_line

def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load and check a checkpoint file; raises ValueError saying what is wrong with it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # empty, truncated zip, bit rot, not a torch file, unsafe pickle...
        raise ValueError(f"cannot be loaded ({type(exc).__name__}: {first_line(exc, 200)})") from None
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
        self._error: BaseException | None = None
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
            self._start(self._write, snapshot, step, periodic, best)
        else:
            self._write(state, step, periodic, best, rotate=False)
            self._start(self._rotate, best)
        return path

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
        save_file(state, step_path if periodic else best_path)
        if periodic and best:
            atomic_link(step_path, best_path)
        if rotate:
            self._rotate(best)
