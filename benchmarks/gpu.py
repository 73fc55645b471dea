"""GPU throughput of ddp_train: a GPT-2-small-shaped model in bf16, with and without torch.compile.

What is measured (``--device cuda`` only), each mode in its own freshly spawned process on
``cuda:0`` (world size 1, no DDP): the real ``Trainer`` (``train.precision=bf16``,
``train.compile`` false or true, AdamW, other settings as in ``common.trainer_overrides``)
trains ``warmup`` steps (compilation included), then ``steps`` timed steps. The step time
is the start-to-start interval of optimizer steps (``common.StepClock``); every ddp_train
step ends with a host synchronisation (the finiteness check), so the intervals are GPU
time, not launch time.

* tokens/s = batch × block_size / median step;
* MFU = ``training_flops_per_sample`` (6 × parameters per token, ddp_train's own
  estimate) × samples/s / ``peak_flops(device)`` (ddp_train's table of dense bf16 peaks);
  ``mfu_with_attention`` adds the attention's 12 × layers × width × sequence FLOPs per
  token (PaLM's accounting);
* peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps (after
  ``reset_peak_memory_stats``), in GiB;
* ``warmup_s``: the wall time of the warm-up steps, where compilation happens.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any

import torch

from common import GPU_GPT, Workload, median, spawn_ranks, summarize
from loops import TrainerLoop
from ddp_train.observability.system_metrics import peak_flops, training_flops_per_sample


def require_cuda() -> None:
    """Raise a clear error when there is no usable CUDA device."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device cuda needs a CUDA GPU, but torch {torch.__version__} sees none "
                           f"(CUDA build: {torch.version.cuda or 'no, a CPU-only build'})")


def _rank_main(rank: int, world_size: int, workload: Workload, compile_model: bool, warmup: int,
               steps: int) -> dict[str, Any]:
    device = torch.device("cuda", 0)
    with tempfile.TemporaryDirectory(prefix="ddp_bench_runs_") as tmp:
        loop = TrainerLoop(workload, workload.build_dataset(world_size=1), device, tmp,
                           f"gpu_compile_{compile_model}", warmup + steps,
                           [f"train.compile={str(compile_model).lower()}"])
        start = time.perf_counter()
        loop.run(warmup)
        torch.cuda.synchronize(device)
        warmup_s = time.perf_counter() - start
        loop.clock.intervals()
        torch.cuda.reset_peak_memory_stats(device)
        loop.run(steps)
        torch.cuda.synchronize(device)
        intervals = loop.clock.intervals()
        peak_bytes = torch.cuda.max_memory_allocated(device)
        parameters = sum(p.numel() for p in loop.trainer.module.parameters())
        loop.close()
    return {"intervals_s": intervals, "warmup_s": warmup_s, "peak_memory_bytes": peak_bytes,
            "parameters": parameters, "device_name": torch.cuda.get_device_name(device),
            "peak_flops": peak_flops(device)}


def run(steps: int, warmup: int, batch_size: int = GPU_GPT.batch_size) -> dict[str, Any]:
    """Both modes; tokens/s, MFU and peak memory of each."""
    require_cuda()
    workload = dataclasses.replace(GPU_GPT, batch_size=batch_size)
    args = workload.model_args
    tokens = args["block_size"]
    attention_flops = 12 * args["n_layer"] * args["n_embd"] * tokens  # per token, fwd + bwd
    modes: dict[str, Any] = {}
    for compile_model in (False, True):
        raw = spawn_ranks(_rank_main, 1, workload, compile_model, warmup, steps)[0]
        step = median(raw["intervals_s"])
        samples_per_s = batch_size / step
        flops_per_sample = training_flops_per_sample(raw["parameters"], tokens)
        peak = raw["peak_flops"]
        modes["compile" if compile_model else "eager"] = {
            "step_s": summarize(raw["intervals_s"]), "samples_s": raw["intervals_s"],
            "tokens_per_s": samples_per_s * tokens,
            "mfu": flops_per_sample * samples_per_s / peak if peak else None,
            "mfu_with_attention": ((flops_per_sample + attention_flops * tokens) * samples_per_s / peak
                                   if peak else None),
            "peak_memory_gib": raw["peak_memory_bytes"] / 2**30,
            "warmup_s": raw["warmup_s"], "device_name": raw["device_name"], "peak_flops": peak}
    return {"workload": {**workload.describe(), "precision": "bf16"}, "steps": steps,
            "warmup": warmup, "modes": modes,
            "compile_speedup": (modes["eager"]["step_s"]["median"]
                                / modes["compile"]["step_s"]["median"])}
