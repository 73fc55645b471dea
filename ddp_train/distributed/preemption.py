"""Preemption: a signal asks every rank to stop after the same step and checkpoint.

SIGTERM (``scancel``, the end of a time limit, torchrun stopping its workers), SIGUSR1
and SIGUSR2 (``#SBATCH --signal``; NCCL may claim USR1, so SLURM scripts use USR2) set a
flag. Ranks may receive the signal at different steps, so they agree through an
all-reduce (MAX) of the flag.

That collective must not cost a step anything. It is started asynchronously at one
agreement point and read at the next, and agreement points are ``interval`` optimizer
steps apart, with ``interval`` chosen so that they come about every ``sync_s`` seconds
(``dist.preemption_sync_s``, 0.2 by default): a tiny model stepping in a millisecond
agrees every few hundred steps, a large one every step; 0 agrees after every step. The interval is itself agreed in the same all-reduce (the
smallest proposal wins, sent negated so that MAX serves both), so every rank always agrees
at the same step. A signal is acted on within two intervals: well under a second, far
inside the grace period of SLURM (``--signal=...@180``) and of torchrun (30 s).

A second signal (Slurm and torchrun both send SIGTERM) is logged. Under the command line the
handlers stay installed after training until the process exits
(:func:`~ddp_train.distributed.signals.keep_handlers_until_exit`): a signal that comes after
the checkpoint and summary is logged and ignored, and the run's result stands.
"""

from __future__ import annotations

import logging
import signal
import time

import torch
import torch.distributed as dist

from ddp_train.distributed.environment import DistEnv
from ddp_train.distributed.signals import SignalFlag

log = logging.getLogger("ddp_train")

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
MAX_INTERVAL = 1000
"""Most optimizer steps between two agreement points (bounds the wait if steps slow down)."""


class PreemptionWatch(SignalFlag):
    """Catches the preemption signals while training and tells when all ranks agree to stop."""

    def __init__(self, env: DistEnv, sync_s: float = 0.2) -> None:
        super().__init__(PREEMPTION_SIGNALS)
        self.env = env
        self.sync_s = sync_s
        # Looked up once: the process group outlives the watch, and the per-step call stays
        # a counter increment (measured inside a training step, the lookup cost ~10 µs).
        self._distributed = env.distributed
        self._buffer = torch.zeros(2, dtype=torch.float64, device=env.device)
        self._work: dist.Work | None = None
        self.interval = 1
        """Optimizer steps between agreement points; the same on every rank."""
        self._steps_since = 0
        self._since = time.perf_counter()

    def __enter__(self) -> PreemptionWatch:
        super().__enter__()
        self._since = time.perf_counter()
        return self

    def announce(self, name: str) -> None:
        """Log that this rank will stop after an agreed step and checkpoint."""
        log.warning("%s received: finishing the current step, then checkpointing", name)

    def ignore_late(self, name: str) -> None:
        """Log a signal that came after training ended (the command keeps the handlers until exit)."""
        log.warning("%s received after training ended (or failed): ignored, the run's outcome stands", name)

    def agreed(self) -> bool:
        """Call once per optimizer step on every rank: True when all ranks should stop now."""
        requested = self.signal_name is not None
        if not self._distributed:
            return requested
        self._steps_since += 1
        if self._steps_since < self.interval:
            return False
        stop = False
        if self._work is not None:
            self._work.wait()
            flag, negated_interval = self._buffer.tolist()
            stop, self.interval = flag > 0, int(-negated_interval)
        now = time.perf_counter()
        # Steps that fit in sync_s at this rank's recent pace (validation and checkpoints
        # included, which only makes the interval shorter).
        pace = (now - self._since) / self._steps_since
        proposal = max(1, min(MAX_INTERVAL, int(self.sync_s / max(pace, 1e-9))))
        self._buffer = torch.tensor([1.0 if requested else 0.0, -float(proposal)],
                                    dtype=torch.float64, device=self.env.device)
        self._work = dist.all_reduce(self._buffer, op=dist.ReduceOp.MAX, async_op=True)
        self._steps_since, self._since = 0, now
        return stop

    def drain(self) -> None:
        """Wait for the flag reduction still in flight (every rank has exactly one)."""
        if self._work is not None:
            self._work.wait()
            self._work = None
