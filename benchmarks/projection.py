"""Projected DDP efficiency at scale, from an all-reduce cost model checked against CPU points.

The model (one optimizer step of data-parallel training, weak scaling: the per-GPU batch is
fixed, so the compute per step does not change with N):

* compute: forward F, backward B, optimizer O per step;
* gradients (4 bytes per parameter: DDP reduces them in the parameters' dtype, fp32 also
  under bf16 autocast) are all-reduced in buckets of ``BUCKET_BYTES`` (DDP's default
  25 MiB), in the order the backward pass finishes them; bucket k becomes ready once its
  share of the gradient bytes has been computed (backward progresses evenly over the
  bytes), and the all-reduces run one after another on one channel;
* one all-reduce of S bytes on N ranks costs 2(N−1)/N · S / busbw (a ring: every byte
  crosses every rank's link twice) plus a latency of α · 2⌈log₂N⌉ (NCCL's tree/ring
  selection keeps the latency term logarithmic at scale; a flat ring would pay 2(N−1)α);
* step(N) = F + B + max(0, end of the last all-reduce − B) + O: communication hides under
  the backward pass except what is left when the backward pass ends;
* efficiency(N) = step(1) / step(N).

For the projection the compute comes from a stated GPU throughput assumption
(``GPU``: an H100 SXM at 40% MFU, ``training_flops_per_sample`` = 6 × parameters per
token, a fixed number of tokens per GPU per step; B = 2/3 and F = 1/3 of it, O neglected)
and the link from ``LINKS``. For the check, the same model is fed with what was measured
here: the single-rank step time and its forward/backward/optimizer split, the gradient
bucket sizes DDP used, and the measured all-reduce times (gloo on CPU); it predicts world
size 2's efficiency, which is compared with the measured weak-scaling efficiency. Two things the
GPU model does not have are measured here too: cores that slow down when both compute
(``concurrency_factor``), and an all-reduce that runs on the same cores as the compute
(so overlap is not free: the overlapped and the non-overlapped prediction are both given).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from bandwidth import allreduce_time
from ddp_train.observability.system_metrics import PEAK_FLOPS

BUCKET_BYTES = 25 * 2**20
"""DDP's default bucket size (``dist.bucket_cap_mb=25``)."""
LINKS: dict[str, dict[str, float]] = {
    "NVLink4 (450 GB/s)": {"busbw": 450e9, "alpha": 2e-6},
    "InfiniBand NDR (50 GB/s)": {"busbw": 50e9, "alpha": 5e-6},
    "Ethernet 100 Gb/s (12.5 GB/s)": {"busbw": 12.5e9, "alpha": 25e-6},
}
"""Per-GPU bus bandwidth and per-hop latency. NVLink4: an H100's 900 GB/s bidirectional, i.e.
450 GB/s each way (NVLink at every N is a single NVLink domain; beyond one node that needs
an NVLink switch system, otherwise the node-to-node link bounds the ring). NDR: 400 Gb/s
= 50 GB/s per GPU (one NIC per GPU). Ethernet: 100 Gb/s = 12.5 GB/s per GPU. The α are
typical orders of magnitude, not measurements."""
MODEL_SIZES: dict[str, float] = {"10M": 10e6, "100M": 100e6, "1B": 1e9}
GPU: dict[str, float] = {"peak_flops": PEAK_FLOPS["H100"], "mfu": 0.40,
                         "tokens_per_gpu_step": 16 * 2048}
"""H100 SXM dense bf16 peak (ddp_train's table), 40% MFU, 16 sequences × 2048 tokens per GPU
per optimizer step."""
N_MARKED: tuple[int, ...] = (8, 64, 512)
N_CURVE: tuple[int, ...] = tuple(2**k for k in range(1, 11))


def ring_allreduce(busbw: float, alpha: float, ranks: int) -> Callable[[float], float]:
    """Seconds of one all-reduce of S bytes on ``ranks`` ranks (see the module docstring)."""
    def cost(size: float) -> float:
        return 2 * (ranks - 1) / ranks * size / busbw + alpha * 2 * math.ceil(math.log2(ranks))
    return cost


