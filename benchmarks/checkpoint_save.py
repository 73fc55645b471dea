"""Benchmark: what does ``FileCheckpointStore.save`` cost compared with a bare ``torch.save``?

What is measured, on one realistic training state (a GPT from ``ddp_train.components.models.gpt``,
its AdamW optimizer after one real step so ``exp_avg``/``exp_avg_sq`` exist, the LR
schedule, and the small extra keys, in the layout of ``Trainer.state_dict()``):

* ``raw_torch_save_s``: ``torch.save(state, path)``, nothing else. Not durable: the
  bytes may still be in the page cache when it returns.
* ``raw_torch_save_fsync_s``: the same plus ``os.fsync`` of the file. The durable
  baseline.
* ``sync_save_s``: ``FileCheckpointStore(dir, CheckpointConfig(keep_last=2)).save(state,
  step, periodic=True, best=False)``: temporary file, ``torch.save``, flush, fsync,
  rename, fsync of the directory, rotation.
* ``async_blocking_s``: the same with ``async_save=True``, timing only the ``save`` call
  (what the training loop waits for: the private CPU copy of the state and the start
  of the writer thread); ``wait()`` is called outside the timed region.
  ``async_total_s`` is ``save`` plus ``wait`` (the whole write, for reference).

Why the comparison is fair: every variant writes the very same state dict object to a
file in the very same directory (a fresh temporary directory on the file system of
``tempfile.gettempdir()``); ``ckpt_save_ratio`` compares the manager with the raw save
that is durable too (fsync), so the ratio is the price of atomicity and rotation (and of
writing through a Python file object) alone.
The variants run interleaved in every repetition, with the starting variant rotated
from one repetition to the next, so drift (other load on the machine, page-cache
pressure) hits all of them alike. After each sample, untimed, the files are deleted and
``os.sync()`` drains any write-back still pending, so no sample pays for the previous
one's dirty pages. One untimed warm-up round comes first. Medians and ratios are
reported, because a shared machine makes single times noisy.

Run: ``python benchmarks/checkpoint_save.py [--repeats N] [--out DIR]``; writes
``checkpoint_save.json`` (all samples, medians, ratios, goals) and ``checkpoint_save.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ddp_train.checkpoint.single_file import FileCheckpointStore, read_checkpoint
from ddp_train.checkpoint.store import FORMAT_VERSION
from ddp_train.config import (CheckpointConfig, EarlyStoppingConfig, OptimConfig, ScheduleConfig,
                              TrainConfig, config_to_dict)
from ddp_train.training.early_stopping import EarlyStopping
from ddp_train.components.models import gpt
from ddp_train.components.optimizers import build_optimizer, build_schedule
from ddp_train.distributed.precision import Precision
from ddp_train.training.rng import capture_rng
from ddp_train.training.progress import TrainingProgress

MODEL_ARGS: dict[str, Any] = {"vocab_size": 256, "block_size": 256, "n_layer": 4, "n_head": 8,
                              "n_embd": 512}
"""12.9 M parameters: weights plus two AdamW moments make a ~155 MB checkpoint."""
GOALS: dict[str, float] = {"ckpt_save_ratio": 1.1, "async_blocking_fraction": 0.2}
"""Upper bounds: the manager at most 10% slower than a durable raw save; an async save
blocks the training loop for at most 20% of a synchronous one."""
TIMINGS: tuple[str, ...] = ("raw_torch_save_s", "raw_torch_save_fsync_s", "sync_save_s",
                            "async_blocking_s")
"""The interleaved variants; ``async_total_s`` is recorded alongside ``async_blocking_s``."""
LABELS: dict[str, str] = {
    "raw_torch_save_s": "torch.save\n(no fsync)",
    "raw_torch_save_fsync_s": "torch.save\n+ fsync",
    "sync_save_s": "FileCheckpointStore\n.save (sync)",
    "async_blocking_s": "async save:\ntime blocked",
    "async_total_s": "async save:\nsave + wait",
}


def build_state() -> dict[str, Any]:
    """A rank-0 training state with the keys and value types of ``Trainer.state_dict()``."""
    torch.manual_seed(0)
    config = TrainConfig()
    config.model.name, config.model.args = "gpt", dict(MODEL_ARGS)
    model = gpt(**MODEL_ARGS)
    optimizer = build_optimizer(model.parameters(), OptimConfig(name="adamw"))
    scheduler = build_schedule(optimizer, ScheduleConfig(name="cosine", warmup_steps=10), 1000)
    tokens = torch.randint(0, MODEL_ARGS["vocab_size"], (2, 65))
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    progress = TrainingProgress(global_step=1, step_in_epoch=1, train_loss_since_val=5.5,
                                wall_time_s=1.0)
    rank_state = {"rng": capture_rng(torch.device("cpu")),
                  "loss_sums": torch.zeros(2, dtype=torch.float64), "micro_since": [0, 0]}
    return {"format_version": FORMAT_VERSION, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "precision": Precision("fp32", torch.device("cpu")).state_dict(),
            "early_stopping": EarlyStopping(EarlyStoppingConfig()).state_dict(),
            "progress": progress.state_dict(),
            "sampler": {"epoch": 0, "seed": 0, "start_index": 0},
            "ranks": [rank_state], "world_size": 1, "config": config_to_dict(config)}


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clear(directory: Path) -> None:
    """Delete every file in ``directory`` and drain pending write-back (untimed)."""
    for path in directory.iterdir():
        path.unlink()
    os.sync()


class Variants:
    """The measured operations, each writing ``state`` into one shared directory."""

    def __init__(self, state: dict[str, Any], directory: Path) -> None:
        self.state = state
        self.directory = directory
        self.raw_path = directory / "raw.pt"
        self.sync_manager = FileCheckpointStore(directory, CheckpointConfig(keep_last=2))
        self.async_manager = FileCheckpointStore(directory, CheckpointConfig(keep_last=2,
                                                                           async_save=True))

    def raw_save(self, step: int) -> dict[str, float]:
        """``torch.save`` to a path."""
        start = time.perf_counter()
        torch.save(self.state, self.raw_path)
        return {"raw_torch_save_s": time.perf_counter() - start}

    def raw_save_fsync(self, step: int) -> dict[str, float]:
        """``torch.save`` to a path, then fsync the file."""
        start = time.perf_counter()
        torch.save(self.state, self.raw_path)
        _fsync_file(self.raw_path)
        return {"raw_torch_save_fsync_s": time.perf_counter() - start}

    def sync_save(self, step: int) -> dict[str, float]:
        """The manager's synchronous save."""
        start = time.perf_counter()
        self.sync_manager.save(self.state, step, periodic=True, best=False)
        return {"sync_save_s": time.perf_counter() - start}

    def async_save(self, step: int) -> dict[str, float]:
        """The manager's async save: the blocking part, and the total up to ``wait()``."""
        start = time.perf_counter()
        self.async_manager.save(self.state, step, periodic=True, best=False)
        blocked = time.perf_counter() - start
        self.async_manager.wait()
        return {"async_blocking_s": blocked, "async_total_s": time.perf_counter() - start}

    def in_order(self, repetition: int) -> list[Callable[[int], dict[str, float]]]:
        """All four variants, the first one rotated by ``repetition``."""
        order: list[Callable[[int], dict[str, float]]] = [
            self.raw_save, self.raw_save_fsync, self.sync_save, self.async_save]
        shift = repetition % len(order)
        return order[shift:] + order[:shift]


