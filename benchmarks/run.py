"""Run ddp_train's benchmark suite; write ``results/latest.json``, PNG charts and ``latest.md``.

```
PYTHONPATH=. python benchmarks/run.py [--quick] [--device cpu|cuda] [--only SECTION,...]
```

Sections (each module's docstring says what it measures and why the comparison is fair):

* ``overhead`` (``overhead.py``): ddp_train's step against a hand-written DDP loop, and
  what each of its per-step extras costs, for a tiny MLP and a mid-size GPT;
* ``accumulation`` (``accumulation.py``): all-reduces per optimizer step with
  ``grad_accum_steps=4`` and the time ``no_sync`` saves;
* ``checkpoint`` (``checkpoint_save.py``): ``FileCheckpointStore.save`` against a durable
  ``torch.save``, and the blocking time of an async save;
* ``scaling`` (``scaling.py``): throughput at world size 1 and 2, DDP and FSDP, strong/weak
  efficiency;
* ``fsdp_memory`` (``fsdp_memory.py``): per-rank parameter, gradient and optimizer bytes and
  step time, DDP against FSDP, at world size 1 and 2;
* ``bandwidth`` (``bandwidth.py``): all-reduce latency and bus bandwidth;
* ``startup`` (``startup.py``): time to the first optimizer step against ``import torch``;
* ``projection`` (``projection.py``): projected DDP efficiency at N = 8, 64, 512, checked
  against the measured world-size-2 point (uses scaling, bandwidth and accumulation);
* ``peers`` (``peers.py``, CPU only): a Hugging Face causal LM trained by a hand-written DDP
  loop, ddp_train, Hugging Face's Trainer, Accelerate and Lightning: step times and ratios;
* ``gpu`` (``gpu.py``, ``--device cuda`` only): GPT in bf16, eager and compiled.

Before the suite, and again before every section, the script waits until the machine is
quiet (other processes and the host's other guests take < 0.15 cores, and at the start
the 1-minute load average is < 0.7); while each section runs it records how much CPU the
rest of the machine and the host took (``conditions`` in the JSON). A section disturbed
by more than 0.25 cores is run again (``--retries``, default 2) and the least disturbed
attempt is kept; one still disturbed is marked noisy.
``--only`` re-runs some sections and keeps the others from the existing ``latest.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("overhead", "accumulation", "checkpoint", "scaling", "fsdp_memory", "bandwidth",
            "startup", "projection", "peers", "gpu")
PLANS: dict[str, dict[str, Any]] = {
    # (steps per block, rounds) per workload; other sizes per section.
    # overhead: (steps per block, rounds, paired iterations) in each of overhead_replicas
    # fresh process pairs.
    "quick": {"overhead": {"tiny_mlp": (30, 4, 150), "mid_gpt": (6, 2, 10)}, "overhead_replicas": 3,
              "accumulation": {"tiny_mlp": (5, 4), "mid_gpt": (2, 3)},
              "checkpoint_repeats": 3,
              "scaling": {"steps_per_block": 6, "blocks": 4, "repeats": 1},
              "fsdp_memory": {"repeats": 1, "steps_per_block": 6, "blocks": 3},
              "bandwidth_repeats": 8, "startup_repeats": 3, "startup_torchrun": False,
              "peers": "quick",  # a plan of peers.PLANS
              "gpu": {"steps": 20, "warmup": 10}},
    "full": {"overhead": {"tiny_mlp": (40, 10, 400), "mid_gpt": (10, 5, 30)}, "overhead_replicas": 4,
             "accumulation": {"tiny_mlp": (10, 10), "mid_gpt": (4, 8)},
             "checkpoint_repeats": 15,
             "scaling": {"steps_per_block": 10, "blocks": 8, "repeats": 2},
             "fsdp_memory": {"repeats": 2, "steps_per_block": 8, "blocks": 4},
             "bandwidth_repeats": 20, "startup_repeats": 7, "startup_torchrun": True,
             "peers": "full",
             "gpu": {"steps": 50, "warmup": 15}},
}
QUIET_CORES = 0.15
"""A section starts once other processes and other guests take fewer cores than this."""
NOISY_CORES = 0.25
"""A section during which other processes and other guests (host steal) took more cores
than this is marked noisy and run again (``--retries``); the least disturbed run is kept."""


def _world_size(device: str) -> int:
    return min(2, torch.cuda.device_count()) if device == "cuda" else 2


def _workload_plan(plan: dict[str, tuple[int, ...]]) -> list[tuple[Any, ...]]:
    from common import MID, TINY
    workloads = {TINY.name: TINY, MID.name: MID}
    return [(workloads[name], *sizes) for name, sizes in plan.items()]


def run_overhead(plan: dict[str, Any], device: str, done: dict[str, Any]) -> dict[str, Any]:
    import overhead
    return overhead.run(_workload_plan(plan["overhead"]), device, _world_size(device),
                        plan["overhead_replicas"])


def run_accumulation(plan: dict[str, Any], device: str, done: dict[str, Any]) -> dict[str, Any]:
    import accumulation
    return accumulation.run(_workload_plan(plan["accumulation"]), device, _world_size(device))


def run_checkpoint(plan: dict[str, Any], device: str, done: dict[str, Any]) -> dict[str, Any]:
    import checkpoint_save
    return checkpoint_save.run(plan["checkpoint_repeats"])


def run_scaling(plan: dict[str, Any], device: str, done: dict[str, Any]) -> dict[str, Any]:
    import scaling
    return scaling.run(device, _world_size(device), **plan["scaling"])


def run_fsdp_memory(plan: dict[str, Any], device: str, done: dict[str, Any]) -> dict[str, Any]:
    import fsdp_memory
    if device != "cpu":
        return {"status": "not run: the FSDP memory section runs on CPU (gloo)"}
    return fsdp_memory.run(**plan["fsdp_memory"])


def run_bandwidth(plan: dict[str, Any], device: str, done: dict[str, Any]) -> dict[str, Any]:
    import bandwidth
    if _world_size(device) < 2:
        return {"status": "not available: needs 2 GPUs"}
    return bandwidth.run(device, 2, plan["bandwidth_repeats"])


def run_startup(plan: dict[str, Any], device: str, done: dict[str, Any]) -> dict[str, Any]:
    import startup
    return startup.run(plan["startup_repeats"], plan["startup_torchrun"])


def run_projection(plan: dict[str, Any], device: str, done: dict[str, Any]) -> dict[str, Any]:
    import projection
    result = projection.project()
    scaling, bandwidth, accumulation = (done.get(k, {}) for k in ("scaling", "bandwidth",
                                                                  "accumulation"))
    if "weak_efficiency" in scaling and "sizes" in bandwidth and "mid_gpt" in accumulation:
        result["check_ws2"] = projection.check_ws2(scaling, bandwidth,
                                                   accumulation["mid_gpt"]["bucket_bytes"])
    return result


def run_peers(plan: dict[str, Any], device: str, done: dict[str, Any]) -> dict[str, Any]:
    import peers
    if device != "cpu":
        return {"status": "not run: the peer comparison runs on CPU (gloo)"}
    return peers.run(**peers.PLANS[plan["peers"]])


def run_gpu(plan: dict[str, Any], device: str, done: dict[str, Any]) -> dict[str, Any]:
    import gpu
    if device != "cuda":
        return {"status": "not run: GPU mode needs --device cuda"}
    return gpu.run(**plan["gpu"])


RUNNERS: dict[str, Callable[[dict[str, Any], str, dict[str, Any]], dict[str, Any]]] = {
    "overhead": run_overhead, "accumulation": run_accumulation, "checkpoint": run_checkpoint,
    "scaling": run_scaling, "fsdp_memory": run_fsdp_memory, "bandwidth": run_bandwidth,
    "startup": run_startup,
    "projection": run_projection, "peers": run_peers, "gpu": run_gpu,
}


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The top-level keys: the numbers most worth a glance, and their goals.

    ``scaling`` is the section itself (it holds ``strong_efficiency``, ``weak_efficiency``,
    the throughput of every run and ``fsdp``).
    """
    out: dict[str, Any] = {}
    overhead = results.get("overhead", {})
    if overhead:
        out["overhead_ratio"] = {name: data["overhead_ratio"] for name, data in overhead.items()}
        out["overhead_goal"] = {name: data["goal"] for name, data in overhead.items()}
        out["overhead_goal_met"] = {name: data["goal_met"] for name, data in overhead.items()}
        out["overhead_goal_confirmed"] = {name: data["goal_confirmed"] for name, data in overhead.items()}
        out["overhead_ratio_paired"] = {name: data["overhead_ratio_paired"] for name, data in overhead.items()}
    accumulation = results.get("accumulation", {})
    if accumulation:
        out["allreduce_per_optimizer_step"] = {
            name: data["allreduce_per_optimizer_step"] for name, data in accumulation.items()}
        out["buckets_per_optimizer_step"] = {
            name: data["buckets_per_optimizer_step"] for name, data in accumulation.items()}
        out["no_sync_saving"] = {name: data["no_sync_saving"] for name, data in accumulation.items()}
    checkpoint = results.get("checkpoint", {})
    if "ratios" in checkpoint:
        out["ckpt_save_ratio"] = checkpoint["ratios"]["ckpt_save_ratio"]
        out["async_blocking_s"] = checkpoint["medians_s"]["async_blocking_s"]
        out["async_blocking_fraction"] = checkpoint["ratios"]["async_blocking_fraction"]
    startup = results.get("startup", {})
    if "startup_ratio" in startup:
        out["startup_ratio"] = startup["startup_ratio"]
    projection = results.get("projection", {})
    if "lines" in projection:
        out["projected_efficiency"] = {f"{line['model']} / {line['link']}": line["efficiency_marked"]
                                       for line in projection["lines"]}
        if "check_ws2" in projection:
            check = projection["check_ws2"]
            out["projection_check_ws2"] = {
                "predicted_compute_only": check["predicted"]["compute_only"]["efficiency"],
                "predicted_overlapped": check["predicted"]["overlapped"]["efficiency"],
                "predicted_not_overlapped": check["predicted"]["not_overlapped"]["efficiency"],
                "measured": check["measured"]["efficiency"]}
    peer_results = results.get("peers", {})
    if "contenders" in peer_results:
        out["peers_ratio_to_hand"] = {name: entry["ratio_to_hand"] for name, entry
                                      in peer_results["wall"]["contenders"].items()}
    gpu = results.get("gpu", {})
    if "modes" in gpu:
        out["gpu"] = {mode: {k: data[k] for k in ("tokens_per_s", "mfu", "peak_memory_gib")}
                      for mode, data in gpu["modes"].items()}
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _verdict(low: float, high: float, goal: float) -> str:
    """Whether a ratio's 95% interval ``[low, high]`` meets an upper-bound goal."""
    if high <= goal:
        return "yes"
    return "no" if low > goal else "not resolved (the interval contains the goal)"


