"""Benchmark: ddp_train against the launchers people compare it with, on a Hugging Face model.

What is measured: the median time of one optimizer step of a Hugging Face causal LM
(``GPT2LMHeadModel``, 2 layers, width 128; variable-length byte sequences padded with
attention masks and labels −100; see ``peer_loops.py``) trained by 2 gloo ranks under each
contender of :data:`peer_loops.CONTENDERS`: a hand-written DDP loop (the baseline),
ddp_train's ``Trainer.fit()``, Hugging Face's ``Trainer``, Accelerate and Lightning, plus a
second copy of the hand-written loop as the A/A control. A contender whose package is not
installed is skipped and named in the results.

Why the comparison is fair: every contender trains its own copy of the same model (same
seed) on the same data, batch, optimizer (torch's AdamW, same settings, constant LR, no
clipping) and precision (fp32), through its own real training loop with its own defaults
otherwise, and is timed by the same clock, a forward pre-hook on the model
(``peer_loops.Pacer``): a step is the time from one forward start to the next, so it holds
everything the framework does per step, in wall time and in the rank's CPU time.

Interleaving: in each replica (a fresh pair of spawned processes, one core and one
intra-op thread per rank) every contender runs its framework's loop in a thread of its own,
and the threads take turns (``peer_loops.Baton``): first each one's start-up and
``warmup`` steps, then ``rounds`` rounds in which each contender runs ``steps_per_turn``
steps, in an order shuffled every round (the same on both ranks), then each one's last
step and teardown. The first step of every turn runs after the other frameworks' turns
(cold caches) and is dropped; the others are timed. Neighbouring turns share the
machine's state: on this VM it drifts between fast and slow for seconds to minutes, and a
fresh process pair runs the same loop up to 20% faster or slower than the last one, so
contenders timed in separate processes could not be compared to a few per cent.

Results are medians of all timed steps pooled over replicas and rounds; each ratio to the
hand loop comes with a 95% interval from resampling replicas, then rounds within them
(:func:`common.paired_bootstrap`), the spread the A/A control's interval shows too.

Run: ``PYTHONPATH=. python benchmarks/peers.py [--quick] [--replicas N] [--rounds N]
[--only NAME,...] [--out DIR]``; writes ``peers.json`` (``peers_quick.json`` with
``--quick``: every step time, medians, ratios, intervals, the machine and its load during
each replica) and ``peers.png``. The step times are a 2-core CPU's: compare ratios.
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
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook

from common import (CpuWatch, init_process_group, machine_info, median, paired_bootstrap,
                    shuffled_rounds, spawn_ranks, summarize, utc_now, wait_for_quiet)
from peer_loops import (BATCH_SIZE, BLOCK_SIZE, CONTENDERS, LR, Baton, Pacer, Setup, build_model,
                        held_out_loss, train_sequences)

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "hand"
OURS = "ddp_train"
GOAL = 1.03
"""Upper bound of ddp_train's step time over the hand-written loop's."""
PLANS: dict[str, dict[str, int]] = {
    "quick": {"replicas": 2, "rounds": 10, "steps_per_turn": 4, "warmup": 5},
    "full": {"replicas": 5, "rounds": 50, "steps_per_turn": 4, "warmup": 5},
}
"""Replicas (fresh process pairs), rounds per replica, steps per contender's turn (the first
of each dropped), warm-up steps of every contender before the rounds."""
COLD_STEPS = 1
"""Steps at the start of every turn that are not timed: they run after the other
frameworks' turns, with their data and code out of the caches."""
REPLICA_TIMEOUT_S = 1200
QUIET_CORES = 0.25
"""A replica starts once other processes and the host's other guests take fewer cores than
this (or a wait of ``max_wait_s`` has passed)."""
CLOCKS = {"wall": "step_s", "cpu": "cpu_s", "between": "between_s"}
"""What is timed of every step (keys of a contender's rounds): ``wall``, the wall time from
one forward start to the next (the step time); ``cpu``, the CPU time rank 0 used meanwhile,
all its threads together (the work itself, which other load on a shared machine delays but
adds little to); ``between``, the wall time from the end of the optimizer step to the next
forward start (the loop's work between steps: a short interval, so its differences are
resolved to tens of µs where the whole step's drown in the machine's noise)."""


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


