"""Signals that ask a process to stop cleanly, caught into a flag instead of ending it."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Sequence


class SignalFlag:
    """While active, the given signals set :attr:`signal_name` (the first one received).

    The owner polls the flag and stops in its own time. Handlers can only be installed
    from the main thread (a library user may work in another one); elsewhere nothing is
    caught. Subclasses say what to announce when the first signal arrives.
    """

    def __init__(self, signals: Sequence[signal.Signals]) -> None:
        self.signals = tuple(signals)
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self.announce(self.signal_name)

    def announce(self, name: str) -> None:
        """Say what happens next, once, when the first signal arrives."""
