"""Gradient accumulation: all-reduces per optimizer step, and what ``no_sync`` saves.

Counting (``allreduce_per_optimizer_step``): a Trainer with ``train.grad_accum_steps=4``
at world size 2 trains a few optimizer steps with a DDP communication hook that records,
for every gradient all-reduce, the micro-batch whose backward pass launched it, the
bucket's index and its size; the hook then does what DDP's default does (average by
all-reduce). The first optimizer step is left out of the counts: DDP rebuilds its buckets
after the first iteration. With every gradient in one bucket the count must be exactly
1 per optimizer step, on the step's last micro-batch; a model whose gradients span B
buckets gets B, still all on the last micro-batch (one per bucket).

Timing: optimizer steps of 4 micro-batches, interleaved in blocks as in
``overhead.py`` (same models, data, optimizer and schedule, per-step start-to-start
intervals, shuffled order per round, warm-up round first):

* ``trainer``: ddp_train (the first 3 micro-batches under ``no_sync``);
* ``hand_no_sync``: the hand-written loop doing the same;
* ``hand_sync_every_micro``: the hand-written loop all-reducing on every micro-batch.

``no_sync_saving`` = 1 − median(hand_no_sync) / median(hand_sync_every_micro).
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common import (Workload, init_process_group, median, paired_bootstrap, rank_device,
                    shuffled_rounds, spawn_ranks, summarize, synchronize)
from loops import HandLoop, TrainerLoop

ACCUM = 4


def _count(workload: Workload, device: torch.device, output_dir: str, world_size: int,
           steps: int) -> dict[str, Any]:
    """Train ``steps`` optimizer steps with a counting comm hook; the records per step."""
    micro_batches = 0
    calls: list[dict[str, int]] = []

    def counting_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal micro_batches
        micro_batches += 1
        return torch.nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]),
                                                 targets.reshape(-1))

    # No annotations: DDP inspects them, and under ``from __future__ import annotations``
    # they are strings it does not recognise. (state: None, bucket: dist.GradBucket.)
    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]
        buffer = bucket.buffer()
        calls.append({"micro_batch": micro_batches, "bucket": bucket.index(),
                      "bytes": buffer.numel() * buffer.element_size()})
        work = dist.all_reduce(buffer.div_(world_size), async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    loop = TrainerLoop(workload, workload.build_dataset(world_size), device, output_dir,
                       f"count_{workload.name}", steps, [f"train.grad_accum_steps={ACCUM}"],
                       loss_fn=counting_loss)
    assert isinstance(loop.trainer.model, DistributedDataParallel)
    loop.trainer.model.register_comm_hook(None, counting_hook)
    loop.run(steps)
    loop.close()
    assert micro_batches == steps * ACCUM
    per_step = []
    for step in range(1, steps):  # step 0: DDP rebuilds its buckets after it
        first, last = step * ACCUM + 1, (step + 1) * ACCUM
        mine = [c for c in calls if first <= c["micro_batch"] <= last]
        per_step.append({"allreduces": len(mine),
                         "buckets": len({c["bucket"] for c in mine}),
                         "on_last_micro_batch": all(c["micro_batch"] == last for c in mine),
                         "bucket_bytes": [c["bytes"] for c in mine]})
    return {"steps_counted": steps - 1, "micro_batches_per_step": ACCUM, "per_step": per_step}


def _time(workload: Workload, rank: int, world_size: int, device: torch.device, output_dir: str,
          steps_per_block: int, rounds: int) -> dict[str, Any]:
    dataset = workload.build_dataset(world_size)
    total = steps_per_block * (rounds + 1)
    loops: dict[str, HandLoop | TrainerLoop] = {
        "trainer": TrainerLoop(workload, dataset, device, output_dir, f"accum_{workload.name}", total,
                               [f"train.grad_accum_steps={ACCUM}"]),
        "hand_no_sync": HandLoop(workload, dataset, device, rank, world_size, total, accum=ACCUM,
                                 no_sync=True),
        "hand_sync_every_micro": HandLoop(workload, dataset, device, rank, world_size, total,
                                          accum=ACCUM, no_sync=False),
    }
    names = list(loops)
    intervals: dict[str, list[list[float]]] = {name: [] for name in names}
    for index, order in enumerate([names] + shuffled_rounds(names, rounds, seed=1)):
        for name in order:
            dist.barrier()
            synchronize(device)
            loops[name].run(steps_per_block)
            synchronize(device)
            if index > 0:
                intervals[name].append(loops[name].clock.intervals())
            else:
                loops[name].clock.intervals()
    for loop in loops.values():
        loop.close()
    return {"intervals_s": intervals, "steps_per_block": steps_per_block, "rounds": rounds}


def _rank_main(rank: int, world_size: int, device_type: str,
               plan: list[tuple[Workload, int, int]]) -> dict[str, Any] | None:
    device = rank_device(device_type, rank)
    init_process_group(rank, world_size, device)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ddp_bench_runs_") as tmp:
        for workload, steps_per_block, rounds in plan:
            results[workload.name] = {
                "count": _count(workload, device, tmp, world_size, steps=4),
                "timing": _time(workload, rank, world_size, device, tmp, steps_per_block, rounds)}
    dist.barrier()
    dist.destroy_process_group()
    return results if rank == 0 else None


def analyse(workload: Workload, raw: dict[str, Any]) -> dict[str, Any]:
    """Counts per optimizer step and the timing comparison."""
    per_step = raw["count"]["per_step"]
    allreduces = [s["allreduces"] for s in per_step]
    buckets = [s["buckets"] for s in per_step]
    intervals = raw["timing"]["intervals_s"]
    flat = {name: [x for block in rounds for x in block] for name, rounds in intervals.items()}
    med = {name: median(values) for name, values in flat.items()}

    def saving(a: list[float], b: list[float]) -> float:
        return 1 - median(a) / median(b)

    return {
        "workload": workload.describe(),
        "grad_accum_steps": ACCUM,
        "allreduce_per_optimizer_step": sum(allreduces) / len(allreduces),
        "buckets_per_optimizer_step": sum(buckets) / len(buckets),
        "allreduce_per_bucket_per_optimizer_step": sum(allreduces) / sum(buckets),
        "all_on_last_micro_batch": all(s["on_last_micro_batch"] for s in per_step),
        "bucket_bytes": per_step[-1]["bucket_bytes"],
        "count_records": per_step,
        "steps_per_block": raw["timing"]["steps_per_block"], "rounds": raw["timing"]["rounds"],
        "optimizer_step_s": {name: summarize(values) for name, values in flat.items()},
        "samples_s": intervals,
        "no_sync_saving": 1 - med["hand_no_sync"] / med["hand_sync_every_micro"],
        "no_sync_saving_ci95": list(paired_bootstrap(intervals["hand_no_sync"],
                                                     intervals["hand_sync_every_micro"], saving)),
        "trainer_vs_hand_no_sync": med["trainer"] / med["hand_no_sync"],
        "trainer_vs_hand_sync_every_micro": med["trainer"] / med["hand_sync_every_micro"],
    }


def run(workloads: list[tuple[Workload, int, int]], device_type: str = "cpu",
        world_size: int = 2) -> dict[str, Any]:
    """Count and time every ``(workload, steps_per_block, rounds)``; the results by name."""
    raw = spawn_ranks(_rank_main, world_size, device_type, workloads)[0]
    return {workload.name: analyse(workload, raw[workload.name]) for workload, _, _ in workloads}
