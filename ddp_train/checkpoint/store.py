"""The checkpoints of one run behind one interface, whatever their format.

:class:`CheckpointStore` lists, reads, rotates and removes the checkpoints of
``<run_dir>/checkpoints``; its two formats write them: one file per checkpoint written by
rank 0 (:mod:`.single_file`), or one directory per checkpoint in which every rank writes its
own shards (:mod:`.sharded`). Names carry the step: ``step_00000120`` for periodic, final
and preemption checkpoints, ``best_00000080`` for the best one (kept apart from rotation).
A checkpoint is written under a hidden temporary name and renamed into place, so it is
complete or invisible; what a killed save left behind is removed at the next start.
Checkpoints newer than the one a run resumes from (unreadable ones that ``auto`` skipped,
or the abandoned branch of an explicit ``checkpoint.resume=PATH``) are moved into
``abandoned/``, where neither resuming nor rotation looks.
"""

from __future__ import annotations

import copy
import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ddp_train.checkpoint.atomic import TEMPORARY_MARK, fsync_directory
from ddp_train.config import CheckpointConfig
from ddp_train.errors import ConfigError, TrainingFailed, first_line

log = logging.getLogger("ddp_train")

FORMAT_VERSION = 1
"""The version of what a checkpoint holds; a checkpoint of another version is not loaded."""
REQUIRED_KEYS = ("format_version", "model", "optimizer", "scheduler", "progress", "ranks")
"""The entries every complete checkpoint state has."""
ABANDONED = "abandoned"
"""The folder of the checkpoints directory that checkpoints are moved into on resume (see
:meth:`CheckpointStore.set_aside_newer`): neither resuming nor rotation looks into it."""
_FILE_NAME = re.compile(r"^(step|best)_(\d{8})\.pt$")


class Ranks(Protocol):
    """What a store needs to know of the job (the launcher environment provides it)."""

    @property
    def is_main(self) -> bool:
        """True on rank 0, which writes everything but the shards."""

    def broadcast_from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""


class SingleProcess:
    """The :class:`Ranks` of a process that is the whole job (tools, tests, benchmarks)."""

    is_main = True

    def broadcast_from_main(self, obj: Any) -> Any:
        """``obj``: there is no other rank."""
        return obj


SINGLE_PROCESS = SingleProcess()
"""The ranks a store has unless it is given the job's."""


@dataclass(frozen=True)
class CheckpointFile:
    """One complete checkpoint on disk."""

    path: Path
    step: int
    kind: str
    """'step' (periodic, final, preemption) or 'best'."""


class CheckpointStore(ABC):
    """The checkpoints of one run: saving, listing, loading the newest that checks out, rotation.

    Every rank calls :meth:`save` with the same arguments; the format decides who writes
    what. Finding and loading checkpoints happens on rank 0 (the trainer sends the choice
    to the other ranks).
    """

    def __init__(self, directory: Path, config: CheckpointConfig, ranks: Ranks = SINGLE_PROCESS) -> None:
        self.directory = directory
        self.config = config
        self.ranks = ranks

    @abstractmethod
    def save(self, state: dict[str, Any], step: int, *, periodic: bool, best: bool) -> Path:
        """Write the checkpoint of optimizer step ``step`` as periodic and/or best, then rotate.

        ``state`` holds the checkpoint's entries (:data:`REQUIRED_KEYS`): the model and
        optimizer state as the strategy gives them, the rest complete on rank 0 (``{}``
        elsewhere suffices). Returns the checkpoint's path (the periodic one when both).
        """

    @abstractmethod
    def read(self, path: Path) -> dict[str, Any]:
        """Load and check one checkpoint; ValueError saying what is wrong with it."""

    def wait(self) -> None:
        """Block until background work is done; TrainingFailed if it failed (nothing runs in
        the background unless the format says otherwise)."""

    def check_background(self) -> None:
        """TrainingFailed if background work has failed; returns at once otherwise.

        Cheap enough for every step: a run whose background save failed stops at once
        instead of training on without checkpoints until its next save.
        """

    def list(self) -> list[CheckpointFile]:
        """Complete checkpoints (by name), oldest first; temporaries are never listed."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _FILE_NAME.match(path.name)
            if match:
                found.append(CheckpointFile(path, int(match.group(2)), match.group(1)))
        return sorted(found, key=lambda c: (c.step, c.kind == "step"))

    def delete(self, path: Path) -> None:
        """Remove one checkpoint or temporary."""
        path.unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> None:
        """Delete what a killed save left behind (rank 0, at start)."""
        if self.directory.is_dir():
            for path in self.directory.glob(f".*{TEMPORARY_MARK}*"):
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

    def set_aside_newer(self, step: int, reason: str) -> list[Path]:
        """Move every checkpoint newer than optimizer step ``step`` into a new folder of
        :data:`ABANDONED`, with a warning naming them; returns their new paths (rank 0).

        Called with the step a run resumes from: the newer ones are unreadable (``auto``
        skipped them) or belong to the branch an explicit resume abandons. Left in place,
        ``resume=auto`` would jump back to that branch at the next start, and rotation would
        delete the resumed run's new checkpoints to keep their higher step numbers.
        Moved, not deleted: they may still be wanted.
        """
        newer = [checkpoint for checkpoint in self.list() if checkpoint.step > step]
        if not newer:
            return []
        folder = _new_folder(self.directory / ABANDONED, f"after_step_{step:08d}")
        moved = [checkpoint.path.rename(folder / checkpoint.path.name) for checkpoint in newer]
        fsync_directory(folder)
        fsync_directory(self.directory)
        log.warning("moved %d checkpoint(s) newer than step %d into %s (%s), where neither "
                    "resuming nor rotation looks: %s", len(moved), step, folder, reason,
                    ", ".join(path.name for path in moved))
        return moved

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

    def _rotate(self, step: int, periodic: bool, best: bool) -> None:
        """After saving ``step`` (periodic and/or best): keep the newest ``keep_last`` periodic
        checkpoints and, after a new best, only it.

        The checkpoint just written counts as the newest whatever the others' step numbers,
        so a higher-numbered one of another branch never pushes it out.
        """
        checkpoints = self.list()

        def just_written(checkpoint: CheckpointFile) -> bool:
            return checkpoint.step == step and (periodic if checkpoint.kind == "step" else best)

        # A stable sort: by step as listed, the checkpoint just written moved last.
        periodic_ones = sorted((c for c in checkpoints if c.kind == "step"), key=just_written)
        for old in periodic_ones[:-self.config.keep_last]:
            self.delete(old.path)
        if best:
            for old in checkpoints:
                if old.kind == "best" and not just_written(old):
                    self.delete(old.path)


def save_failure(what: str, exc: BaseException) -> TrainingFailed:
    """The one-line failure of ``what`` (writing a checkpoint): this rank's own, since it alone
    may have hit a full disk or a lost file system."""
    return TrainingFailed(f"{what} failed: {type(exc).__name__}: {first_line(exc)}", shared=False)


def _new_folder(parent: Path, name: str) -> Path:
    """A folder ``parent/name`` that did not exist (``name.2``, ``name.3``, ... when it did)."""
    parent.mkdir(parents=True, exist_ok=True)
    folder, number = parent / name, 1
    while True:
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1
            folder = parent / f"{name}.{number}"
