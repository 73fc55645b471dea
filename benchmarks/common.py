"""Shared parts of the benchmark suite: spawned ranks, the workloads, timing and statistics.

Every benchmark here runs its ranks as freshly spawned processes (``torch.multiprocessing``,
the ``spawn`` start method, one intra-op thread per rank, gloo on CPU or NCCL on CUDA),
exactly as the test suite does, and returns plain Python values (lists of seconds) that
``run.py`` writes to ``results/latest.json``.
"""

from __future__ import annotations

import datetime
import os
import platform
import random
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from checkpoint_save import cpu_model
from ddp_train.components.models import gpt, mlp

# Launcher variables of an outer job must not leak into the ranks started here.
_LAUNCH_PREFIXES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                    "MASTER_ADDR", "MASTER_PORT", "SLURM_", "TORCHELASTIC_")


# ---------------------------------------------------------------------------------------
# Workloads


@dataclass(frozen=True)
class Workload:
    """A model, its data and its per-rank micro-batch: what every compared loop trains.

    ``kind`` is ``mlp`` (classification rows) or ``gpt`` (next-token prediction); the
    data set holds ``steps_per_epoch`` full global batches at world size 2, so epoch ends
    (a new sampler permutation and DataLoader iterator) occur at the same rate in every
    loop that is compared.
    """

    name: str
    kind: str
    model_args: dict[str, Any]
    batch_size: int
    steps_per_epoch: int = 64

    def build_model(self) -> nn.Module:
        """A fresh model from the shared seed (same weights on every rank and in every loop)."""
        torch.manual_seed(0)
        return mlp(**self.model_args) if self.kind == "mlp" else gpt(**self.model_args)

    def build_dataset(self, world_size: int = 2) -> TensorDataset:
        """Random inputs and labels, in memory: loading costs the DataLoader's own work only."""
        generator = torch.Generator().manual_seed(1)
        n = self.batch_size * world_size * self.steps_per_epoch
        if self.kind == "mlp":
            inputs = torch.randn(n, self.model_args["in_features"], generator=generator)
            targets = torch.randint(0, self.model_args["out_features"], (n,), generator=generator)
            return TensorDataset(inputs, targets)
        vocab, length = self.model_args["vocab_size"], self.model_args["block_size"]
        tokens = torch.randint(0, vocab, (n, length + 1), generator=generator)
        return TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())

    def parameters(self) -> int:
        """Trainable parameters (a tied weight counted once)."""
        return sum(p.numel() for p in self.build_model().parameters())

    def describe(self) -> dict[str, Any]:
        """The workload as JSON."""
        return {"name": self.name, "model": self.kind, "model_args": self.model_args,
                "batch_size_per_rank": self.batch_size, "parameters": self.parameters(),
                "gradient_bytes_fp32": 4 * self.parameters()}


TINY = Workload("tiny_mlp", "mlp", {"in_features": 64, "out_features": 10,
                                    "hidden_sizes": [128, 128]}, batch_size=32)
"""ddp_train's default MLP (26 k parameters): a step is almost all framework overhead."""
MID = Workload("mid_gpt", "gpt", {"vocab_size": 256, "block_size": 64, "n_layer": 2, "n_head": 4,
                                  "n_embd": 128}, batch_size=8)
"""A 0.44 M-parameter GPT, 8 × 64 tokens per rank: tens of ms of compute per step on one
CPU core, so per-step overheads of tens of µs are what they would be next to real work."""
GPU_GPT = Workload("gpt2_medium", "gpt", {"vocab_size": 50304, "block_size": 1024, "n_layer": 24,
                                          "n_head": 16, "n_embd": 1024}, batch_size=8)
"""GPT-2 medium's shape (355 M parameters: the issue's "a few hundred million"; width 1024 keeps
an H100's tensor cores busy), for the GPU mode only."""


