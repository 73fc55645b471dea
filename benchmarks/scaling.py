"""Throughput of ddp_train at world size 1 and 2: strong and weak scaling efficiency.

What is measured: the mid-size GPT (``common.MID``) trained by the real ``Trainer``
(``fit()`` in blocks, per-step start-to-start intervals, see ``overhead.py``) in freshly
spawned ranks, one intra-op thread per rank:

* world size 1 (no DDP: ``train.strategy=auto``), per-rank batch B and 2B, the trainers
  interleaved block by block in one process;
* world size 2 (DDP over gloo), per-rank batch B;
* the same three runs with ``train.strategy=fsdp`` (one FSDP unit per transformer block,
  then the root; at world size 1 in a 1-rank group, where nothing is sharded but FSDP's
  machinery runs), interleaved with the DDP ones in the same processes.

Throughput = global batch / median step time (samples/s; tokens/s = samples/s × 64).

* strong scaling (same global batch 2B): efficiency = throughput(2 ranks × B) /
  (2 × throughput(1 rank × 2B));
* weak scaling (same per-rank batch B): efficiency = throughput(2 ranks × B) /
  (2 × throughput(1 rank × B)).

FSDP's efficiencies are taken against its own world-size-1 runs (the same code path);
``fsdp.vs_ddp`` gives its throughput against DDP's at the same world size and batch.

On this 2-core machine world size 2 uses both cores while world size 1 leaves one idle,
and gloo's communication threads compete with the compute for those same two cores (on
GPUs the all-reduce runs on the NIC/NVLink and the GPU's copy engines instead): the CPU
efficiency is a lower bound of the loop's, and anything else running on the machine
shows up here first. The world sizes cannot be interleaved in one process, so the
spawns alternate (1, 2, 1, 2, ...) over ``repeats`` and the samples are pooled.

Every process then also times a plain step (no DDP, hand-written, batch B), split into
forward + loss, backward and optimizer: at world size 1 the compute inputs of the
projection; at world size 2, with both ranks computing at once but not communicating,
``concurrency_factor`` = plain step with n processes at once / alone, which is how much
of the lost efficiency is the cores' (caches, memory bandwidth, the host) rather than
DDP's. The ranks of world size n then time the same plain step with the model wrapped in
DDP (``plain_ddp_step_s``): what DDP's all-reduce costs inside a real step on this
machine, next to the all-reduce timed alone (``bandwidth.py``).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from common import (MID, Workload, init_process_group, median, rank_device,
                    spawn_ranks, summarize, synchronize)
from loops import TrainerLoop

STRATEGIES = ("auto", "fsdp")
"""``auto``: no wrapper at world size 1, DDP above; ``fsdp``: FSDP2 at every world size."""


def _phase_split(workload: Workload, device: torch.device, steps: int, ddp: bool = False
                 ) -> dict[str, list[float]]:
    """Forward+loss, backward, optimizer (step + zero_grad) times of a plain hand-written step.

    With ``ddp`` the model is wrapped in DDP (the process group must exist): the backward
    time then includes the gradient all-reduce as DDP runs it.
    """
    model = workload.build_model().to(device)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None
                                  ) if ddp else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    all_inputs, all_targets = workload.build_dataset(world_size=1).tensors
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())
    phases: dict[str, list[float]] = {"forward_s": [], "backward_s": [], "optimizer_s": []}
    batches = len(all_inputs) // workload.batch_size
    for step in range(steps + 2):  # two warm-up steps
        rows = slice(step % batches * workload.batch_size, (step % batches + 1) * workload.batch_size)
        inputs, targets = all_inputs[rows].to(device), all_targets[rows].to(device)
        synchronize(device)
        t0 = time.perf_counter()
        with autocast:
            outputs = net(inputs)
            loss = torch.nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]),
                                                     targets.reshape(-1))
        synchronize(device)
        t1 = time.perf_counter()
        loss.backward()
        synchronize(device)
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        t3 = time.perf_counter()
        if step >= 2:
            phases["forward_s"].append(t1 - t0)
            phases["backward_s"].append(t2 - t1)
            phases["optimizer_s"].append(t3 - t2)
    del net  # DDP's reducer goes while the process group lives
    return phases


def _rank_main(rank: int, world_size: int, device_type: str, batches: list[int], steps_per_block: int,
               blocks: int) -> dict[str, Any] | None:
    device = rank_device(device_type, rank)
    # FSDP needs a process group even at world size 1; without DDP (strategy auto at
    # world size 1) the group is never used by the other trainers.
    init_process_group(rank, world_size, device)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ddp_bench_runs_") as tmp:
        loops = {}
        for strategy in STRATEGIES:
            for batch in batches:
                workload = dataclasses.replace(MID, batch_size=batch)
                loops[strategy, batch] = TrainerLoop(
                    workload, workload.build_dataset(world_size), device, tmp,
                    f"scaling_{strategy}_{world_size}x{batch}", steps_per_block * (blocks + 1),
                    overrides=[f"train.strategy={strategy}"])
        intervals: dict[tuple[str, int], list[float]] = {key: [] for key in loops}
        for block in range(blocks + 1):  # block 0 warms up
            for key in list(loops) if block % 2 else list(reversed(loops)):
                loop = loops[key]
                synchronize(device)
                loop.run(steps_per_block)
                synchronize(device)
                steps = loop.clock.intervals()
                if block > 0:
                    intervals[key] += steps
        for loop in loops.values():
            loop.close()
        results["intervals_s"] = intervals
    if world_size > 1:
        torch.distributed.barrier()  # every rank starts its plain steps together
    results["phases"] = _phase_split(MID, device, steps=3 * steps_per_block)
    if world_size > 1:
        results["ddp_phases"] = _phase_split(MID, device, steps=3 * steps_per_block, ddp=True)
    torch.distributed.destroy_process_group()
    return results if rank == 0 else None


def _runs(samples: dict[str, list[float]]) -> dict[str, Any]:
    """Per ``ws{N}_batch{B}`` key: median step, throughput in samples/s and tokens/s."""
    tokens = MID.model_args["block_size"]
    runs: dict[str, Any] = {}
    for key, values in samples.items():
        world_size, batch = (int(x) for x in key[2:].split("_batch"))
        step = median(values)
        runs[key] = {"world_size": world_size, "batch_per_rank": batch,
                     "global_batch": world_size * batch, "step_s": summarize(values),
                     "samples_per_s": world_size * batch / step,
                     "tokens_per_s": world_size * batch * tokens / step}
    return runs


def run(device_type: str = "cpu", max_world_size: int = 2, steps_per_block: int = 8,
        blocks: int = 4, repeats: int = 1) -> dict[str, Any]:
    """Throughput at world sizes 1..max_world_size (alternating spawns); efficiencies."""
    base = MID.batch_size
    samples: dict[str, dict[str, list[float]]] = {strategy: {} for strategy in STRATEGIES}
    phases: dict[int, dict[str, list[float]]] = {}
    ddp_phases: dict[str, list[float]] = {}
    world_sizes = [1] + ([max_world_size] if max_world_size > 1 else [])
    for _ in range(repeats):
        for world_size in world_sizes:
            batches = sorted({base, base * max_world_size}) if world_size == 1 else [base]
            result = spawn_ranks(_rank_main, world_size, device_type, batches, steps_per_block,
                                 blocks)[0]
            for (strategy, batch), values in result["intervals_s"].items():
                samples[strategy].setdefault(f"ws{world_size}_batch{batch}", []).extend(values)
            for key, values in result["phases"].items():
                phases.setdefault(world_size, {}).setdefault(key, []).extend(values)
            for key, values in result.get("ddp_phases", {}).items():
                ddp_phases.setdefault(key, []).extend(values)
    runs = _runs(samples["auto"])
    fsdp_runs = _runs(samples["fsdp"])
    results: dict[str, Any] = {
        "workload": MID.describe(), "device": device_type, "steps_per_block": steps_per_block,
        "blocks": blocks, "repeats": repeats, "runs": runs, "samples_s": samples["auto"],
        "phases_s": {key: summarize(values) for key, values in phases[1].items()},
        "phases_samples_s": phases[1],
        "fsdp": {"runs": fsdp_runs, "samples_s": samples["fsdp"],
                 "vs_ddp": {key: run["samples_per_s"] / runs[key]["samples_per_s"]
                            for key, run in fsdp_runs.items()}},
    }
    if max_world_size > 1:
        n = max_world_size
        fsdp_multi = fsdp_runs[f"ws{n}_batch{base}"]["samples_per_s"]
        results["fsdp"]["strong_efficiency"] = fsdp_multi / (
            n * fsdp_runs[f"ws1_batch{base * n}"]["samples_per_s"])
        results["fsdp"]["weak_efficiency"] = fsdp_multi / (n * fsdp_runs[f"ws1_batch{base}"]["samples_per_s"])
        multi = runs[f"ws{n}_batch{base}"]["samples_per_s"]
        plain = {ws: median([sum(step) for step in zip(*phases[ws].values())]) for ws in phases}
        # Compute alone slows down when every core computes (shared caches, memory
        # bandwidth, the host's scheduling): the same plain step, 1 process vs n at once.
        results["concurrency_factor"] = plain[n] / plain[1]
        results["plain_step_s"] = {f"ws{ws}": value for ws, value in plain.items()}
        # The same plain step under DDP at world size n: what DDP's all-reduce (and its
        # reducer) really add per step here, next to the all-reduce measured alone.
        results["plain_ddp_step_s"] = median([sum(step) for step in zip(*ddp_phases.values())])
        results["plain_ddp_phases_s"] = {key: summarize(values) for key, values in ddp_phases.items()}
        results["plain_ddp_phases_samples_s"] = ddp_phases
        results["strong_efficiency"] = multi / (n * runs[f"ws1_batch{base * n}"]["samples_per_s"])
        results["weak_efficiency"] = multi / (n * runs[f"ws1_batch{base}"]["samples_per_s"])
        if device_type == "cpu":
            results["note"] = (f"{n} ranks of 1 thread each on {os.cpu_count()} CPU cores: the ranks "
                               "and gloo's threads compete for the cores; world size 1 leaves "
                               "cores idle")
    return results