def buckets(gradient_bytes: float, bucket_bytes: float = BUCKET_BYTES) -> list[float]:
    """Bucket sizes in the order they are reduced (full buckets, the remainder last)."""
    full = int(gradient_bytes // bucket_bytes)
    rest = gradient_bytes - full * bucket_bytes
    return [bucket_bytes] * full + ([rest] if rest > 0 else [])


def step_time(forward: float, backward: float, optimizer: float, bucket_sizes: list[float],
              allreduce: Callable[[float], float], overlap: bool = True) -> float:
    """One step: compute plus the communication the backward pass does not hide."""
    total = sum(bucket_sizes)
    done = comm_end = 0.0
    for size in bucket_sizes:
        done += size
        ready = backward * done / total if overlap else backward
        comm_end = max(comm_end, ready) + allreduce(size)
    return forward + backward + max(0.0, comm_end - backward) + optimizer


def gpu_compute(parameters: float) -> dict[str, float]:
    """Forward and backward seconds per step on the assumed GPU."""
    flops = 6 * parameters * GPU["tokens_per_gpu_step"]
    seconds = flops / (GPU["mfu"] * GPU["peak_flops"])
    return {"forward": seconds / 3, "backward": 2 * seconds / 3, "optimizer": 0.0}


def project() -> dict[str, Any]:
    """Efficiency for every model size × link at ``N_CURVE`` (``N_MARKED`` included)."""
    lines = []
    for model, parameters in MODEL_SIZES.items():
        compute = gpu_compute(parameters)
        grads = buckets(4 * parameters)
        single = compute["forward"] + compute["backward"] + compute["optimizer"]
        for link, spec in LINKS.items():
            efficiency = {}
            for ranks in N_CURVE:
                cost = ring_allreduce(spec["busbw"], spec["alpha"], ranks)
                efficiency[ranks] = single / step_time(compute["forward"], compute["backward"],
                                                       compute["optimizer"], grads, cost)
            lines.append({"model": model, "parameters": parameters, "link": link,
                          "compute_s": single, "gradient_bytes": 4 * parameters,
                          "comm_s_at_512": sum(ring_allreduce(spec["busbw"], spec["alpha"], 512)(b)
                                               for b in grads),
                          "efficiency": efficiency,
                          "efficiency_marked": {n: efficiency[n] for n in N_MARKED}})
    return {"assumptions": {"gpu": GPU, "links": LINKS, "bucket_bytes": BUCKET_BYTES,
                            "gradient_bytes_per_parameter": 4,
                            "backward_share_of_compute": 2 / 3, "optimizer_time": 0.0},
            "lines": lines}


def check_ws2(scaling: dict[str, Any], bandwidth: dict[str, Any], bucket_bytes: list[int]
              ) -> dict[str, Any]:
    """The model at world size 2 with this machine's measurements, against the measured point.

    Inputs: the Trainer's median single-rank step, split in the proportions of the plain
    step's forward/backward/optimizer times; ``bucket_bytes``, the sizes of the buckets
    DDP reduced per step for the workload (from the accumulation benchmark's comm hook),
    in the order it reduced them; the measured all-reduce times (gloo on CPU) interpolated
    at those sizes.
    ``compute_only`` scales the compute by the measured ``concurrency_factor`` (2
    processes computing at once on this machine's cores, without communicating) and adds
    no communication; ``overlapped``/``not_overlapped`` add the all-reduces as the model
    does (with one bucket the two coincide: nothing is ready before backward ends).
    """
    base = scaling["workload"]["batch_size_per_rank"]
    single = scaling["runs"][f"ws1_batch{base}"]["step_s"]["median"]
    phases = {key: value["median"] for key, value in scaling["phases_s"].items()}
    plain = sum(phases.values())
    factor = scaling["concurrency_factor"]
    forward, backward, optimizer = (single * factor * phases[key] / plain
                                    for key in ("forward_s", "backward_s", "optimizer_s"))

    def measured(size: float) -> float:
        return allreduce_time(bandwidth, size)

    sizes = [float(b) for b in bucket_bytes]
    predicted = {"compute_only": {"step_s": single * factor, "efficiency": 1 / factor}}
    for overlap in (True, False):
        step = step_time(forward, backward, optimizer, sizes, measured, overlap)
        predicted["overlapped" if overlap else "not_overlapped"] = {
            "step_s": step, "efficiency": single / step}
    measured_step = scaling["runs"][f"ws2_batch{base}"]["step_s"]["median"]
    plain_ws2 = scaling["plain_step_s"]["ws2"]
    return {"world_size": 2, "backend": bandwidth["backend"], "single_rank_step_s": single,
            "phase_split_s": phases,
            "concurrency_factor": factor, "bucket_bytes": bucket_bytes,
            "allreduce_s": [measured(b) for b in sizes], "predicted": predicted,
            "measured": {"step_s": measured_step, "efficiency": scaling["weak_efficiency"]},
            # Where the difference lies: the all-reduce as DDP runs it in a plain step
            # (plain DDP step − plain step, both with 2 ranks computing), against alone.
            "ddp_cost_in_plain_step_s": scaling["plain_ddp_step_s"] - plain_ws2,
            "allreduce_alone_s": sum(measured(b) for b in sizes)}
