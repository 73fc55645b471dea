"""Metric sinks behind one tiny protocol: JSONL (always) and the console.

A record is a flat dict with ``step``, ``epoch`` and ``train/...`` or ``val/...`` keys.
Only rank 0 creates sinks.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Protocol, TextIO


class MetricSink(Protocol):
    """Where metric records go."""

    def log(self, record: dict[str, Any]) -> None:
        """Write one record."""

    def close(self) -> None:
        """Flush and release resources."""


class JsonlSink:
    """One JSON object per line, flushed per record so a crash loses at most one line.

    ``keep_through_step``: a resumed run keeps the records up to that step and drops the
    later ones (logged after the checkpoint it resumes from, and about to be redone).
    """

    def __init__(self, path: Path, keep_through_step: int | None = None) -> None:
        kept: list[str] = []
        if keep_through_step is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= keep_through_step:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill
        self._file = path.open("w", encoding="utf-8")
        self._file.writelines(kept)
        self._file.flush()

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` as a line (non-finite floats become null: JSON has no NaN)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def _format(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}", f"epoch {record['epoch']}"]
    for key, value in record.items():
        if key in ("step", "epoch") or isinstance(value, (list, dict)):
            continue  # a confusion matrix does not fit on a line
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


class ConsoleSink:
    """A tqdm progress bar on a terminal, or plain lines (logs, pipes, CI).

    ``mode``: ``bar``, ``lines``, ``none`` or ``auto`` (bar when stderr is a terminal and
    tqdm is installed).
    """

    def __init__(self, mode: str, total_steps: int, initial: int = 0,
                 stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._bar: Any = None
        if mode == "auto":
            mode = "bar" if self._stream.isatty() and _has_tqdm() else "lines"
        if mode == "bar":
            from tqdm.auto import tqdm  # optional extra: ddp_train[progress]
            self._bar = tqdm(total=total_steps, initial=initial, unit="step", file=self._stream,
                             dynamic_ncols=True)
        self._mode = mode

    def advance(self, step: int) -> None:
        """Move the bar to optimizer step ``step``."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def log(self, record: dict[str, Any]) -> None:
        """Show a record: validation always as a line; train metrics as the bar's postfix."""
        if self._mode == "none":
            return
        is_train = not any(key.startswith("val/") for key in record)
        if self._bar is not None and is_train:
            self._bar.set_postfix({k.split("/", 1)[1]: f"{v:.4g}" for k, v in record.items()
                                   if k.startswith("train/") and isinstance(v, float)},
                                  refresh=False)
        elif self._bar is not None:
            self._bar.write(_format(record), file=self._stream)
        else:
            print(_format(record), file=self._stream, flush=True)

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True