# ---------------------------------------------------------------------------------------
# Spawned ranks


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn_entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], out_dir: str,
                 args: tuple[Any, ...]) -> None:
    for key in [k for k in os.environ if k.startswith(_LAUNCH_PREFIXES)]:
        del os.environ[key]
    # What torchrun would set: ddp_train reads these like any launcher's.
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    cores = sorted(os.sched_getaffinity(0))
    if world_size <= len(cores):
        # Each rank on a core of its own (as numactl or torchrun --numa-binding setups bind
        # them). Left to the scheduler, two ranks on two vCPUs here sometimes share one
        # for whole blocks of steps: step times then jump between ~1.3 and ~2.4 ms at random,
        # a noise larger than any overhead measured.
        os.sched_setaffinity(0, {cores[rank]})
    result = fn(rank, world_size, *args)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def spawn_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600
                ) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; their results.

    ``fn`` must be a module-level function returning a picklable value. A rank that raises
    re-raises here; a job past ``timeout`` seconds is killed and raises ``TimeoutError``.
    """
    with tempfile.TemporaryDirectory(prefix="ddp_bench_") as out_dir:
        context = mp.start_processes(_spawn_entry, args=(world_size, free_port(), fn, out_dir, args),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__}: ranks did not finish within {timeout} s")
        finally:  # a timeout, a failed rank, or this process being stopped: no orphans
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False)
                for r in range(world_size)]


def init_process_group(rank: int, world_size: int, device: torch.device) -> None:
    """The group every compared loop shares: gloo on CPU, NCCL on CUDA (env:// rendezvous)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)


def rank_device(device_type: str, rank: int) -> torch.device:
    """``cuda:<rank>`` or the CPU."""
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a host timestamp means the work is done (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_overrides(workload: Workload, output_dir: str, name: str, device: torch.device,
                      total_steps: int, extra: Sequence[str] = ()) -> list[str]:
    """Config overrides that leave only training steps in ``Trainer.fit``.

    No validation set is passed, checkpoints are off (``every_epochs=0``, ``every_steps=0``),
    logging happens every 10⁹ steps, no progress output, no system metrics. What ``fit``
    still does per call (the end-of-training loss reduction, ``model.pt`` and
    ``summary.json`` on rank 0, signal handlers) is fixed per call, not per step.
    """
    return [f"run.output_dir={output_dir}", f"run.name={name}", f"run.device={device.type}",
            f"data.batch_size={workload.batch_size}", "optim.name=adamw", "optim.lr=3e-3",
            "schedule.name=cosine", "schedule.warmup_steps=10", "train.epochs=1000000",
            f"train.max_steps={total_steps}", "checkpoint.every_epochs=0",
            "checkpoint.every_steps=0", "checkpoint.resume=never",
            "logging.every_steps=1000000000", "logging.progress=none",
            "logging.system_metrics=false", "eval.task=none",
            "train.precision=" + ("bf16" if device.type == "cuda" else "fp32"), *extra]


class StepClock:
    """Timestamps taken at the start and the end of every step.

    The interval between two consecutive step starts contains everything a loop does per
    step (data loading, the step, the bookkeeping around it), and nothing else; the gap
    from a step's end to the next one's start is the loop's own bookkeeping. The same
    clock is put on every compared loop, so its own cost (a ``perf_counter`` and an
    ``append`` per mark, well under a µs) is paid alike.
    """

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.ends: list[float] = []

    def tick(self) -> None:
        """Mark the start of a step."""
        self.marks.append(time.perf_counter())

    def done(self) -> None:
        """Mark the end of the step last started."""
        self.ends.append(time.perf_counter())

    # As a Trainer callback (``Trainer(..., callbacks=[clock])``), the same marks around
    # each of fit()'s optimizer steps: the start before its micro-batches are loaded.

    def on_step_start(self, trainer: Any) -> None:
        """Mark the start of one of fit()'s steps."""
        self.tick()

    def on_step_end(self, trainer: Any, result: Any) -> None:
        """Mark the end of one of fit()'s steps."""
        self.done()

    def gaps(self) -> list[float]:
        """End-to-next-start times of the steps marked since ``intervals()`` was last called."""
        return [start - end for end, start in zip(self.ends, self.marks[1:])]

    def intervals(self) -> list[float]:
        """Start-to-start times of the steps marked since the last call; then forgets them."""
        marks, self.marks, self.ends = self.marks, [], []
        return [b - a for a, b in zip(marks, marks[1:])]


def run_trainer_steps(trainer: Any, steps: int) -> None:
    """Continue ``trainer`` for ``steps`` more optimizer steps with one real ``fit()`` call."""
    trainer.total_steps = trainer.progress.global_step + steps
    trainer.progress.status = "running"
    trainer.fit()


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    """``items`` starting at index ``shift`` (mod length): the order of one round."""
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def shuffled_rounds(items: Sequence[Any], rounds: int, seed: int = 0) -> list[list[Any]]:
    """An order per round: rotations, each one shuffled with a seed every rank shares."""
    rng = random.Random(seed)
    orders = []
    for index in range(rounds):
        order = rotated(items, index)
        rng.shuffle(order)
        orders.append(order)
    return orders


# ---------------------------------------------------------------------------------------
# Statistics


def median(values: Sequence[float]) -> float:
    """The median (``nan`` for no values)."""
    return statistics.median(values) if values else float("nan")


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """The 25th and 75th percentiles."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, min, max and count of a list of seconds."""
    low, high = quartiles(values)
    return {"median": median(values), "p25": low, "p75": high,
            "min": min(values) if values else float("nan"),
            "max": max(values) if values else float("nan"), "n": len(values)}


def paired_bootstrap(rounds_a: Sequence[Sequence[float]], rounds_b: Sequence[Sequence[float]],
                     stat: Callable[[list[float], list[float]], float], resamples: int = 1000,
                     seed: int = 0, clusters: Sequence[int] | None = None) -> tuple[float, float]:
    """95% interval of ``stat(a, b)`` when whole rounds are resampled with replacement.

    ``rounds_a[i]`` and ``rounds_b[i]`` were measured in the same round (next to each
    other in time), so resampling rounds keeps each pair together: drift of the machine
    between rounds widens the interval instead of biasing it. ``clusters[i]`` names the
    replica (a fresh pair of processes) round ``i`` ran in: then replicas are resampled
    first and rounds within each, so what differs from one replica to the next widens the
    interval too.
    """
    rng = random.Random(seed)
    groups: dict[int, list[int]] = {}
    for index, cluster in enumerate(clusters if clusters is not None else range(len(rounds_a))):
        groups.setdefault(cluster, []).append(index)
    members = list(groups.values())
    values = []
    for _ in range(resamples):
        picks: list[int] = []
        for _ in members:  # as many replicas as were measured, drawn with replacement
            rounds = rng.choice(members)
            picks += [rng.choice(rounds) for _ in rounds]
        a = [x for i in picks for x in rounds_a[i]]
        b = [x for i in picks for x in rounds_b[i]]
        values.append(stat(a, b))
    values.sort()
    return values[int(0.025 * resamples)], values[int(0.975 * resamples) - 1]


# ---------------------------------------------------------------------------------------
# The machine


def utc_now() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, torch and Python versions, GPU (if any), and the time."""
    import psutil

    info: dict[str, Any] = {
        "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "timestamp_utc": utc_now(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def probe(seconds: float = 2.0) -> dict[str, float]:
    """Spin one core for ``seconds``: what the rest of the machine and the host took meanwhile.

    ``others_cores``: cores other processes kept busy; ``steal_cores``: CPU time the
    hypervisor gave to other guests (it shows only while this guest wants the CPU, hence
    the spinning).
    """
    with CpuWatch() as watch:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
    return watch.result


def wait_for_quiet(max_load: float | None, max_busy: float, max_wait_s: float) -> dict[str, Any]:
    """Wait (at most ``max_wait_s``) until the machine is quiet; how quiet it was.

    Quiet: the 1-minute load average is below ``max_load`` (or ``max_load`` is None) and,
    over a 2-s :func:`probe`, other processes and other guests of the host together take
    less than ``max_busy`` cores. Another job on a shared machine would slow the measured
    loops unevenly; the wait and the state it ended in go into the results.
    """
    start = time.monotonic()
    while True:
        load, sample = load_average(), probe()
        busy = sample["others_cores"] + sample["steal_cores"]
        quiet = busy < max_busy and (max_load is None or load < max_load)
        if quiet or time.monotonic() - start > max_wait_s:
            break
        print(f"  machine busy (load {load:.2f}, other processes {sample['others_cores']:.2f} "
              f"cores, host steal {sample['steal_cores']:.2f} cores): waiting", flush=True)
        time.sleep(8)
    return {"load_1min": round(load, 2), "others_cores": sample["others_cores"],
            "steal_cores": sample["steal_cores"], "waited_s": round(time.monotonic() - start, 1),
            "quiet": quiet}


def _busy_jiffies() -> tuple[int, int]:
    """(busy, steal) CPU jiffies of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq, steal


class CpuWatch:
    """How much CPU the rest of the machine used while a benchmark ran.

    ``others_cores`` = (all busy CPU time of the machine − the CPU time of this process
    and of the children it has waited for) / wall time: the average number of cores
    something else kept busy. Near 0 means the measurement had the machine to itself.
    ``steal_cores`` is time the hypervisor gave to other guests.
    """

    def __enter__(self) -> CpuWatch:
        self._start = (time.monotonic(), *_busy_jiffies(), self._own_cpu())
        return self

    @staticmethod
    def _own_cpu() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    def __exit__(self, *exc_info: object) -> None:
        wall0, busy0, steal0, own0 = self._start
        wall = time.monotonic() - wall0
        busy, steal = _busy_jiffies()
        tick = os.sysconf("SC_CLK_TCK")
        machine = (busy - busy0) / tick
        own = self._own_cpu() - own0
        self.result = {"wall_s": round(wall, 2), "own_cores": round(own / wall, 2),
                       "others_cores": round(max(machine - own, 0.0) / wall, 2),
                       "steal_cores": round((steal - steal0) / tick / wall, 2),
                       "load_1min_end": round(load_average(), 2)}