def _contender_thread(name: str, setup: Setup, baton: Baton, settings: dict[str, Any]) -> None:
    """Run one contender's whole training in this thread, on its turns."""
    try:
        baton.wait_for(name)
        settings.update(CONTENDERS[name].train(setup))
    except BaseException as failure:  # noqa: BLE001  (re-raised by the main thread)
        baton.fail(failure)
        return
    baton.pass_on()  # its last turn ends with its run


def _rank_main(rank: int, world_size: int, names: list[str], orders: list[list[str]],
               steps_per_turn: int, warmup: int) -> dict[str, Any]:
    """One replica in one rank: every contender's timed steps per round, and its held-out
    losses before and after training."""
    # The frameworks' deprecation notes and advice would fill the output of every run.
    warnings.simplefilter("ignore")
    init_process_group(rank, world_size, torch.device("cpu"))
    forwards = warmup + len(orders) * steps_per_turn + 1  # +1: the forward that ends the last turn
    dataset = train_sequences(forwards, world_size)
    # Turns: each contender's start-up and warm-up, the rounds, each one's last step and teardown.
    baton = Baton([*names, *itertools.chain.from_iterable(orders), *names])
    models = {name: build_model() for name in names}
    losses_before = {name: held_out_loss(model) for name, model in models.items()}
    pacers = {name: Pacer(name, model, baton, [warmup] + [steps_per_turn] * len(orders))
              for name, model in models.items()}
    settings: dict[str, dict[str, Any]] = {name: {} for name in names}

    def optimizer_stepped(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # One contender runs at a time, each in the thread named after it.
        pacer = pacers.get(threading.current_thread().name)
        if pacer is not None:
            pacer.optimizer_stepped()

    hook = register_optimizer_step_post_hook(optimizer_stepped)
    with tempfile.TemporaryDirectory(prefix="ddp_bench_peers_") as work_dir:
        threads = [threading.Thread(target=_contender_thread, name=name, daemon=True, args=(
            name, Setup(models[name], dataset, forwards, rank, world_size, f"{work_dir}/{name}"),
            baton, settings[name])) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    hook.remove()
    if baton.failure is not None:
        raise baton.failure
    results = {}
    for name, pacer in pacers.items():
        pacer.remove()
        counted = sum(len(marks) for marks in pacer.wall) - len(orders) - 1  # resumes mark twice
        if counted != forwards:
            raise RuntimeError(f"{name}: expected {forwards} forwards, the clock counted {counted}")
        intervals = {clock: [[b - a for a, b in itertools.pairwise(marks)] for marks in turns]
                     for clock, turns in (("step_s", pacer.wall), ("cpu_s", pacer.cpu))}
        intervals["between_s"] = [pacer.between_steps(turn) for turn in range(len(pacer.wall))]
        # Turn 0 is the warm-up, the last one the final step: neither is timed.
        results[name] = {**{key: [turn[COLD_STEPS:] for turn in turns[1:-1]]
                            for key, turns in intervals.items()},
                         "warmup_step_s": intervals["step_s"][0],
                         "loss_before": losses_before[name], "loss_after": held_out_loss(models[name]),
                         "settings": settings[name]}
    dist.barrier()
    dist.destroy_process_group()
    return results


def measure(names: list[str], replicas: int, rounds: int, steps_per_turn: int, warmup: int,
            max_wait_s: float) -> tuple[list[dict[str, Any]], list[list[list[str]]]]:
    """Every replica: its rank-0 results by contender, with the load during it (``conditions``)
    and how quiet the machine was before it (it waits up to ``max_wait_s`` for other processes
    to take less than :data:`QUIET_CORES`); and every replica's round orders."""
    replica_results, replica_orders = [], []
    for replica in range(replicas):
        orders = shuffled_rounds(names, rounds, seed=replica)
        quiet = wait_for_quiet(None, QUIET_CORES, max_wait_s)
        with CpuWatch() as watch:
            result = spawn_ranks(_rank_main, 2, names, orders, steps_per_turn, warmup,
                                 timeout=REPLICA_TIMEOUT_S)[0]
        replica_results.append({"contenders": result, "quiet_before": quiet,
                                "conditions": watch.result})
        replica_orders.append(orders)
        print(f"  replica {replica + 1}/{replicas} ({watch.result['wall_s']:.0f} s, other processes "
              f"took {watch.result['others_cores']:.2f} cores): median step, ms: " + ", ".join(
                  f"{name} {median([x for turn in result[name]['step_s'] for x in turn]) * 1e3:.1f}"
                  for name in names), flush=True)
    return replica_results, replica_orders


def _ratio(a: list[float], b: list[float]) -> float:
    return median(a) / median(b)


def _added(a: list[float], b: list[float]) -> float:
    return median(a) - median(b)


def compare(replicas: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """One clock's numbers (``key``, a value of :data:`CLOCKS`): per contender the median and
    quartiles, the median per replica, the ratio to the hand loop's (of pooled medians, with
    a 95% interval from resampling replicas and then rounds, and per replica) and the seconds
    it adds to it (with its interval); ddp_train's ratio to each peer."""
    names = list(replicas[0]["contenders"])
    rounds = {name: [turn for replica in replicas for turn in replica["contenders"][name][key]]
              for name in names}
    clusters = [index for index, replica in enumerate(replicas)
                for _ in replica["contenders"][BASELINE][key]]
    pooled = {name: [x for turn in turns for x in turn] for name, turns in rounds.items()}

    def replica_pool(replica: dict[str, Any], name: str) -> list[float]:
        return [x for turn in replica["contenders"][name][key] for x in turn]

    contenders = {name: {
        "summary_s": summarize(pooled[name]),
        "median_per_replica_s": [median(replica_pool(replica, name)) for replica in replicas],
        "ratio_to_hand": _ratio(pooled[name], pooled[BASELINE]),
        "ratio_to_hand_ci95": list(paired_bootstrap(rounds[name], rounds[BASELINE], _ratio,
                                                    clusters=clusters)),
        "ratio_to_hand_per_replica": [_ratio(replica_pool(replica, name), replica_pool(replica, BASELINE))
                                      for replica in replicas],
        "added_s": _added(pooled[name], pooled[BASELINE]),
        "added_s_ci95": list(paired_bootstrap(rounds[name], rounds[BASELINE], _added,
                                              clusters=clusters))}
        for name in names}
    ours_over_peer = {
        peer: {"ratio": _ratio(pooled[OURS], pooled[peer]),
               "ci95": list(paired_bootstrap(rounds[OURS], rounds[peer], _ratio, clusters=clusters))}
        for peer in names if OURS in names and peer not in (OURS, BASELINE, "hand_twin")}
    return {"contenders": contenders, "ours_over_peer": ours_over_peer}


def analyse(replicas: list[dict[str, Any]]) -> dict[str, Any]:
    """Both clocks compared (:data:`CLOCKS`), what every contender trained to, and the goal."""
    results: dict[str, Any] = {clock: compare(replicas, key) for clock, key in CLOCKS.items()}
    names = list(replicas[0]["contenders"])
    results["contenders"] = {name: {
        "description": CONTENDERS[name].description,
        "loss_before": median([replica["contenders"][name]["loss_before"] for replica in replicas]),
        "loss_after": median([replica["contenders"][name]["loss_after"] for replica in replicas]),
        "settings": replicas[0]["contenders"][name]["settings"]} for name in names}
    if OURS in names:
        results["goal"] = {"ratio_to_hand_at_most": GOAL}
        for clock in ("wall", "cpu"):
            ours = results[clock]["contenders"][OURS]
            low, high = ours["ratio_to_hand_ci95"]
            results["goal"][clock] = {"met": ours["ratio_to_hand"] <= GOAL, "confirmed": high <= GOAL,
                                      "refuted": low > GOAL}
    return results


def run(replicas: int, rounds: int, steps_per_turn: int, warmup: int,
        names: list[str] | None = None, max_wait_s: float = 120) -> dict[str, Any]:
    """Measure and analyse; what ``peers.json`` holds (``run.py``'s ``peers`` section too).

    ``names``: the contenders to run (default all; the hand loop always runs)."""
    if _find_spec("transformers") is None:  # the model itself
        return {"status": "not run: needs transformers (pip install 'ddp_train[peers]')"}
    wanted = list(names or CONTENDERS)
    runnable, skipped = available(wanted if BASELINE in wanted else [BASELINE, *wanted])
    for name, reason in skipped.items():
        print(f"  skipping {name}: {reason}", flush=True)
    started = time.monotonic()
    replica_results, orders = measure(runnable, replicas, rounds, steps_per_turn, warmup, max_wait_s)
    return {"benchmark": "peers", "workload": workload(), "replicas": replicas, "rounds": rounds,
            "steps_per_turn": steps_per_turn, "timed_steps_per_turn": steps_per_turn - COLD_STEPS,
            "warmup_steps": warmup, "skipped": skipped, "orders": orders,
            "waited_s": round(sum(r["quiet_before"]["waited_s"] for r in replica_results), 1),
            "runtime_s": round(time.monotonic() - started, 1), **analyse(replica_results),
            "replica_runs": replica_results}


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
    """The README table: per contender the median step and its ratio to the hand loop's (wall
    and CPU time), the loop's work between steps and what it adds to the hand loop's, and the
    held-out loss it trained to; then ddp_train against each peer."""
    wall, cpu, between = (results[clock]["contenders"] for clock in ("wall", "cpu", "between"))
    lines = ["| contender | median step, ms (p25 to p75) | ratio to the hand loop (95% CI) | "
             "CPU-time ratio (95% CI) | between steps, ms: median, added (95% CI) | "
             "held-out loss, before → after |", "|---|---|---|---|---|---|"]
    for name, entry in results["contenders"].items():
        step, gap = wall[name]["summary_s"], between[name]
        low, high = gap["added_s_ci95"]
        lines.append(f"| `{name}` | {step['median'] * 1e3:.1f} ({step['p25'] * 1e3:.1f} to "
                     f"{step['p75'] * 1e3:.1f}) | {_with_interval(wall[name])} | "
                     f"{_with_interval(cpu[name])} | {gap['summary_s']['median'] * 1e3:.2f}, "
                     f"{gap['added_s'] * 1e3:+.2f} ({low * 1e3:+.2f} to {high * 1e3:+.2f}) | "
                     f"{entry['loss_before']:.2f} → {entry['loss_after']:.2f} |")
    for name, reason in results["skipped"].items():
        lines.append(f"| `{name}` | skipped: {reason} | | | | |")
    peers = results["wall"]["ours_over_peer"]
    if peers:
        lines += ["", "ddp_train's step over each peer's, wall (CPU time), 95% CI: " + "; ".join(
            f"{peer} {_with_interval(value)} ({_with_interval(results['cpu']['ours_over_peer'][peer])})"
            for peer, value in peers.items()) + "."]
    return "\n".join(lines) + "\n"


def _with_interval(entry: dict[str, Any]) -> str:
    """``ratio (low to high)`` of a ratio entry (``ratio_to_hand`` or ``ratio``, and its ``ci95``)."""
    ratio = entry.get("ratio_to_hand", entry.get("ratio"))
    low, high = entry.get("ratio_to_hand_ci95", entry.get("ci95"))
    return f"{ratio:.3f} ({low:.3f} to {high:.3f})"


def plot(results: dict[str, Any], path: Path) -> Path:
    """Three panels: the median step per contender (whiskers p25 to p75, dots the replicas'
    medians); its ratio to the hand loop's, wall and CPU time, with 95% intervals and the
    goal; and the loop's work between steps (median, whiskers the 95% interval of what it adds
    to the hand loop's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["contenders"])[::-1]
    y = list(range(len(names)))
    wall, between = results["wall"]["contenders"], results["between"]["contenders"]
    colors = ["#1f77b4" if name == OURS else "#7f7f7f" if name.startswith("hand") else "#ff7f0e"
              for name in names]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 0.6 * len(names) + 2.8), dpi=110,
                                              gridspec_kw={"width_ratios": [1.1, 1.1, 0.9]})
    medians = [wall[n]["summary_s"]["median"] * 1e3 for n in names]
    spread = [[m - wall[n]["summary_s"]["p25"] * 1e3 for m, n in zip(medians, names)],
              [wall[n]["summary_s"]["p75"] * 1e3 - m for m, n in zip(medians, names)]]
    left.barh(y, medians, xerr=spread, capsize=4, color=colors, edgecolor="black", linewidth=0.5)
    for index, name in enumerate(names):
        replica_ms = [m * 1e3 for m in wall[name]["median_per_replica_s"]]
        left.scatter(replica_ms, [index] * len(replica_ms), color="black", s=10, zorder=3)
    left.set_xlabel("ms per optimizer step, wall\n(bar: median; whiskers: p25-p75; dots: replicas)")
    for clock, offset, marker in (("wall", 0.12, "o"), ("cpu", -0.12, "s")):
        entries = results[clock]["contenders"]
        ratios = [entries[n]["ratio_to_hand"] for n in names]
        low = [max(r - entries[n]["ratio_to_hand_ci95"][0], 0) for r, n in zip(ratios, names)]
        high = [max(entries[n]["ratio_to_hand_ci95"][1] - r, 0) for r, n in zip(ratios, names)]
        middle.errorbar(ratios, [i + offset for i in y], xerr=[low, high], fmt=marker, capsize=4,
                        color="black" if clock == "wall" else "#2ca02c", label=f"{clock} time")
    middle.axvline(1.0, color="gray", linewidth=0.8)
    middle.axvline(GOAL, color="#d62728", linestyle="--", linewidth=0.8, label=f"goal ≤ {GOAL}")
    middle.set_xlabel("step time / the hand-written loop's\n(95% interval: replicas, then rounds, resampled)")
    middle.legend(fontsize=8)
    hand_gap = between[BASELINE]["summary_s"]["median"] * 1e3
    gaps = [between[n]["summary_s"]["median"] * 1e3 for n in names]
    gap_errors = [[max(g - hand_gap - between[n]["added_s_ci95"][0] * 1e3, 0) for g, n in zip(gaps, names)],
                  [max(between[n]["added_s_ci95"][1] * 1e3 - (g - hand_gap), 0) for g, n in zip(gaps, names)]]
    right.barh(y, gaps, xerr=gap_errors, capsize=4, color=colors, edgecolor="black", linewidth=0.5)
    right.set_xlabel("ms between steps: end of the optimizer step\nto the next forward (whiskers: 95% interval)")
    for ax in (left, middle, right):
        ax.set_yticks(y, names)
        ax.grid(axis="x", alpha=0.3)
    work, machine = results["workload"], results["machine"]
    fig.suptitle(f"{work['model']}, {work['parameters']:,} parameters, {work['batch_per_rank']} × "
                 f"{work['sequence_length']} tokens per rank, {work['world_size']} gloo ranks, fp32; "
                 f"{results['replicas']} replicas × {results['rounds']} rounds × "
                 f"{results['timed_steps_per_turn']} timed steps per contender"
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
    quick, full = PLANS["quick"], PLANS["full"]
    parser.add_argument("--quick", action="store_true",
                        help=f"{quick['replicas']} replicas of {quick['rounds']} rounds (1-2 minutes)")
    parser.add_argument("--replicas", type=int,
                        help=f"fresh process pairs (default {full['replicas']}, --quick {quick['replicas']})")
    parser.add_argument("--rounds", type=int,
                        help=f"rounds per replica (default {full['rounds']}, --quick {quick['rounds']})")
    parser.add_argument("--only", help=f"comma-separated contenders (default: all of "
                                       f"{', '.join(CONTENDERS)}; the hand loop always runs)")
    parser.add_argument("--max-wait", type=float, default=120,
                        help="seconds to wait for a quiet machine before each replica (default 120)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    args = parser.parse_args(argv)
    plan = dict(quick if args.quick else full)
    plan.update({key: value for key, value in (("replicas", args.replicas), ("rounds", args.rounds))
                 if value is not None})
    if plan["replicas"] < 1 or plan["rounds"] < 1:
        parser.error("--replicas and --rounds must be >= 1")
    names = [n.strip() for n in args.only.split(",")] if args.only else list(CONTENDERS)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the frameworks' thread setup in the ranks
    # SIGTERM unwinds like Ctrl-C, so that spawned ranks are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = utc_now()
    with CpuWatch() as watch:
        results = run(**plan, names=names, max_wait_s=args.max_wait)
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
    print(f"wrote {args.out / (stem + '.json')} and {stem}.png in {results['runtime_s']:.0f} s "
          f"({results['waited_s']:.0f} s of it waiting for a quiet machine); other processes took "
          f"{watch.result['others_cores']:.2f} cores meanwhile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
