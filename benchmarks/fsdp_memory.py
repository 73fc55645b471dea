"""Benchmark: per-rank memory and step time of DDP vs FSDP, world size 1 and 2.

What is measured: the mid-size GPT (``common.MID``, 0.44 M parameters, 8 × 64 tokens per
rank) trained by the real ``Trainer`` with ``train.strategy=ddp`` and with
``train.strategy=fsdp`` (one FSDP unit per transformer block, then the root), AdamW,
fp32, in freshly spawned ranks (gloo on CPU, one intra-op thread per rank):

* ``bytes`` per rank: the parameters, the gradients (read when ``optimizer.step`` is
  called, i.e. at their largest) and the optimizer state that rank holds, counted from
  the tensors themselves: the local shard of a sharded (DTensor) tensor, the whole
  tensor otherwise. This is the memory that sharding divides; activations and the
  temporarily gathered parameters of the unit being computed are not included (they do
  not depend on the strategy, or are bounded by one unit).
* ``step_s``: start-to-start time of each optimizer step (``common.StepClock``, a callback
  of the trainer's), data loading included.

Fairness: both trainers get the same model (same seed), data, per-rank batch and
schedule; they live in the same processes, share one process group, and run
alternately in blocks of ``steps_per_block`` steps (the first block of each is warm-up),
the order flipping every block, so drift of a shared machine hits both alike. The world
sizes cannot share a process: their spawns alternate over ``repeats``.

On this CPU machine gloo's collectives run on the same two cores as the compute, so
FSDP's extra communication (an all-gather of every unit in forward and backward, a
reduce-scatter in place of the all-reduce) shows at full price; times are ratios, not
GPU predictions. Run: ``python benchmarks/fsdp_memory.py [--repeats N] [--out DIR]``;
writes ``fsdp_memory.json`` and ``fsdp_memory.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from common import CpuWatch, MID, init_process_group, machine_info, spawn_ranks, summarize, wait_for_quiet
from loops import TrainerLoop

from ddp_train.distributed.fsdp import held_bytes, local_tensor

STRATEGIES = ("ddp", "fsdp")


def _count_gradients(loop: TrainerLoop, into: dict[str, int]) -> None:
    """Record the gradient bytes this rank holds each time the optimizer steps."""
    module = loop.trainer.module

    def count(*_: Any) -> None:
        into["gradients"] = max(into.get("gradients", 0), sum(
            local_tensor(p.grad).numel() * p.grad.element_size()
            for p in module.parameters() if p.grad is not None))

    loop.trainer.optimizer.register_step_pre_hook(count)


def _rank_main(rank: int, world_size: int, steps_per_block: int, blocks: int) -> dict[str, Any]:
    device = torch.device("cpu")
    init_process_group(rank, world_size, device)
    dataset = MID.build_dataset(world_size)
    total = steps_per_block * (blocks + 1)
    grads: dict[str, dict[str, int]] = {s: {} for s in STRATEGIES}
    intervals: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    with tempfile.TemporaryDirectory(prefix="ddp_bench_fsdp_") as tmp:
        loops = {s: TrainerLoop(MID, dataset, device, tmp, f"{s}_{world_size}", total,
                                [f"train.strategy={s}"]) for s in STRATEGIES}
        for strategy, loop in loops.items():
            _count_gradients(loop, grads[strategy])
        for block in range(blocks + 1):  # block 0 warms up
            for strategy in STRATEGIES if block % 2 else reversed(STRATEGIES):
                loop = loops[strategy]
                loop.run(steps_per_block)
                steps = loop.clock.intervals()
                if block > 0:
                    intervals[strategy] += steps
        memory = {s: {**held_bytes(loops[s].trainer.module, loops[s].trainer.optimizer), **grads[s]}
                  for s in STRATEGIES}
        for loop in loops.values():
            loop.close()
    torch.distributed.destroy_process_group()
    return {"bytes": memory, "intervals_s": intervals}


def run(repeats: int = 2, steps_per_block: int = 8, blocks: int = 4) -> dict[str, Any]:
    """Bytes per rank and step times of both strategies at world sizes 1 and 2."""
    samples: dict[str, list[float]] = {}
    memory: dict[str, list[dict[str, int]]] = {}
    quiet = wait_for_quiet(max_load=None, max_busy=0.5, max_wait_s=120)
    with CpuWatch() as watch:
        for _ in range(repeats):
            for world_size in (1, 2):
                for rank, result in enumerate(spawn_ranks(_rank_main, world_size, steps_per_block,
                                                          blocks)):
                    for strategy in STRATEGIES:
                        key = f"ws{world_size}_{strategy}"
                        if rank == 0:
                            samples.setdefault(key, []).extend(result["intervals_s"][strategy])
                        per_rank = memory.setdefault(key, [{}] * world_size)
                        per_rank[rank] = result["bytes"][strategy]
    runs: dict[str, Any] = {}
    for key, values in samples.items():
        per_rank = memory[key]
        largest = max(per_rank, key=lambda b: sum(b.values()))
        runs[key] = {"step_s": summarize(values), "bytes_per_rank": per_rank,
                     "max_bytes_per_rank": largest, "max_total_bytes_per_rank": sum(largest.values())}
    ratios = {}
    for world_size in (1, 2):
        fsdp, ddp = runs[f"ws{world_size}_fsdp"], runs[f"ws{world_size}_ddp"]
        ratios[f"ws{world_size}"] = {
            "memory_fsdp_over_ddp": fsdp["max_total_bytes_per_rank"] / ddp["max_total_bytes_per_rank"],
            "step_time_fsdp_over_ddp": fsdp["step_s"]["median"] / ddp["step_s"]["median"]}
    return {"machine": machine_info(), "workload": MID.describe(), "repeats": repeats,
            "steps_per_block": steps_per_block, "blocks": blocks, "runs": runs, "ratios": ratios,
            "samples_s": samples, "conditions": {"before": quiet, "during": watch.result},
            "note": (f"gloo on {os.cpu_count()} CPU cores, one thread per rank: communication "
                     "competes with compute for the cores, so FSDP's extra collectives cost "
                     "more here than on GPUs")}


def plot(results: dict[str, Any], path: Path) -> Path:
    """Stacked bytes per rank (left) and median step time with quartiles (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["ws1_ddp", "ws1_fsdp", "ws2_ddp", "ws2_fsdp"]
    labels = [k.replace("ws", "world size ").replace("_", "\n") for k in keys]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), dpi=110)
    bottom = [0.0] * len(keys)
    for part, color in (("parameters", "#1f77b4"), ("gradients", "#ff7f0e"),
                        ("optimizer_state", "#2ca02c")):
        values = [results["runs"][k]["max_bytes_per_rank"].get(part, 0) / 2**20 for k in keys]
        left.bar(labels, values, bottom=bottom, color=color, label=part.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    for ws in (1, 2):
        ratio = results["ratios"][f"ws{ws}"]["memory_fsdp_over_ddp"]
        left.text(2 * ws - 1, bottom[2 * ws - 1], f"×{ratio:.2f} of DDP", ha="center", va="bottom")
    left.set_ylabel("MiB per rank (largest rank)")
    left.set_title("parameters + gradients + optimizer state held per rank")
    left.legend()
    medians = [results["runs"][k]["step_s"]["median"] * 1e3 for k in keys]
    errors = [[m - results["runs"][k]["step_s"]["p25"] * 1e3 for k, m in zip(keys, medians)],
              [results["runs"][k]["step_s"]["p75"] * 1e3 - m for k, m in zip(keys, medians)]]
    right.bar(labels, medians, yerr=errors, capsize=4,
              color=["#7f7f7f", "#d62728", "#7f7f7f", "#d62728"])
    for ws in (1, 2):
        ratio = results["ratios"][f"ws{ws}"]["step_time_fsdp_over_ddp"]
        top = results["runs"][keys[2 * ws - 1]]["step_s"]["p75"] * 1e3  # above the error bar
        right.text(2 * ws - 1, top, f"×{ratio:.2f} of DDP", ha="center", va="bottom")
    right.set_ylabel("ms per optimizer step (median, bars: quartiles)")
    right.set_title(f"step time, {results['workload']['name']} (gloo, CPU)")
    machine = results["machine"]
    fig.text(0.01, 0.005, f"{machine['cpu_cores']}-core {machine['cpu_model']}, torch "
                          f"{machine['torch']}, {machine['timestamp_utc']}", fontsize=8, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    """Measure, then write the JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="spawns per world size")
    parser.add_argument("--steps-per-block", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=4, help="measured blocks per strategy and spawn")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    results = run(args.repeats, args.steps_per_block, args.blocks)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fsdp_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "fsdp_memory.png")
    for ws in (1, 2):
        ratio = results["ratios"][f"ws{ws}"]
        print(f"world size {ws}: FSDP/DDP bytes per rank {ratio['memory_fsdp_over_ddp']:.3f}, "
              f"median step time {ratio['step_time_fsdp_over_ddp']:.2f}")
    print(args.out / "fsdp_memory.json")


if __name__ == "__main__":
    main()
