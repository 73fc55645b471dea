"""Training runs started as child processes: what sweeps and cross-validation are made of.

A child is an ordinary ddp_train run (``python -m ddp_train``, or torchrun with ``nproc``
ranks), so it validates, logs, checkpoints and handles signals like any other run, and
nothing in the trainer needs to know who started it. The parent follows the child's
``metrics.jsonl`` while it runs and stops it with SIGTERM, which the trainer treats as
preemption: every rank finishes its step, the run ends with status ``preempted``, exit 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, TextIO

from ddp_train.checkpoint.atomic import atomic_write
from ddp_train.distributed.signals import SignalFlag

# Variables that place a process in a launcher's job. The parent may itself run inside
# one (an srun step, a torchrun worker); its children must be jobs of their own.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                    "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_LOCALID")
LAUNCH_PREFIXES = ("TORCHELASTIC_",)

# Signals that ask the parent to stop: it passes SIGTERM on to the running child.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

POLL_S = 0.2
"""Seconds between two looks of a parent at its running child (exit code, new metrics, signals)."""


def child_command(args: list[str], nproc: int) -> list[str]:
    """The command line of a run with ``args`` (``--config ...``, overrides) on ``nproc`` ranks."""
    if nproc == 1:
        return [sys.executable, "-m", "ddp_train", *args]
    # --standalone: each run gets its own rendezvous on a free port, so several runs
    # (several sweep workers) can share a machine.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "ddp_train", *args]


def child_environment() -> dict[str, str]:
    """This process's environment without the variables of any launcher it runs under."""
    return {key: value for key, value in os.environ.items()
            if key not in LAUNCH_VARIABLES and not key.startswith(LAUNCH_PREFIXES)}


class ChildRun:
    """One run as a child process; its stdout and stderr go to ``log_path``."""

    def __init__(self, args: list[str], nproc: int, log_path: Path) -> None:
        self.command = child_command(args, nproc)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # A fresh log that starts with the command; the child's output is appended to it.
        atomic_write(log_path, (" ".join(self.command) + "\n").encode())
        self._log: TextIO = log_path.open("a", encoding="utf-8")
        self.stopped = False
        self._process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=child_environment())

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        code = self._process.poll()
        if code is not None and not self._log.closed:
            self._log.close()
        return code

    def stop(self) -> None:
        """Ask the run to end cleanly (SIGTERM: a preemption; torchrun passes it to every rank)."""
        if not self.stopped and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        self.stopped = True

    def last_lines(self, count: int = 3) -> str:
        """The last ``count`` non-empty lines of the run's output, for error messages."""
        try:
            lines = [line for line in self.log_path.read_text(encoding="utf-8",
                                                              errors="replace").splitlines()
                     if line.strip()]
        except OSError:
            return ""
        return "\n".join(lines[-count:])


class MetricsFollower:
    """The records a run appends to its metrics.jsonl, read as they come.

    Only whole lines are taken: a line still being written is read on the next call.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def new_records(self) -> list[dict[str, Any]]:
        """Records appended since the last call (none while the file does not exist yet)."""
        try:
            with self.path.open("rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        records = []
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


class StopRequests(SignalFlag):
    """While active, SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 set :attr:`signal_name` instead of ending us.

    The caller polls it and stops its child cleanly; the run can then be continued by
    running the same command again.
    """

    def __init__(self) -> None:
        super().__init__(STOP_SIGNALS)

    def announce(self, name: str) -> None:
        """Tell the user the running child is being stopped and how to continue."""
        print(f"ddp-train: {name} received: stopping the running training run cleanly; run "
              f"the same command again to continue", file=sys.stderr, flush=True)
