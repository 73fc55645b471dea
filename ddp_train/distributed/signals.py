"""Signals that ask a process to stop cleanly, caught into a flag instead of ending it."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any, Sequence

log = logging.getLogger("ddp_train")

_process_ends_with_command = False
"""Set once by the command line's entry point: see :func:`keep_handlers_until_exit`."""


def keep_handlers_until_exit() -> None:
    """Declare that this process ends when its command ends (the command line's entry point).

    From then on a :class:`SignalFlag` leaves its handlers installed when it is exited, and
    a signal that comes after the work it guarded is logged and ignored. Restoring the
    default instead would let a late SIGTERM (Slurm and torchrun both send one; the second
    may come after the checkpoint and summary are written) end the process with 143, and a
    finished run would look failed. A library caller's process is not the command's:
    there flags restore the handlers they found.
    """
    global _process_ends_with_command
    _process_ends_with_command = True


class SignalFlag:
    """While active, the given signals set :attr:`signal_name` (the first one received).

    The owner polls the flag and stops in its own time. Handlers can only be installed
    from the main thread (a library user may work in another one); elsewhere nothing is
    caught. Subclasses say what to announce when the first signal arrives; later ones are
    logged.
    """

    def __init__(self, signals: Sequence[signal.Signals]) -> None:
        self.signals = tuple(signals)
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._active = False

    def __enter__(self) -> SignalFlag:
        self._active = True
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._active = False
        if not _process_ends_with_command:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        # Else the handlers stay until the process exits: _on_signal now reports late signals.
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self._active:
            self.ignore_late(name)
        elif self.signal_name is None:
            self.signal_name = name
            self.announce(name)
        else:
            log.warning("%s received again: already stopping", name)

    def announce(self, name: str) -> None:
        """Say what happens next, once, when the first signal arrives."""

    def ignore_late(self, name: str) -> None:
        """Report a signal that came after the flag was exited (its handlers kept until exit)."""
        log.warning("%s received after the work it would stop had ended: ignored", name)
