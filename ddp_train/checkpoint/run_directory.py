"""The run directory's files, each written atomically by rank 0 alone, and its lock.

``<run.output_dir>/<run.name>/`` holds ``config.yaml``, ``metrics.jsonl``,
``checkpoints/``, ``model.pt`` and ``summary.json``, and ``.lock``: while a run is in the
directory, its rank 0 holds an exclusive ``flock`` on that file, so that a second run on
the same directory stops before it reads or writes anything there.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from ddp_train.checkpoint.atomic import atomic_write, atomic_write_json
from ddp_train.checkpoint.single_file import save_file
from ddp_train.checkpoint.store import Ranks
from ddp_train.errors import ConfigError, first_line

log = logging.getLogger("ddp_train")

LOCK_NAME = ".lock"
"""The file rank 0 locks; it names the holder (host, pid, start time)."""

_held_lock_fds: set[int] = set()
"""This process's lock descriptors (the ones a forked child must not keep)."""


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock descriptors.

    A flock belongs to the open file, which a forked child shares: a worker that outlives
    a killed rank 0 by a few seconds would otherwise keep the directory locked against
    the run torchrun restarts. Closing the child's copy leaves the parent's lock held.
    """
    for fd in _held_lock_fds:
        os.close(fd)
    _held_lock_fds.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class RunDirectory:
    """``<output_dir>/<name>/``: config.yaml, metrics.jsonl, model.pt, summary.json."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    @property
    def metrics_path(self) -> Path:
        """metrics.jsonl."""
        return self.path / "metrics.jsonl"

    @property
    def checkpoints_path(self) -> Path:
        """checkpoints/."""
        return self.path / "checkpoints"

    def create(self) -> None:
        """Create the directory (parents too)."""
        self.path.mkdir(parents=True, exist_ok=True)

    def lock(self, ranks: Ranks) -> None:
        """Take the run's exclusive lock on rank 0 (a collective: call on every rank).

        Non-blocking: when another run holds it, every rank raises the same ConfigError
        naming the holder, and nothing in the directory has been read or written (the
        directory is created if missing). Held until :meth:`unlock` or the process's end,
        also a kill: the kernel releases it, so a restarted run finds it free.
        """
        refusal: tuple[str, str] | None = None
        if ranks.is_main:
            refusal = self._try_lock()
        # Every rank learns the outcome: none goes on to wait for a rank 0 that gave up.
        refusal = ranks.broadcast_from_main(refusal)
        if refusal is not None:
            raise ConfigError(*refusal)

    def _try_lock(self) -> tuple[str, str] | None:
        """Lock ``.lock``; None when taken, else the config key and why it cannot be."""
        try:
            self.create()
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            return "run.output_dir", f"cannot create run directory {self.path}: {first_line(exc)}"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 500, 0).decode(errors="replace").strip() or "holder unknown"
            os.close(fd)
            return "run.name", (f"run directory {self.path} is in use by another run ({holder}); "
                                f"wait for it to end, or choose another run.name")
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return "run.name", f"cannot lock run directory {self.path}: {first_line(exc)}"
            # Some network file systems (Lustre without -o flock) have no locks at all.
            log.warning("cannot lock %s (%s): a second run started on this directory would not "
                        "be stopped", self.path, os.strerror(exc.errno))
            return None
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        holder = f"pid {os.getpid()} on host {socket.gethostname()}, since {since}"
        try:
            # Written in place: the lock belongs to this file (inode). Replacing it, as
            # atomic_write does, would leave the next run a fresh, unlocked file.
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder + "\n").encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only its holder goes unnamed
        self._lock_fd = fd
        _held_lock_fds.add(fd)
        return None

    def unlock(self) -> None:
        """Release the lock if this process holds it (another run may then use the directory)."""
        if self._lock_fd is not None:
            _held_lock_fds.discard(self._lock_fd)
            os.close(self._lock_fd)  # closing the only descriptor releases the flock
            self._lock_fd = None

    def write_config(self, config_yaml: str) -> None:
        """config.yaml: the resolved config with the versions."""
        atomic_write(self.path / "config.yaml", config_yaml.encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        """summary.json (a metric that is not finite, e.g. R² over one sample, as null)."""
        atomic_write_json(self.path / "summary.json", summary)

    def write_model(self, state_dict: dict[str, torch.Tensor]) -> None:
        """model.pt: a plain CPU state dict, loadable with ``torch.load(weights_only=True)``."""
        save_file(state_dict, self.path / "model.pt")
