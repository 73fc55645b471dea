"""Metric sinks behind one tiny protocol: JSONL (always), the console, CSV and TensorBoard.

A record is a flat dict with ``step``, ``epoch`` and ``train/...`` or ``val/...`` keys.
Only rank 0 creates sinks (:func:`run_sinks`).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Protocol, TextIO

from ddp_train.checkpoint.atomic import atomic_write, json_text
from ddp_train.checkpoint.run_directory import RunDirectory
from ddp_train.config import LoggingConfig
from ddp_train.extras import require


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
        # The kept history replaces the file in one rename: a kill now loses none of it.
        atomic_write(path, "".join(kept).encode())
        self._file = path.open("a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` as a line of strict JSON (non-finite numbers, nested ones too, as null)."""
        self._file.write(json_text(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def _format(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}", f"epoch {record['epoch']}"]
    for key, value in record.items():
        # A confusion matrix does not fit on a line; machine and per-layer metrics are
        # for metrics.jsonl and the plots, not for reading as they scroll by.
        if (key in ("step", "epoch", "train/peak_memory_gb") or isinstance(value, (list, dict))
                or not key.startswith(("train/", "val/"))):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


class ConsoleSink:
    """A tqdm progress bar on a terminal, or plain lines (logs, pipes, CI).

    ``mode``: ``bar``, ``lines``, ``none`` or ``auto`` (bar when stderr is a terminal and
    tqdm is installed).
    """

    def __init__(self, mode: str, total_steps: int | None, initial: int = 0,
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

    def on_step_end(self, trainer: Any, result: Any) -> None:
        """The Trainer's callback after every optimizer step: move the bar along."""
        self.advance(trainer.progress.global_step)

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


def _is_scalar(key: str, value: Any) -> bool:
    """A number worth a column or a chart (a confusion matrix is not; booleans are flags)."""
    return key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool)


class CsvSink:
    """One CSV file with a header, for spreadsheets and pandas.

    Train and validation records carry different keys, so the columns are the union of
    the keys seen so far: a record with a new key rewrites the file with the wider header
    (records come once per log step, so this is rare and cheap). Lists and dicts (a
    confusion matrix) are left out; a record without some column leaves it empty.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._columns: list[str] = []
        atomic_write(path, b"")  # a fresh file, created like every other
        self._file = path.open("a", encoding="utf-8", newline="")

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` as a row, widening the header first if it brings new keys."""
        row = {k: v for k, v in record.items() if k in ("step", "epoch") or _is_scalar(k, v)}
        new = [key for key in row if key not in self._columns]
        if new:
            self._widen(new)
        csv.DictWriter(self._file, self._columns).writerow(row)
        self._file.flush()

    def _widen(self, new: list[str]) -> None:
        self._file.close()
        with self.path.open(encoding="utf-8", newline="") as file:
            rows = list(csv.DictReader(file))
        self._columns += new
        # Rewritten in one rename, so a crash mid-rewrite cannot lose the old rows.
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, self._columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path, text.getvalue().encode())
        self._file = self.path.open("a", encoding="utf-8", newline="")

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def require_tensorboard() -> None:
    """Raise a ConfigError naming the extra unless the tensorboard package is installed."""
    # torch's writer is what the sink uses; it imports the tensorboard package.
    require(("torch.utils.tensorboard",), "tensorboard", "logging.tensorboard", "logging.tensorboard")


class TensorBoardSink:
    """TensorBoard event files: every numeric metric as a scalar at its ``step``.

    Needs the ``tensorboard`` package (``pip install "ddp_train[tensorboard]"``).
    ``keep_through_step``: a resumed run hides the events logged after the checkpoint it
    resumes from (TensorBoard's purge), as :class:`JsonlSink` drops those lines.
    """

    def __init__(self, log_dir: Path, keep_through_step: int | None = None) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        purge_step = None if keep_through_step is None else keep_through_step + 1
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        """Add every int or float metric of ``record`` as a scalar."""
        for key, value in record.items():
            if _is_scalar(key, value):
                self._writer.add_scalar(key, value, global_step=record["step"])

    def close(self) -> None:
        """Flush the events to disk and close the writer."""
        self._writer.flush()
        self._writer.close()


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def run_sinks(config: LoggingConfig, run_dir: RunDirectory, total_steps: int | None, global_step: int,
              keep_through_step: int | None) -> list[Any]:
    """The sinks of a run (rank 0): metrics.jsonl, the console, and CSV and TensorBoard when asked.

    ``global_step`` is where training starts; ``keep_through_step`` (a resumed run) keeps
    the history logged up to that step and drops what came after.
    """
    jsonl = JsonlSink(run_dir.metrics_path, keep_through_step)
    sinks: list[Any] = [jsonl, ConsoleSink(config.progress, total_steps, initial=global_step)]
    if config.csv:
        csv_sink = CsvSink(run_dir.path / "metrics.csv")
        # A resumed run's CSV starts with the history metrics.jsonl kept.
        for line in run_dir.metrics_path.read_text(encoding="utf-8").splitlines():
            csv_sink.log(json.loads(line))
        sinks.append(csv_sink)
    if config.tensorboard:
        sinks.append(TensorBoardSink(run_dir.path / "tensorboard", keep_through_step))
    return sinks

