"""Preemption: a signal asks every rank to stop after the same step and checkpoint.

SIGTERM (``scancel``, the end of a time limit, torchrun stopping its workers), SIGUSR1
and SIGUSR2 (``#SBATCH --signal``; NCCL may claim USR1, so SLURM scripts use USR2) set a
flag. Ranks may receive the signal at different steps, so they agree through an
all-reduce (MAX) of the flag. To keep that collective off the critical path it is started
asynchronously after step s and read after step s+1: every rank sees the same result at
the same step, at the cost of at most one more step.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from ddp_train.distributed import DistEnv

log = logging.getLogger("ddp_train")

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class PreemptionWatch:
    """Catches the preemption signals while training and tells when all ranks agree to stop."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._flag = torch.zeros(1, device=env.device)
        self._work: dist.Work | None = None

    def __enter__(self) -> PreemptionWatch:
        # Handlers can only be installed from the main thread (a library user may train
        # in another one); then preemption is simply not caught.
        if threading.current_thread() is threading.main_thread():
            for signum in PREEMPTION_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            log.warning("%s received: finishing the current step, then checkpointing",
                        self.signal_name)

    def agreed(self) -> bool:
        """Call once per optimizer step on every rank: True when all ranks should stop now."""
        requested = self.signal_name is not None
        if not self.env.distributed:
            return requested
        stop = False
        if self._work is not None:
            self._work.wait()
            stop = bool(self._flag.item() > 0)
        self._flag = torch.tensor([1.0 if requested else 0.0], device=self.env.device)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True)
        return stop

    def drain(self) -> None:
        """Wait for the flag reduction still in flight (every rank has exactly one)."""
        if self._work is not None:
            self._work.wait()
            self._work = None