def run(repeats: int) -> dict[str, Any]:
    """Build the state, run one warm-up round and ``repeats`` timed rounds; the results."""
    state = build_state()
    samples: dict[str, list[float]] = {name: [] for name in (*TIMINGS, "async_total_s")}
    with tempfile.TemporaryDirectory(prefix="ckpt_bench_") as tmp:
        directory = Path(tmp)
        variants = Variants(state, directory)
        sizes: dict[str, int] = {}
        for variant in variants.in_order(0):  # warm-up; also checks the files
            variant(0)
            (path,) = directory.iterdir()
            sizes[variant.__name__] = path.stat().st_size
            if path != variants.raw_path:
                read_checkpoint(path)  # raises unless it is a valid ddp_train checkpoint
            _clear(directory)
        for repetition in range(repeats):
            for variant in variants.in_order(repetition):
                for name, seconds in variant(repetition + 1).items():
                    samples[name].append(seconds)
                _clear(directory)
        filesystem_dir = str(directory.parent)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    ratios = {
        "ckpt_save_ratio": medians["sync_save_s"] / medians["raw_torch_save_fsync_s"],
        "ckpt_save_ratio_vs_no_fsync": medians["sync_save_s"] / medians["raw_torch_save_s"],
        "async_blocking_fraction": medians["async_blocking_s"] / medians["sync_save_s"],
        "async_total_ratio": medians["async_total_s"] / medians["sync_save_s"],
    }
    return {
        "benchmark": "checkpoint_save",
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "temp_dir": filesystem_dir},
        "setup": {"model": "gpt", "model_args": MODEL_ARGS,
                  "parameters": sum({t.data_ptr(): t.numel()  # the tied weight once
                                     for t in state["model"].values()}.values()),
                  "file_size_bytes": sizes["sync_save"],
                  "file_size_bytes_by_variant": sizes,
                  "repeats": repeats, "warmup": 1, "keep_last": 2},
        "samples_s": samples,
        "medians_s": medians,
        "min_s": {name: min(values) for name, values in samples.items()},
        "max_s": {name: max(values) for name, values in samples.items()},
        "ratios": ratios,
        "goals": GOALS,
        "goals_met": {name: ratios[name] < bound for name, bound in GOALS.items()},
    }


