"""All-reduce latency and bandwidth of the process group's backend on this machine.

What is measured: in 2 spawned ranks (one intra-op thread each; gloo on CPU, NCCL on
CUDA), ``dist.all_reduce`` (sum) of float32 tensors of several sizes, each call timed
alone after a barrier, after 2 untimed calls per size; medians per size.

algbw = bytes / time; busbw = algbw × 2(N−1)/N, NCCL's convention, which makes the bus
bandwidth the per-rank link rate a ring all-reduce achieves, independent of N (for N = 2
the factor is 1). These medians feed the projection's check against the CPU points.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from common import init_process_group, median, rank_device, spawn_ranks, summarize, synchronize

SIZES_BYTES: tuple[int, ...] = (4, 4 * 2**10, 64 * 2**10, 2**20, 4 * 2**20, 16 * 2**20, 64 * 2**20)
"""Message sizes: 1 float (latency), then 4 KiB to 64 MiB (DDP's default bucket is 25 MiB)."""


def _rank_main(rank: int, world_size: int, device_type: str, repeats: int
               ) -> dict[int, list[float]] | None:
    device = rank_device(device_type, rank)
    init_process_group(rank, world_size, device)
    samples: dict[int, list[float]] = {}
    for size in SIZES_BYTES:
        tensor = torch.ones(size // 4, device=device)
        times = []
        for index in range(repeats + 2):
            dist.barrier()
            synchronize(device)
            start = time.perf_counter()
            dist.all_reduce(tensor)
            synchronize(device)
            if index >= 2:
                times.append(time.perf_counter() - start)
        samples[size] = times
    dist.destroy_process_group()
    return samples if rank == 0 else None


def run(device_type: str = "cpu", world_size: int = 2, repeats: int = 10) -> dict[str, Any]:
    """Median time, algbw and busbw per message size."""
    samples = spawn_ranks(_rank_main, world_size, device_type, repeats)[0]
    factor = 2 * (world_size - 1) / world_size
    sizes = []
    for size, times in samples.items():
        seconds = median(times)
        sizes.append({"bytes": size, "time_s": summarize(times), "algbw_gb_s": size / seconds / 1e9,
                      "busbw_gb_s": size * factor / seconds / 1e9})
    return {"backend": "nccl" if device_type == "cuda" else "gloo", "world_size": world_size,
            "repeats": repeats, "sizes": sizes,
            "latency_s": median(samples[SIZES_BYTES[0]]),
            "peak_busbw_gb_s": max(s["busbw_gb_s"] for s in sizes),
            "samples_s": {str(size): times for size, times in samples.items()}}


def allreduce_time(measured: dict[str, Any], size_bytes: float) -> float:
    """Time of one all-reduce of ``size_bytes`` on the measured machine.

    Piecewise-linear interpolation of the measured medians in size (beyond the largest
    size: that size's time scaled by the bytes).
    """
    points = sorted((s["bytes"], s["time_s"]["median"]) for s in measured["sizes"])
    if size_bytes <= points[0][0]:
        return points[0][1]
    for (b0, t0), (b1, t1) in zip(points, points[1:]):
        if size_bytes <= b1:
            return t0 + (t1 - t0) * (size_bytes - b0) / (b1 - b0)
    b_last, t_last = points[-1]
    return t_last * size_bytes / b_last
