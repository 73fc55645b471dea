"""torch.profiler over a window of optimizer steps: a Chrome trace per rank, a summary on rank 0."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, schedule

log = logging.getLogger("ddp_train")


class StepProfiler:
    """Profiles ``active`` optimizer steps after skipping ``wait`` and ``warmup`` steps.

    Every rank writes ``<run_dir>/profile/rank{R}_trace_step{S}.json`` (open it in
    ``chrome://tracing`` or https://ui.perfetto.dev), S being the step after the window.
    Call :meth:`start` before the first step, :meth:`step` after every optimizer step
    and :meth:`stop` at the end (also when training ends inside the window: what was
    recorded so far is written then). As a Trainer callback it does so itself, over each
    ``fit()``, and logs the summary.
    """

    def __init__(self, run_dir: Path, rank: int, device: torch.device, wait: int, warmup: int,
                 active: int, record_shapes: bool = False, memory: bool = False) -> None:
        self.rank = rank
        self.directory = run_dir / "profile"
        self.traces: list[Path] = []
        on_gpu = device.type == "cuda"
        self._sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        self._first_step = 0
        self._running = self._started = False
        self._options: dict[str, Any] = dict(
            activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])],
            schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=self._write_trace, record_shapes=record_shapes,
            profile_memory=memory, with_stack=False)
        self._profiler = profile(**self._options)

    def _write_trace(self, prof: profile) -> None:
        # Each rank writes its own file, so the directory is made here, not by rank 0.
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"rank{self.rank}_trace_step{self._first_step + prof.step_num}.json"
        prof.export_chrome_trace(str(path))
        self.traces.append(path)

    def start(self, global_step: int = 0) -> None:
        """Start counting steps; ``global_step`` (steps already done) numbers the trace files."""
        if self._started:  # profiled before: a new window of its own
            self._profiler = profile(**self._options)
        self._started = True
        self._first_step = global_step
        self._profiler.start()
        self._running = True

    def step(self) -> None:
        """Mark the end of one optimizer step."""
        self._profiler.step()

    def stop(self) -> str | None:
        """Stop profiling; on rank 0, a table of the 10 operators with the most self time.

        None on other ranks, when not started, and when training ended before the window.
        """
        if not self._running:
            return None
        self._running = False
        self._profiler.stop()
        if self.rank != 0 or not self.traces:
            return None
        return self._profiler.key_averages().table(sort_by=self._sort_by, row_limit=10)

    # The Trainer's callback protocol: profile the first steps of every fit().

    def on_fit_start(self, trainer: Any) -> None:
        """Start, numbering the traces from the steps already done."""
        self.start(trainer.progress.global_step)

    def on_step_end(self, trainer: Any, result: Any) -> None:
        """Mark the step."""
        self.step()

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        """Stop; rank 0 logs the operators with the most self time."""
        table = self.stop()
        if table:
            log.info("top operators by self time (rank 0; traces in %s):\n%s", self.directory, table)

