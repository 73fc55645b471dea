"""Overhead of ddp_train's training step over a minimal hand-written DDP loop, and its breakdown.

What is measured, in each of 2 spawned ranks (one intra-op thread each; gloo on CPU):

* ``trainer``: ddp_train's real training path, a :class:`~loops.TrainerLoop` (one
  ``Trainer``, each block one ``fit()`` call of K optimizer steps);
* ``hand``: the minimal hand-written loop (:class:`~loops.HandLoop`) on the same model,
  data, batch, AdamW settings and LR schedule;
* ``hand+<extra>``: the hand loop plus one of ddp_train's per-step additions at a time
  (:data:`loops.EXTRAS`), ``hand-scheduler`` without ``scheduler.step()`` (extra (d)),
  and ``hand+all`` with every addition at once;
* ``hand_twin``: a second, identical hand loop, the A/A control: what it differs from
  ``hand`` by is what this harness cannot tell apart on this machine.

Every variant steps the same objects: the Trainer's own DDP model, AdamW optimizer, LR
scheduler and DataLoader, which the hand-written loops borrow (``HandLoop(borrow=...)``),
so what differs is the code path alone (separately built loops also differ in where
their tensors live). They run in blocks of K steps, all variants once per round, in an order shuffled
every round (the same on both ranks), after a warm-up round; ranks meet at a barrier
before every block. The whole measurement is repeated in R replicas, each a fresh pair
of processes with its own round orders, so what stays put within a process (thread
placement, say) shows in the intervals too. A step's time is the interval between the starts of two
consecutive steps of a block (a :class:`~common.StepClock` on every variant, on the
Trainer as a callback), so it holds data loading, the step and the
loop's own bookkeeping; ``fit()``'s per-call costs (start, end-of-run loss reduction,
``model.pt``/``summary.json``) fall outside the intervals and are reported separately
from whole-block times. Interleaving puts drift of the machine on every variant alike;
medians resist the outliers of a shared machine.

On this 2-vCPU machine the block medians themselves jump between a fast and a slow state
(~1.3 against ~2.4 ms for the tiny model) that lasts for whole blocks, so even the A/A
control reads several per cent off 1 at block level. The **step-by-step comparison**
(:func:`paired_steps`) resolves what blocks cannot: per iteration a short turn of each of
``hand``, ``hand_twin``, ``hand+all`` and the Trainer's own step code (warm-up steps, then
one timed step), in a shuffled order, so neighbouring timed steps share the machine's
state and the median of their differences is the code's cost; ``fit()``'s bookkeeping
between steps (the gap from one step's end to the next one's start) comes from the block
runs.

``overhead_ratio`` = median step of ``trainer`` / median step of ``hand``, all replicas
pooled (the issue's definition). ``overhead_ratio_paired`` = 1 + (paired step difference
+ difference of the between-step gaps) / the hand-written step. An extra's added time = median step of ``hand+extra`` − median step of
``hand``; 95% intervals come from resampling replicas, then whole rounds within them
(:func:`common.paired_bootstrap`). Each extra is also
timed alone in a tight loop (``isolated_us``), which resolves costs far below the noise
of a whole step.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist

from common import (Workload, init_process_group, median, paired_bootstrap, rank_device,
                    shuffled_rounds, spawn_ranks, summarize, synchronize)
from loops import EXTRAS, HandLoop, TrainerLoop
from ddp_train.components.optimizers import WarmupSchedule
from ddp_train.distributed.preemption import PreemptionWatch

GOALS: dict[str, float] = {"tiny_mlp": 1.03, "mid_gpt": 1.01}
"""Upper bounds of ``overhead_ratio`` per workload."""


def variants() -> dict[str, dict[str, Any]]:
    """Variant name -> HandLoop keyword arguments (``trainer`` is the Trainer itself)."""
    table: dict[str, dict[str, Any]] = {"hand": {}, "hand_twin": {},
                                        "hand-scheduler": {"scheduler": False}}
    table.update({f"hand+{extra}": {"extras": (extra,)} for extra in EXTRAS})
    table["hand+all"] = {"extras": tuple(EXTRAS)}
    return table


def _time_per_call(fn: Callable[[], Any], calls: int, batches: int, device: torch.device
                   ) -> float:
    """Median over ``batches`` of the mean time of one of ``calls`` back-to-back calls (µs)."""
    per_call = []
    for _ in range(batches):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    return median(per_call)


def isolated_costs(loop: HandLoop, calls: int, batches: int) -> dict[str, float]:
    """Each extra alone in a tight loop (µs per call), on the loop's real gradients.

    ``preempt_allreduce`` agrees every ``interval`` calls, the interval adapted to calls
    that come back to back, so here it shows its amortised cost per call. ``scheduler_step`` steps a LambdaLR(WarmupSchedule) over a
    throw-away optimizer of the same parameters.
    """
    device = loop.device
    loss = loop.forward_loss()
    loss.backward()
    grads = [p.grad for p in loop.module.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    spare = torch.optim.AdamW(loop.module.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(spare, WarmupSchedule("cosine", 10, 10**6, 0.0,
                                                                        100, 0.1))

    def grad_norm() -> None:
        loop.gradient_norm([p.grad for p in loop.params if p.grad is not None])

    def finite_check() -> None:
        math.isfinite(norm.item())

    def loss_accum() -> None:
        sums.add_(loss.detach())

    costs = {"grad_norm": _time_per_call(grad_norm, calls, batches, device),
             "finite_check": _time_per_call(finite_check, calls, batches, device),
             "loss_accum": _time_per_call(loss_accum, calls, batches, device)}
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        costs["scheduler_step"] = _time_per_call(scheduler.step, calls, batches, device)
    with PreemptionWatch(loop.env) as watch:
        dist.barrier()
        costs["preempt_allreduce"] = _time_per_call(watch.agreed, calls, batches, device)
        watch.drain()
    loop.optimizer.zero_grad(set_to_none=True)
    return costs


PAIRED = ("hand", "hand_twin", "hand+all", "trainer")
"""The loops whose steps are interleaved turn by turn (``paired_steps``)."""

WARM_STEPS = 2
"""Untimed steps that open each turn of :func:`paired_steps`, so that the timed step follows
steps of its own loop, as in a real run, where one loop steps on and on."""


def paired_steps(loops: dict[str, HandLoop | TrainerLoop], iterations: int, seed: int,
                 device: torch.device) -> dict[str, list[float]]:
    """Seconds of single optimizer steps of the :data:`PAIRED` loops: per iteration one turn
    of each loop, in an order shuffled every iteration (the same on every rank); a turn is
    :data:`WARM_STEPS` untimed steps and then the timed one.

    Neighbouring turns share the machine's state, which flips between fast and slow for
    whole blocks of steps here, so the difference of two loops' timed steps in the same
    iteration resolves microseconds that block medians cannot. Without the warm steps a
    loop's code would run cold after three others, which costs the Trainer (more code
    than a hand loop) tens of µs that no real run pays. The Trainer's step is its public
    ``train_step`` on the next ``step_batches()`` (``fit()``'s bookkeeping between steps is
    measured from the block runs instead); the hand loops' steps leave out the preemption
    extra.
    """
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in PAIRED}
    for _ in range(iterations):
        order = list(PAIRED)
        rng.shuffle(order)
        for name in order:
            loop = loops[name]
            for _ in range(WARM_STEPS):
                loop.step()
            synchronize(device)
            start = time.perf_counter()
            loop.step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def _measure_workload(workload: Workload, rank: int, world_size: int, device: torch.device,
                      steps_per_block: int, rounds: int, output_dir: str, replica: int,
                      pairs: int) -> dict[str, Any]:
    dataset = workload.build_dataset(world_size)
    total_steps = steps_per_block * (rounds + 1)
    # DDP also at world size 1 (one GPU): the hand-written loops borrow its DDP model.
    trainer = TrainerLoop(workload, dataset, device, output_dir, f"overhead_{workload.name}",
                          total_steps, ["train.strategy=ddp"])
    loops: dict[str, HandLoop | TrainerLoop] = {
        name: HandLoop(workload, dataset, device, rank, world_size, total_steps, **kwargs,
                       borrow=trainer.trainer)
        for name, kwargs in variants().items()}
    loops["trainer"] = trainer
    names = list(loops)
    intervals: dict[str, list[list[float]]] = {name: [] for name in names}
    gaps: dict[str, list[list[float]]] = {name: [] for name in names}
    blocks: dict[str, list[float]] = {name: [] for name in names}
    for index, order in enumerate([names] + shuffled_rounds(names, rounds, seed=replica)):
        for name in order:
            loop = loops[name]
            dist.barrier()
            synchronize(device)
            start = time.perf_counter()
            loop.run(steps_per_block)
            synchronize(device)
            seconds = time.perf_counter() - start
            between = loop.clock.gaps()
            steps = loop.clock.intervals()
            if index > 0:  # round 0 is the warm-up
                intervals[name].append(steps)
                gaps[name].append(between)
                blocks[name].append(seconds)
    dist.barrier()
    paired = paired_steps(loops, pairs, replica, device)
    isolated = None
    if replica == 0:  # tight loops resolve microseconds in one replica already
        hand_loop = loops["hand+all"]
        assert isinstance(hand_loop, HandLoop)
        isolated = isolated_costs(hand_loop, calls=200 if workload.kind == "gpt" else 1000, batches=9)
    for loop in loops.values():
        loop.close()
    return {"intervals_s": intervals, "gaps_s": gaps, "blocks_s": blocks, "paired_s": paired,
            "isolated_us": isolated, "steps_per_block": steps_per_block, "rounds": rounds}


def _rank_main(rank: int, world_size: int, device_type: str,
               plan: list[tuple[Workload, int, int, int]], replica: int) -> dict[str, Any] | None:
    device = rank_device(device_type, rank)
    init_process_group(rank, world_size, device)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ddp_bench_runs_") as tmp:
        for workload, steps_per_block, rounds, pairs in plan:
            results[workload.name] = _measure_workload(workload, rank, world_size, device,
                                                       steps_per_block, rounds, tmp, replica, pairs)
    dist.barrier()
    dist.destroy_process_group()
    return results if rank == 0 else None


def analyse(workload: Workload, replicas: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians, the overhead ratio, and the added time of every extra (rank 0's samples of
    every replica, pooled)."""
    names = list(replicas[0]["intervals_s"])
    intervals = {name: [block for raw in replicas for block in raw["intervals_s"][name]]
                 for name in names}
    blocks_s = {name: [block for raw in replicas for block in raw["blocks_s"][name]] for name in names}
    clusters = [index for index, raw in enumerate(replicas) for _ in raw["intervals_s"]["hand"]]
    isolated: dict[str, float] = replicas[0]["isolated_us"]
    flat = {name: [x for block in rounds for x in block] for name, rounds in intervals.items()}
    med = {name: median(values) for name, values in flat.items()}
    hand, trainer = med["hand"], med["trainer"]

    def ratio(a: list[float], b: list[float]) -> float:
        return median(a) / median(b)

    def added(a: list[float], b: list[float]) -> float:
        return (median(a) - median(b)) * 1e6

    breakdown: dict[str, dict[str, Any]] = {}
    rows = [(extra, f"hand+{extra}", "hand", description) for extra, description in EXTRAS.items()]
    rows.insert(3, ("scheduler_step", "hand", "hand-scheduler",
                    "(d) scheduler.step() of LambdaLR(WarmupSchedule); in both loops"))
    rows.append(("all_extras", "hand+all", "hand", "(a)+(b)+(c)+(e)+(f) together"))
    rows.append(("rest_of_trainer", "trainer", "hand+all",
                 "what the Trainer adds beyond them: to_device, precision wrappers, fit's loop "
                 "bookkeeping"))
    rows.append(("a_a_control", "hand_twin", "hand",
                 "A/A control: a second, identical hand-written loop (true difference 0)"))
    for key, with_it, without, description in rows:
        low, high = paired_bootstrap(intervals[with_it], intervals[without], added, clusters=clusters)
        breakdown[key] = {"description": description, "with": with_it, "without": without,
                          "added_us": (med[with_it] - med[without]) * 1e6,
                          "added_pct_of_hand_step": (med[with_it] - med[without]) / hand * 100,
                          "ci95_us": [low, high],
                          "isolated_us": isolated.get(key)}
    steps = replicas[0]["steps_per_block"]
    block_med = {name: median(values) for name, values in blocks_s.items()}

    def _outside_steps(name: str) -> float:
        """Median time per block spent outside its K steps (the K−1 intervals scaled to K)."""
        return median([block - sum(block_intervals) * steps / (steps - 1)
                       for block, block_intervals in zip(blocks_s[name], intervals[name])])

    def replica_ratio(raw: dict[str, Any], name: str) -> float:
        def pooled(variant: str) -> list[float]:
            return [x for block in raw["intervals_s"][variant] for x in block]
        return median(pooled(name)) / median(pooled("hand"))

    paired = paired_analysis(replicas)
    ratio_ci = paired_bootstrap(intervals["trainer"], intervals["hand"], ratio, clusters=clusters)
    null_ci = paired_bootstrap(intervals["hand_twin"], intervals["hand"], ratio, clusters=clusters)
    return {
        "workload": workload.describe(),
        "steps_per_block": steps, "rounds": replicas[0]["rounds"], "replicas": len(replicas),
        "intervals_per_variant": len(flat["hand"]),
        "step_s": {name: summarize(values) for name, values in flat.items()},
        "samples_s": intervals,
        "blocks_s": blocks_s,
        "overhead_ratio": trainer / hand,
        "overhead_ratio_ci95": list(ratio_ci),
        "overhead_ratio_per_replica": [replica_ratio(raw, "trainer") for raw in replicas],
        # Two identical loops: how far apart this harness puts equal code (ideally 1).
        "a_a_ratio": med["hand_twin"] / hand,
        "a_a_ratio_ci95": list(null_ci),
        "a_a_ratio_per_replica": [replica_ratio(raw, "hand_twin") for raw in replicas],
        "goal": GOALS.get(workload.name),
        "goal_met": trainer / hand <= GOALS[workload.name] if workload.name in GOALS else None,
        # Met with 95% confidence: the whole interval below the goal.
        "goal_confirmed": ratio_ci[1] <= GOALS[workload.name] if workload.name in GOALS else None,
        # Whole fit() calls of K steps against K hand steps: adds fit()'s per-call costs.
        "fit_block_ratio": block_med["trainer"] / block_med["hand"],
        "fit_call_fixed_cost_s": _outside_steps("trainer") - _outside_steps("hand"),
        "breakdown": breakdown,
        "paired": paired,
        "overhead_ratio_paired": paired["overhead_ratio"],
        "overhead_ratio_paired_ci95": paired["overhead_ratio_ci95"],
    }


