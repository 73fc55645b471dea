"""Benchmark: ddp_train against the launchers people compare it with, on a Hugging Face model.

What is measured: the median time of one optimizer step of a Hugging Face causal LM
(``GPT2LMHeadModel``, 2 layers, width 128; variable-length byte sequences padded with
attention masks and labels −100; see ``peer_loops.py``) trained by 2 gloo ranks under each
contender of :data:`peer_loops.CONTENDERS`: a hand-written DDP loop (the baseline),
ddp_train's ``Trainer.fit()``, Hugging Face's ``Trainer``, Accelerate and Lightning, plus a
second run of the hand-written loop as the A/A control. A contender whose package is not
installed is skipped and named in the results.

Why the comparison is fair: every contender trains the same model from the same seed on the
same data, batch, optimizer (torch's AdamW, same settings, constant LR, no clipping) and
precision (fp32), through its own real training loop with its own defaults otherwise, and
is timed by the same clock, a forward pre-hook on the model (``peer_loops.ForwardClock``):
a step is the time from one forward start to the next, so it holds everything the
framework does per step. The first ``warmup`` steps of every run are dropped (allocator,
DDP's bucket rebuild after the first step). Each run is a fresh pair of spawned processes
(one core and one intra-op thread per rank, gloo), so frameworks that own their loop
(``Trainer.train()``, ``Trainer.fit()``) run it unchanged from start to end.

Interleaving: a replica runs every contender once, in an order shuffled per replica;
replicas follow one another, so drift of a shared machine hits every contender alike.
Results are medians of all timed steps pooled over the replicas; each ratio to the hand
loop comes with a 95% interval from resampling whole replicas (the contenders of a replica
ran next to each other in time), the spread the A/A control's interval shows too.

Run: ``PYTHONPATH=. python benchmarks/peers.py [--quick] [--replicas N] [--steps N]
[--only NAME,...] [--out DIR]``; writes ``peers.json`` (``peers_quick.json`` with
``--quick``: every step time, medians, ratios, intervals, the machine and its load during
each run) and ``peers.png``. The step times are a 2-core CPU's: compare ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common import (CpuWatch, init_process_group, machine_info, median, paired_bootstrap,
                    shuffled_rounds, spawn_ranks, summarize, utc_now, wait_for_quiet)
from peer_loops import (BATCH_SIZE, BLOCK_SIZE, CONTENDERS, LR, ForwardClock, Setup, build_model,
                        held_out_loss, train_sequences)

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "hand"
OURS = "ddp_train"
GOAL = 1.03
"""Upper bound of ddp_train's step time over the hand-written loop's."""
PLANS: dict[str, dict[str, int]] = {
    "quick": {"replicas": 2, "steps": 30, "warmup": 8},
    "full": {"replicas": 6, "steps": 100, "warmup": 10},
}
"""Replicas, timed steps per run and warm-up steps dropped before them."""
RUN_TIMEOUT_S = 600
CLOCKS = {"wall": "step_s", "cpu": "cpu_s"}
"""The two clocks of every step (keys of a run): wall time from one forward start to the next
(the step time), and the CPU time rank 0 used meanwhile, all its threads together (the
framework's own work, which other load on a shared machine delays but does not add to)."""
QUIET_CORES = 0.25
"""A replica starts once other processes and the host's other guests take fewer cores than
this (or a wait of ``max_wait_s`` has passed)."""


def available(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The contenders that can run here, and why each of the others cannot."""
    runnable, skipped = [], {}
    for name in names:
        missing = [module for module in CONTENDERS[name].requires
                   if _find_spec(module) is None]
        if missing:
            skipped[name] = f"not installed: {', '.join(missing)}"
        else:
            runnable.append(name)
    return runnable, skipped


def _find_spec(module: str) -> Any:
    """``importlib.util.find_spec``, None also when a parent package is missing."""
    try:
        return importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return None


def _rank_main(rank: int, world_size: int, name: str, steps: int, warmup: int) -> dict[str, Any]:
    """One contender's run in one rank: its step times (rank 0's are kept) and held-out losses."""
    # The frameworks' deprecation notes and advice would fill the output of every run.
    warnings.simplefilter("ignore")
    init_process_group(rank, world_size, torch.device("cpu"))
    forwards = warmup + steps + 1  # one more forward than intervals
    model = build_model()
    dataset = train_sequences(forwards, world_size)
    loss_before = held_out_loss(model)
    clock = ForwardClock(model)
    with tempfile.TemporaryDirectory(prefix="ddp_bench_peers_") as work_dir:
        started = time.perf_counter()
        settings = CONTENDERS[name].train(Setup(model, dataset, forwards, rank, world_size, work_dir))
        wall_s = time.perf_counter() - started
    wall, cpu = clock.remove()
    if len(wall) != forwards:
        raise RuntimeError(f"{name}: expected {forwards} forwards, the clock counted {len(wall)}")
    loss_after = held_out_loss(model)
    if dist.is_initialized():  # some frameworks take the group down themselves
        dist.barrier()
        dist.destroy_process_group()
    steps_s = [b - a for a, b in itertools.pairwise(wall)]
    cpu_s = [b - a for a, b in itertools.pairwise(cpu)]
    return {"step_s": steps_s[warmup:], "cpu_s": cpu_s[warmup:], "warmup_step_s": steps_s[:warmup],
            "wall_s": wall_s, "loss_before": loss_before, "loss_after": loss_after,
            "settings": settings}


def measure(names: list[str], orders: list[list[str]], steps: int, warmup: int, max_wait_s: float
            ) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Every contender once per replica, in that replica's order: rank 0's runs by contender,
    and how quiet the machine was before each replica (it waits up to ``max_wait_s`` for
    other processes to take less than :data:`QUIET_CORES`)."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    replicas = len(orders)
    waits = []
    for replica, order in enumerate(orders):
        waits.append(wait_for_quiet(None, QUIET_CORES, max_wait_s))
        for name in order:
            with CpuWatch() as watch:
                result = spawn_ranks(_rank_main, 2, name, steps, warmup, timeout=RUN_TIMEOUT_S)[0]
            result.update({"replica": replica, "conditions": watch.result})
            runs[name].append(result)
            print(f"  replica {replica + 1}/{replicas} {name:<11} median step "
                  f"{median(result['step_s']) * 1e3:7.2f} ms, CPU {median(result['cpu_s']) * 1e3:7.2f} ms "
                  f"(others took "
                  f"{watch.result['others_cores']:.2f} cores)", flush=True)
    return runs, waits


def _ratio(a: list[float], b: list[float]) -> float:
    return median(a) / median(b)


def compare(runs: dict[str, list[dict[str, Any]]], key: str) -> dict[str, Any]:
    """One clock's numbers (``key``: ``step_s`` or ``cpu_s`` of every run): per contender the
    median and quartiles, its median per replica and its ratio to the hand loop (pooled medians,
    95% interval from resampling replicas, and per replica); ddp_train's ratio to each peer."""
    rounds = {name: [run[key] for run in name_runs] for name, name_runs in runs.items()}
    pooled = {name: [x for block in blocks for x in block] for name, blocks in rounds.items()}
    contenders = {name: {
        "summary_s": summarize(pooled[name]),
        "median_per_replica_s": [median(block) for block in blocks],
        "ratio_to_hand": _ratio(pooled[name], pooled[BASELINE]),
        "ratio_to_hand_ci95": list(paired_bootstrap(blocks, rounds[BASELINE], _ratio)),
        "ratio_to_hand_per_replica": [_ratio(a, b) for a, b in zip(blocks, rounds[BASELINE])]}
        for name, blocks in rounds.items()}
    ours_over_peer = {
        peer: {"ratio": _ratio(pooled[OURS], pooled[peer]),
               "ci95": list(paired_bootstrap(rounds[OURS], rounds[peer], _ratio))}
        for peer in rounds if OURS in rounds and peer not in (OURS, BASELINE, "hand_twin")}
    return {"contenders": contenders, "ours_over_peer": ours_over_peer}


def analyse(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Both clocks compared (:data:`CLOCKS`), what every contender trained to, and the goal."""
    results: dict[str, Any] = {clock: compare(runs, key) for clock, key in CLOCKS.items()}
    results["contenders"] = {name: {
        "description": CONTENDERS[name].description,
        "loss_before": median([run["loss_before"] for run in name_runs]),
        "loss_after": median([run["loss_after"] for run in name_runs]),
        "others_cores": median([run["conditions"]["others_cores"] for run in name_runs]),
        "settings": name_runs[0]["settings"]} for name, name_runs in runs.items()}
    if OURS in runs:
        results["goal"] = {"ratio_to_hand_at_most": GOAL}
        for clock in CLOCKS:
            ours = results[clock]["contenders"][OURS]
            low, high = ours["ratio_to_hand_ci95"]
            results["goal"][clock] = {"met": ours["ratio_to_hand"] <= GOAL, "confirmed": high <= GOAL,
                                      "refuted": low > GOAL}
    return results


def run(replicas: int, steps: int, warmup: int, names: list[str] | None = None,
        max_wait_s: float = 120) -> dict[str, Any]:
    """Measure and analyse; what ``peers.json`` holds (``run.py``'s ``peers`` section too).

    ``names``: the contenders to run (default all; the hand loop always runs)."""
    if _find_spec("transformers") is None:  # the model itself
        return {"status": "not run: needs transformers (pip install 'ddp_train[peers]')"}
    wanted = list(names or CONTENDERS)
    runnable, skipped = available(wanted if BASELINE in wanted else [BASELINE, *wanted])
    for name, reason in skipped.items():
        print(f"  skipping {name}: {reason}", flush=True)
    started = time.monotonic()
    orders = shuffled_rounds(runnable, replicas)
    runs, waits = measure(runnable, orders, steps, warmup, max_wait_s)
    return {"benchmark": "peers", "workload": workload(), "replicas": replicas,
            "timed_steps_per_run": steps, "warmup_steps_per_run": warmup, "skipped": skipped,
            "orders": orders, "quiet_before_replica": waits,
            "waited_s": round(sum(wait["waited_s"] for wait in waits), 1),
            "runtime_s": round(time.monotonic() - started, 1), **analyse(runs), "runs": runs}


def workload() -> dict[str, Any]:
    """What every contender trains, for the results."""
    model = build_model()
    return {"model": f"{type(model).__name__}({model.config.n_layer} layers, width "
                     f"{model.config.n_embd}, vocab {model.config.vocab_size})",
            "parameters": sum(p.numel() for p in model.parameters()),
            "batch_per_rank": BATCH_SIZE, "sequence_length": BLOCK_SIZE, "world_size": 2,
            "backend": "gloo", "optimizer": f"AdamW lr {LR}, weight decay 0, constant LR",
            "precision": "fp32", "threads_per_rank": 1}


def markdown(results: dict[str, Any]) -> str:
    """The README table: per contender the median step (wall and CPU) and its ratio to the
    hand loop's, and the held-out loss it trained to; then ddp_train against each peer."""
    wall, cpu = results["wall"]["contenders"], results["cpu"]["contenders"]
    lines = ["| contender | median step, ms (p25 to p75) | ratio to the hand loop (95% CI) | "
             "CPU ms per step | CPU ratio to the hand loop (95% CI) | held-out loss, before → after |",
             "|---|---|---|---|---|---|"]
    for name, entry in results["contenders"].items():
        step = wall[name]["summary_s"]
        lines.append(f"| `{name}` | {step['median'] * 1e3:.1f} ({step['p25'] * 1e3:.1f} to "
                     f"{step['p75'] * 1e3:.1f}) | {_with_interval(wall[name])} | "
                     f"{cpu[name]['summary_s']['median'] * 1e3:.1f} | {_with_interval(cpu[name])} | "
                     f"{entry['loss_before']:.2f} → {entry['loss_after']:.2f} |")
    for name, reason in results["skipped"].items():
        lines.append(f"| `{name}` | skipped: {reason} | | | | |")
    peers = results["wall"]["ours_over_peer"]
    if peers:
        lines += ["", "ddp_train's step over each peer's, wall (CPU), 95% CI: " + "; ".join(
            f"{peer} {_with_interval(value)} ({_with_interval(results['cpu']['ours_over_peer'][peer])})"
            for peer, value in peers.items()) + "."]
    return "\n".join(lines) + "\n"


def _with_interval(entry: dict[str, Any]) -> str:
    """``ratio (low to high)`` of a ratio entry (``ratio_to_hand`` or ``ratio``, and its ``ci95``)."""
    ratio = entry.get("ratio_to_hand", entry.get("ratio"))
    low, high = entry.get("ratio_to_hand_ci95", entry.get("ci95"))
    return f"{ratio:.3f} ({low:.3f} to {high:.3f})"


def plot(results: dict[str, Any], path: Path) -> Path:
    """Two panels: the median step per contender (whiskers p25 to p75, dots the replicas'
    medians), and its ratio to the hand loop's, wall and CPU, with 95% intervals and the goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["contenders"])[::-1]
    y = list(range(len(names)))
    wall = results["wall"]["contenders"]
    colors = ["#1f77b4" if name == OURS else "#7f7f7f" if name.startswith("hand") else "#ff7f0e"
              for name in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.6 * len(names) + 2.6), dpi=110)
    medians = [wall[n]["summary_s"]["median"] * 1e3 for n in names]
    spread = [[m - wall[n]["summary_s"]["p25"] * 1e3 for m, n in zip(medians, names)],
              [wall[n]["summary_s"]["p75"] * 1e3 - m for m, n in zip(medians, names)]]
    left.barh(y, medians, xerr=spread, capsize=4, color=colors, edgecolor="black", linewidth=0.5)
    for index, name in enumerate(names):
        replica_ms = [m * 1e3 for m in wall[name]["median_per_replica_s"]]
        left.scatter(replica_ms, [index] * len(replica_ms), color="black", s=10, zorder=3)
    left.set_yticks(y, names)
    left.set_xlabel("ms per optimizer step, wall (bar: median; whiskers: p25-p75; dots: replicas)")
    for clock, offset, marker in (("wall", 0.12, "o"), ("cpu", -0.12, "s")):
        entries = results[clock]["contenders"]
        ratios = [entries[n]["ratio_to_hand"] for n in names]
        low = [max(r - entries[n]["ratio_to_hand_ci95"][0], 0) for r, n in zip(ratios, names)]
        high = [max(entries[n]["ratio_to_hand_ci95"][1] - r, 0) for r, n in zip(ratios, names)]
        right.errorbar(ratios, [i + offset for i in y], xerr=[low, high], fmt=marker, capsize=4,
                       color="black" if clock == "wall" else "#2ca02c",
                       label=f"{clock} time (95% interval, replicas resampled)")
    right.axvline(1.0, color="gray", linewidth=0.8)
    right.axvline(GOAL, color="#d62728", linestyle="--", linewidth=0.8, label=f"goal ≤ {GOAL}")
    right.set_yticks(y, names)
    right.set_xlabel("step time / the hand-written loop's")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    work, machine = results["workload"], results["machine"]
    fig.suptitle(f"{work['model']}, {work['parameters']:,} parameters, {work['batch_per_rank']} × "
                 f"{work['sequence_length']} tokens per rank, {work['world_size']} gloo ranks, fp32; "
                 f"{results['replicas']} replicas × {results['timed_steps_per_run']} steps"
                 + "".join(f"\n{name} skipped: {reason}" for name, reason in results["skipped"].items()),
                 fontsize=10)
    fig.text(0.01, 0.005, f"{machine['cpu_cores']}-core {machine['cpu_model']}, torch "
                          f"{machine['torch']}, {results['started_utc']}: CPU times, compare ratios",
             fontsize=8, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write peers.json (or peers_quick.json) and its PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{PLANS['quick']['replicas']} replicas of {PLANS['quick']['steps']} steps")
    parser.add_argument("--replicas", type=int, help="replicas (default 6, --quick 2)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default 100, --quick 30)")
    parser.add_argument("--only", help=f"comma-separated contenders (default: all of "
                                       f"{', '.join(CONTENDERS)}; the hand loop always runs)")
    parser.add_argument("--max-wait", type=float, default=120,
                        help="seconds to wait for a quiet machine before each replica (default 120)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    args = parser.parse_args(argv)
    plan = dict(PLANS["quick" if args.quick else "full"])
    plan.update({key: value for key, value in (("replicas", args.replicas), ("steps", args.steps))
                 if value is not None})
    if plan["replicas"] < 1 or plan["steps"] < 2:
        parser.error("--replicas must be >= 1 and --steps >= 2")
    names = [n.strip() for n in args.only.split(",")] if args.only else list(CONTENDERS)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the frameworks' thread setup in the ranks
    # SIGTERM unwinds like Ctrl-C, so that spawned ranks are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = utc_now()
    with CpuWatch() as watch:
        results = run(plan["replicas"], plan["steps"], plan["warmup"], names, args.max_wait)
    if "status" in results:
        print(f"peers.py: {results['status']}", file=sys.stderr)
        return 2
    results.update({"mode": "quick" if args.quick else "full", "machine": machine_info(),
                    "started_utc": started, "conditions": watch.result})
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "peers_quick" if args.quick else "peers"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / f"{stem}.png")
    print(markdown(results))
    print(f"wrote {args.out / (stem + '.json')} and {stem}.png in {results['runtime_s']:.0f} s; "
          f"other processes took {watch.result['others_cores']:.2f} cores meanwhile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