def markdown(results: dict[str, Any]) -> str:
    """The tables of ``latest.md`` (also pasted into benchmarks/README.md)."""
    machine = results["machine"]
    times = sorted(c.get("timestamp_utc", machine["timestamp_utc"])
                   for c in results["conditions"].values())
    lines = [f"Machine: {machine['cpu_cores']}-core {machine['cpu_model']}, "
             f"{machine['memory_gb']} GB, torch {machine['torch']}; mode `{results['mode']}`, "
             f"device `{results['device']}`; sections measured {times[0]} to {times[-1]}.", ""]
    head = results
    lines += ["| key | value | goal | met |", "|---|---|---|---|"]
    for name, ratio in head.get("overhead_ratio", {}).items():
        data = results["overhead"][name]
        low, high = data["overhead_ratio_ci95"]
        lines.append(f"| `overhead_ratio` {name} | {ratio:.3f} (95% CI {low:.3f} to {high:.3f}) | "
                     f"≤ {data['goal']} | {_verdict(low, high, data['goal'])} |")
        low, high = data["a_a_ratio_ci95"]
        lines.append(f"| A/A control {name}: identical loops | {data['a_a_ratio']:.3f} "
                     f"(95% CI {low:.3f} to {high:.3f}) | 1 | |")
        low, high = data["overhead_ratio_paired_ci95"]
        lines.append(f"| `overhead_ratio_paired` {name}: step by step | "
                     f"{data['overhead_ratio_paired']:.3f} (95% CI {low:.3f} to {high:.3f}) | "
                     f"≤ {data['goal']} | {_verdict(low, high, data['goal'])} |")
    for name, count in head.get("allreduce_per_optimizer_step", {}).items():
        buckets = head["buckets_per_optimizer_step"][name]
        lines.append(f"| `allreduce_per_optimizer_step` {name} (accum 4) | {count:g} "
                     f"({buckets:g} bucket) | 1 per bucket | {'yes' if count == buckets else 'no'} |")
    if "ckpt_save_ratio" in head:
        ratio = head["ckpt_save_ratio"]
        lines.append(f"| `ckpt_save_ratio` | {ratio:.3f} | < 1.1 | {'yes' if ratio < 1.1 else 'no'} |")
        fraction = head["async_blocking_fraction"]
        lines.append(f"| async save blocking | {head['async_blocking_s'] * 1e3:.0f} ms "
                     f"({fraction:.2f} of a sync save) | < 0.2 | {'yes' if fraction < 0.2 else 'no'} |")
    scaling = results.get("scaling", {})
    if "strong_efficiency" in scaling:
        lines.append(f"| `scaling` ddp efficiency at world size 2, strong / weak | "
                     f"{scaling['strong_efficiency']:.2f} / {scaling['weak_efficiency']:.2f} | | |")
        fsdp = scaling.get("fsdp", {})
        if "strong_efficiency" in fsdp:
            lines.append(f"| `scaling` fsdp efficiency at world size 2, strong / weak | "
                         f"{fsdp['strong_efficiency']:.2f} / {fsdp['weak_efficiency']:.2f} | | |")
    if "startup_ratio" in head:
        startup = results["startup"]
        lines.append(f"| `startup_ratio` | {head['startup_ratio']:.2f} "
                     f"({startup['startup_vs_plain']:.2f}× a plain torch script's first step) | | |")
    lines.append("")

    for name, data in results.get("overhead", {}).items():
        steps = data["step_s"]
        lines += [f"**Overhead breakdown, {name}** ({data['workload']['parameters']:,} parameters, "
                  f"batch {data['workload']['batch_size_per_rank']} per rank, 2 ranks): median step "
                  f"hand-written {steps['hand']['median'] * 1e6:,.0f} µs, ddp_train "
                  f"{steps['trainer']['median'] * 1e6:,.0f} µs; {data['intervals_per_variant']} steps "
                  f"per variant ({data['replicas']} replicas × {data['rounds']} rounds × "
                  f"{data['steps_per_block'] - 1} intervals). Ratio per replica: "
                  + ", ".join(f"{r:.3f}" for r in data["overhead_ratio_per_replica"])
                  + "; A/A control per replica: "
                  + ", ".join(f"{r:.3f}" for r in data["a_a_ratio_per_replica"]) + ".", "",
                  "| extra | added µs per step (95% CI) | % of the hand-written step "
                  "| alone, µs per call |",
                  "|---|---|---|---|"]
        for key, row in data["breakdown"].items():
            low, high = row["ci95_us"]
            alone = f"{row['isolated_us']:.1f}" if row["isolated_us"] is not None else ""
            lines.append(f"| {row['description']} | {row['added_us']:+.1f} ({low:+.1f} to {high:+.1f}) | "
                         f"{row['added_pct_of_hand_step']:+.2f}% | {alone} |")
        paired = data["paired"]
        lines += ["", f"Step by step ({paired['iterations']} iterations; per iteration a turn of each "
                      f"loop, shuffled: {paired['warm_steps']} warm-up steps, then one timed): µs "
                      f"added per step (95% CI): "
                  + "; ".join(f"{key} ({paired[key]['with']} − {paired[key]['without']}) "
                              f"{paired[key]['added_us']:+.1f} ({paired[key]['ci95_us'][0]:+.1f} to "
                              f"{paired[key]['ci95_us'][1]:+.1f})"
                              for key in ("trainer_vs_hand", "extras", "rest_of_trainer_step", "a_a_control"))
                  + f"; `fit()`'s bookkeeping between steps {paired['loop_bookkeeping']['added_us']:+.1f} "
                    f"({paired['loop_bookkeeping']['ci95_us'][0]:+.1f} to "
                    f"{paired['loop_bookkeeping']['ci95_us'][1]:+.1f}) over the hand loop's "
                    f"{paired['loop_bookkeeping']['hand_gap_us']:.1f}."]
        lines += ["", f"Whole `fit()` calls of {data['steps_per_block']} steps against "
                      f"{data['steps_per_block']} hand-written steps: ratio "
                      f"{data['fit_block_ratio']:.3f}; `fit()`'s fixed cost per call ≈ "
                      f"{data['fit_call_fixed_cost_s'] * 1e3:.1f} ms.", ""]

    if results.get("accumulation"):
        lines += ["**Gradient accumulation** (4 micro-batches per optimizer step, 2 ranks): median "
                  "ms per optimizer step", "",
                  "| workload | all-reduces / step | ddp_train | hand no_sync | hand all-reduce every "
                  "micro-batch | no_sync saves |", "|---|---|---|---|---|---|"]
        for name, data in results["accumulation"].items():
            stats = data["optimizer_step_s"]
            lines.append(f"| {name} | {data['allreduce_per_optimizer_step']:g} | "
                         f"{stats['trainer']['median'] * 1e3:.2f} | "
                         f"{stats['hand_no_sync']['median'] * 1e3:.2f} | "
                         f"{stats['hand_sync_every_micro']['median'] * 1e3:.2f} | "
                         f"{data['no_sync_saving'] * 100:.0f}% |")
        lines.append("")

    if "runs" in scaling:
        lines += ["**Scaling** (mid_gpt, ddp_train; ddp is no wrapper at world size 1)", "",
                  "| strategy | world size | batch per rank | global batch | median step ms | samples/s |",
                  "|---|---|---|---|---|---|"]
        for strategy, runs in (("ddp", scaling["runs"]), ("fsdp", scaling.get("fsdp", {}).get("runs", {}))):
            for run in sorted(runs.values(), key=lambda r: (r["world_size"], r["batch_per_rank"])):
                lines.append(f"| {strategy} | {run['world_size']} | {run['batch_per_rank']} | "
                             f"{run['global_batch']} | {run['step_s']['median'] * 1e3:.1f} | "
                             f"{run['samples_per_s']:.0f} |")
        lines.append("")

    fsdp_memory = results.get("fsdp_memory", {})
    if "ratios" in fsdp_memory:
        lines += ["**FSDP against DDP** (mid_gpt; parameters + gradients + optimizer state each "
                  "rank holds, and the median step)", "",
                  "| world size | strategy | MiB per rank | median step ms | fsdp / ddp memory | "
                  "fsdp / ddp step |", "|---|---|---|---|---|---|"]
        for world_size in (1, 2):
            ratios = fsdp_memory["ratios"][f"ws{world_size}"]
            for strategy in ("ddp", "fsdp"):
                run = fsdp_memory["runs"][f"ws{world_size}_{strategy}"]
                extra = (f"{ratios['memory_fsdp_over_ddp']:.2f} | {ratios['step_time_fsdp_over_ddp']:.2f}"
                         if strategy == "fsdp" else " | ")
                lines.append(f"| {world_size} | {strategy} | {run['max_total_bytes_per_rank'] / 2**20:.2f} | "
                             f"{run['step_s']['median'] * 1e3:.1f} | {extra} |")
        lines.append("")

    startup = results.get("startup", {})
    if "summary_s" in startup:
        lines += ["**Start-up** (fresh processes, seconds to the mark, median)", "",
                  "| " + " | ".join(startup["summary_s"]) + " |",
                  "|" + "---|" * len(startup["summary_s"]),
                  "| " + " | ".join(f"{v['median']:.2f}" for v in startup["summary_s"].values()) + " |", ""]

    bandwidth = results.get("bandwidth", {})
    if "sizes" in bandwidth:
        lines += [f"**{bandwidth['backend']} all-reduce, {bandwidth['world_size']} ranks**", "",
                  "| bytes | median µs | bus GB/s |", "|---|---|---|"]
        for size in bandwidth["sizes"]:
            lines.append(f"| {size['bytes']:,} | {size['time_s']['median'] * 1e6:,.0f} | "
                         f"{size['busbw_gb_s']:.3f} |")
        lines.append("")

    projection = results.get("projection", {})
    if "lines" in projection:
        lines += ["**Projected DDP efficiency** (weak scaling; see the Projection section)", "",
                  "| model | link | compute ms/step | N = 8 | N = 64 | N = 512 |",
                  "|---|---|---|---|---|---|"]
        for line in projection["lines"]:
            marked = line["efficiency_marked"]
            lines.append(f"| {line['model']} | {line['link']} | {line['compute_s'] * 1e3:.1f} | "
                         + " | ".join(f"{marked[n] * 100:.1f}%" for n in sorted(marked, key=int)) + " |")
        if "check_ws2" in projection:
            check = projection["check_ws2"]
            predicted = check["predicted"]
            lines += ["", f"Check at world size 2 on this machine (weak scaling, mid_gpt): cores "
                          f"alone (2 processes computing at once, ×{check['concurrency_factor']:.2f}) "
                          f"predict {predicted['compute_only']['efficiency'] * 100:.0f}%; with the "
                          f"measured {check['backend']} all-reduce "
                          f"{predicted['overlapped']['efficiency'] * 100:.0f}% "
                          f"(overlapped) / {predicted['not_overlapped']['efficiency'] * 100:.0f}% (not "
                          f"overlapped); measured {check['measured']['efficiency'] * 100:.0f}%. "
                          f"The all-reduce of the {sum(check['bucket_bytes']) / 1e6:.2f} MB of "
                          f"gradients takes {check['allreduce_alone_s'] * 1e3:.1f} ms alone, but DDP "
                          f"adds {check['ddp_cost_in_plain_step_s'] * 1e3:.1f} ms to a plain "
                          f"hand-written step."]
        lines.append("")

    peer_results = results.get("peers", {})
    if "contenders" in peer_results:
        import peers
        lines += [f"**Peers** ({peer_results['workload']['model']}, 2 gloo ranks, fp32; "
                  f"{peer_results['replicas']} replicas × {peer_results['rounds']} rounds × "
                  f"{peer_results['timed_steps_per_turn']} timed steps per contender)",
                  "", peers.markdown(peer_results)]

    gpu = results.get("gpu", {})
    if "modes" in gpu:
        lines += ["**GPU** (bf16)", "", "| mode | tokens/s | MFU | peak GiB | warm-up s |",
                  "|---|---|---|---|---|"]
        for mode, data in gpu["modes"].items():
            lines.append(f"| {mode} | {data['tokens_per_s']:,.0f} | {_fmt(data['mfu'])} | "
                         f"{data['peak_memory_gib']:.1f} | {data['warmup_s']:.1f} |")
        lines.append("")

    lines += ["**Conditions** (cores other processes and the host's other guests took while "
              "each section ran)", "",
              "| section | wall s | other processes | host steal | attempts | noisy |",
              "|---|---|---|---|---|---|"]
    for section, condition in results["conditions"].items():
        during = condition["during"]
        if during["wall_s"] < 1:
            continue  # nothing timed
        lines.append(f"| {section} | {during['wall_s']:.0f} | {during['others_cores']:.2f} | "
                     f"{during['steal_cores']:.2f} | {condition.get('attempts', 1)} | "
                     f"{'yes' if condition['noisy'] else 'no'} |")
    return "\n".join(lines) + "\n"