def cpu_model() -> str:
    """The "model name" line of /proc/cpuinfo, or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def plot(results: dict[str, Any], path: Path) -> None:
    """Bar chart of the medians with min-max error bars; the ratios in the title."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install matplotlib") from None
    names = [*TIMINGS, "async_total_s"]
    medians = [results["medians_s"][n] for n in names]
    below = [m - results["min_s"][n] for m, n in zip(medians, names)]
    above = [results["max_s"][n] - m for m, n in zip(medians, names)]
    colors = ["#9e9e9e", "#616161", "#1f77b4", "#2ca02c", "#a6d8a6"]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    bars = ax.bar(range(len(names)), medians, yerr=[below, above], capsize=6, color=colors,
                  edgecolor="black", linewidth=0.6)
    bars[-1].set_hatch("//")
    goals, medians_s = results["goals"], results["medians_s"]
    goal_lines = {"sync_save_s": goals["ckpt_save_ratio"] * medians_s["raw_torch_save_fsync_s"],
                  "async_blocking_s": goals["async_blocking_fraction"] * medians_s["sync_save_s"]}
    for name, limit in goal_lines.items():
        center = names.index(name)
        ax.hlines(limit, center - 0.45, center + 0.45, colors="red", linestyles="--", linewidth=1.5,
                  label="goal (upper bound)" if name == "sync_save_s" else None)
    for name, bar, median in zip(names, bars, medians):
        top = max(results["max_s"][name], goal_lines.get(name, 0.0))
        ax.annotate(f"{median * 1000:.0f} ms", (bar.get_x() + bar.get_width() / 2, top),
                    xytext=(0, 5), textcoords="offset points", ha="center", va="bottom", fontsize=10)
    ax.legend(loc="upper left", fontsize=9)
    ax.set_xticks(range(len(names)), [LABELS[n] for n in names], fontsize=10)
    ax.set_ylabel("seconds (median, bars: min to max)", fontsize=11)
    ax.set_ylim(0, max(results["max_s"].values()) * 1.18)
    ratios, setup = results["ratios"], results["setup"]
    ax.set_title(
        f"Checkpoint save, {setup['file_size_bytes'] / 1e6:.0f} MB file, "
        f"{setup['repeats']} interleaved repeats\n"
        f"sync / raw+fsync = {ratios['ckpt_save_ratio']:.2f} (goal < {goals['ckpt_save_ratio']}), "
        f"sync / raw = {ratios['ckpt_save_ratio_vs_no_fsync']:.2f}, "
        f"async blocked / sync = {ratios['async_blocking_fraction']:.2f} "
        f"(goal < {goals['async_blocking_fraction']})", fontsize=11)
    machine = results["machine"]
    fig.text(0.01, 0.01, f"{machine['cpu_cores']}-core {machine['cpu_model']}, torch "
                         f"{machine['torch']}, {results['timestamp_utc']}", fontsize=8, color="gray")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the benchmark, write the JSON and the PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions (default 7)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="output directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    results = run(args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "checkpoint_save.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "checkpoint_save.png")
    ratios, met = results["ratios"], results["goals_met"]
    for name, median in results["medians_s"].items():
        print(f"{name:24s} median {median:.3f} s")
    print(f"file size {results['setup']['file_size_bytes']} bytes")
    for name, value in ratios.items():
        goal = f" (goal < {GOALS[name]}: {'met' if met[name] else 'NOT met'})" if name in GOALS else ""
        print(f"{name:28s} {value:.3f}{goal}")
    print(f"wrote {args.out / 'checkpoint_save.json'} and {args.out / 'checkpoint_save.png'}")


if __name__ == "__main__":
    main()