def paired_analysis(replicas: list[dict[str, Any]]) -> dict[str, Any]:
    """The step-by-step comparison: medians of same-iteration differences, and the ratio.

    ``overhead_ratio`` = 1 + (the Trainer's step − the hand-written step, paired) + (the
    Trainer's median gap between steps in ``fit()`` − the hand loop's, from the block runs),
    over the hand-written step plus its gap. Its interval adds the two parts' interval
    ends (conservative: as if they never cancelled).
    """
    clusters = [index for index, raw in enumerate(replicas) for _ in raw["paired_s"]["hand"]]
    steps = {name: [[x] for raw in replicas for x in raw["paired_s"][name]] for name in PAIRED}

    def difference(a: list[float], b: list[float]) -> float:
        return median([x - y for x, y in zip(a, b)]) * 1e6

    def flat(name: str) -> list[float]:
        return [x for (x,) in steps[name]]

    comparisons = {"trainer_vs_hand": ("trainer", "hand"), "extras": ("hand+all", "hand"),
                   "rest_of_trainer_step": ("trainer", "hand+all"), "a_a_control": ("hand_twin", "hand")}
    out: dict[str, Any] = {"iterations": len(clusters), "warm_steps": WARM_STEPS, "step_s": {n: summarize(flat(n)) for n in PAIRED}}
    for key, (a, b) in comparisons.items():
        out[key] = {"with": a, "without": b, "added_us": difference(flat(a), flat(b)),
                    "ci95_us": list(paired_bootstrap(steps[a], steps[b], difference, clusters=clusters))}
    gap_rounds = {name: [block for raw in replicas for block in raw["gaps_s"][name]]
                  for name in ("trainer", "hand")}
    gap_clusters = [index for index, raw in enumerate(replicas) for _ in raw["gaps_s"]["hand"]]
    gap_med = {name: median([x for block in rounds for x in block]) for name, rounds in gap_rounds.items()}
    out["loop_bookkeeping"] = {
        "trainer_gap_us": gap_med["trainer"] * 1e6, "hand_gap_us": gap_med["hand"] * 1e6,
        "added_us": (gap_med["trainer"] - gap_med["hand"]) * 1e6,
        "ci95_us": list(paired_bootstrap(
            gap_rounds["trainer"], gap_rounds["hand"],
            lambda a, b: (median(a) - median(b)) * 1e6, clusters=gap_clusters))}
    hand_total = median(flat("hand")) * 1e6 + out["loop_bookkeeping"]["hand_gap_us"]
    added = out["trainer_vs_hand"]["added_us"] + out["loop_bookkeeping"]["added_us"]
    low = out["trainer_vs_hand"]["ci95_us"][0] + out["loop_bookkeeping"]["ci95_us"][0]
    high = out["trainer_vs_hand"]["ci95_us"][1] + out["loop_bookkeeping"]["ci95_us"][1]
    out.update({"hand_step_us": hand_total, "added_us": added,
                "overhead_ratio": 1 + added / hand_total,
                "overhead_ratio_ci95": [1 + low / hand_total, 1 + high / hand_total]})
    return out


def run(workloads: list[tuple[Workload, int, int, int]], device_type: str = "cpu",
        world_size: int = 2, replicas: int = 1) -> dict[str, Any]:
    """Measure every ``(workload, steps_per_block, rounds, paired iterations)`` in
    ``replicas`` fresh process groups; the analysed results by name."""
    raws = [spawn_ranks(_rank_main, world_size, device_type, workloads, replica)[0]
            for replica in range(replicas)]
    return {workload.name: analyse(workload, [raw[workload.name] for raw in raws])
            for workload, *_ in workloads}