def draw(results: dict[str, Any], out: Path) -> list[Path]:
    """Every chart whose section has results."""
    import checkpoint_save
    import fsdp_memory
    import plots
    drawn = []
    for section, draw_fn, name in [("overhead", plots.overhead, "overhead.png"),
                                   ("accumulation", plots.accumulation, "accumulation.png"),
                                   ("scaling", plots.scaling, "scaling.png"),
                                   ("bandwidth", plots.bandwidth, "allreduce_bandwidth.png"),
                                   ("startup", plots.startup, "startup.png"),
                                   ("projection", plots.projection, "projection.png"),
                                   ("gpu", plots.gpu, "gpu.png")]:
        data = results.get(section, {})
        if data and "status" not in data:
            drawn.append(draw_fn(results, out / name))
    if "ratios" in results.get("checkpoint", {}):
        checkpoint_save.plot(results["checkpoint"], out / "checkpoint.png")
        drawn.append(out / "checkpoint.png")
    if "ratios" in results.get("fsdp_memory", {}):
        drawn.append(fsdp_memory.plot(results["fsdp_memory"], out / "fsdp_memory.png"))
    if "contenders" in results.get("peers", {}):
        import peers
        drawn.append(peers.plot({**results["peers"], "machine": results["machine"],
                                 "started_utc": results["conditions"]["peers"]["timestamp_utc"]},
                                out / "peers.png"))
    return drawn


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the sections, write the results; the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (under 5 min on 2 cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (gloo) or cuda (NCCL, bf16, plus the gpu section)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections (default: all of {', '.join(SECTIONS)})")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    parser.add_argument("--max-wait", type=float, default=600.0,
                        help="seconds to wait for a quiet machine before each section (default 600)")
    parser.add_argument("--retries", type=int, default=2,
                        help="re-runs of a section that other load disturbed (default 2)")
    args = parser.parse_args(argv)
    if args.retries < 0:
        parser.error("--retries must be >= 0")
    selected = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in selected if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.device == "cuda":
        from gpu import require_cuda
        try:
            require_cuda()
        except RuntimeError as exc:
            print(f"run.py: error: {exc}", file=sys.stderr)
            return 2
    from common import CpuWatch, machine_info, utc_now, wait_for_quiet

    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks, read at their start
    # SIGTERM unwinds like Ctrl-C, so that spawned ranks are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    args.out.mkdir(parents=True, exist_ok=True)
    latest = args.out / "latest.json"
    previous: dict[str, Any] = {}
    if latest.exists() and set(selected) != set(SECTIONS):
        previous = json.loads(latest.read_text())
        if previous.get("device") != args.device or previous.get("mode") != mode:
            previous = {}
    results: dict[str, Any] = {**previous, "benchmark": "ddp_train", "mode": mode,
                               "device": args.device, "machine": machine_info()}
    results.setdefault("conditions", {})
    started = time.monotonic()
    results["start_conditions"] = wait_for_quiet(0.7, QUIET_CORES, args.max_wait)
    waited = results["start_conditions"]["waited_s"]
    for section in SECTIONS:
        if section not in selected:
            continue
        attempts: list[dict[str, Any]] = []
        for attempt in range(args.retries + 1):
            before = wait_for_quiet(None, QUIET_CORES, args.max_wait)
            waited += before["waited_s"]
            print(f"[{time.monotonic() - started - waited:5.0f} s] {section}"
                  + (f" (attempt {attempt + 1})" if attempt else "") + " ...", flush=True)
            measured_at = utc_now()
            with CpuWatch() as watch:
                result = RUNNERS[section](plan, args.device, results)
            during = watch.result
            disturbance = during["others_cores"] + during["steal_cores"]
            # Under a second the CPU counters are too coarse to judge (and nothing was timed).
            noisy = during["wall_s"] >= 1 and disturbance > NOISY_CORES
            attempts.append({"result": result, "before": before, "during": during, "noisy": noisy,
                             "disturbance": disturbance, "timestamp_utc": measured_at})
            if not noisy:
                break
            print(f"  warning: other processes ({during['others_cores']:.2f} cores) and other "
                  f"guests of the host ({during['steal_cores']:.2f} cores) disturbed {section}",
                  flush=True)
        best = min(attempts, key=lambda a: a["disturbance"])
        results[section] = best["result"]
        results["conditions"][section] = {"timestamp_utc": best["timestamp_utc"],
                                          "before": best["before"], "during": best["during"],
                                          "noisy": best["noisy"], "attempts": len(attempts)}
    results["runtime_s"] = round(time.monotonic() - started - waited, 1)
    results["waited_s"] = round(waited, 1)
    # The measurements first, so that nothing measured is lost if a summary fails.
    latest.write_text(json.dumps(results, indent=1, default=str) + "\n")
    results.update(headline(results))
    latest.write_text(json.dumps(results, indent=1, default=str) + "\n")
    table = markdown(results)
    (args.out / "latest.md").write_text(table)
    drawn = draw(results, args.out)
    print(table)
    print(f"wrote {latest}, {args.out / 'latest.md'} and {len(drawn)} charts in "
          f"{results['runtime_s']:.0f} s (+{waited:.0f} s waiting for a quiet machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
