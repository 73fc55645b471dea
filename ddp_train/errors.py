"""Exceptions that the entry point turns into exit codes: 1 training failed, 2 usage or config error."""

from __future__ import annotations

import traceback
from pathlib import Path


class ConfigError(Exception):
    """Bad configuration or usage: reported without a traceback, exit code 2.

    ``key`` is the dotted config key at fault (``""`` when the problem is not tied
    to one key, e.g. an unreadable ``--config`` file).
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class UsageError(Exception):
    """A command-line flag or argument that cannot be used: reported without a traceback, exit code 2.

    ``option`` names it as the command line spells it (``--port``, ``RUN_DIR``).
    """

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        self.message = message
        super().__init__(f"{option}: {message}")


class TrainingFailed(Exception):
    """Training could not go on (non-finite loss, out of memory): exit code 1, no traceback.

    ``shared``: every rank fails alike (one message, from rank 0, is enough), as opposed
    to a failure of this rank alone, which that rank reports.
    """

    def __init__(self, message: str, shared: bool = True) -> None:
        self.shared = shared
        super().__init__(message)


class ExportFailed(Exception):
    """A model could not be exported, or an exported file does not answer like the model: exit 1."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message (its type's name when it has none), at most ``limit`` characters.

    For one-line reports of errors raised by libraries, whose messages may run over many
    lines, or be empty.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


class BatchError(ConfigError):
    """A batch or model output outside the batch contract: one line naming what was received, exit 2."""

    def __init__(self, message: str, key: str = "data") -> None:
        super().__init__(key, message)


def failure_summary(exc: BaseException) -> str:
    """``Type at file.py:line: first line of the message``, naming the innermost frame that raised.

    For one-line reports of an error in the user's own code (a factory, a model's first
    forward), where the line that raised is what points at the fix.
    """
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" at {Path(frame[0].filename).name}:{frame[0].lineno}" if frame else ""
    return f"{type(exc).__name__}{where}: {first_line(exc)}"
