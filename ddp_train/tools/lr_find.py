"""``ddp-train lr-find``: an exponential learning-rate range test.

The configured model, data, optimizer and loss are built exactly as for training (by the
:class:`~ddp_train.training.trainer.Trainer`, at any world size, DDP included), then trained for
``--num-steps`` steps while the LR grows exponentially from ``--start-lr`` to
``--end-lr``. Each step's loss is averaged over micro-batches and ranks, smoothed with an
exponential moving average (bias-corrected, factor 0.98), and the test stops early once
the smoothed loss exceeds 4× its minimum or a loss is not finite (divergence).

Suggestion rule: the LR where the smoothed loss falls fastest, i.e. the minimum of
d(smoothed loss)/d(log LR), searched between the first 10% of the steps (the average is
still settling there) and the step with the lowest smoothed loss (after it, the loss
climbs towards divergence). It sits well below the LR of the lowest loss, which is
already at the edge of instability.

Nothing of the user's run directory is touched except ``lr_find.json`` and ``lr_find.png``:
the model is trained in a scratch copy of the config and thrown away.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddp_train.checkpoint.atomic import atomic_write_json
from ddp_train.config import TrainConfig, format_override, load_config
from ddp_train.errors import TrainingFailed, UsageError
from ddp_train.observability.plots import new_chart, save_chart

log = logging.getLogger("ddp_train")

SMOOTHING = 0.98
DIVERGENCE_FACTOR = 4.0
SKIP_START_FRACTION = 0.1


def _parser(prog: str) -> argparse.ArgumentParser:
    """The ``lr-find`` command line."""
    parser = argparse.ArgumentParser(
        prog=f"{prog} lr-find",
        description="Learning-rate range test: train the configured model for --num-steps steps "
                    "with an LR growing exponentially from --start-lr to --end-lr, stop when the "
                    "loss diverges, and suggest the LR where the smoothed loss falls fastest. "
                    "Writes <run_dir>/lr_find.json and lr_find.png; runs under torchrun too.",
        epilog="KEY=VALUE overrides use dotted keys, as for training.")
    parser.add_argument("--config", metavar="FILE", help="YAML config file")
    parser.add_argument("--start-lr", type=float, default=1e-7, help="first LR (default 1e-7)")
    parser.add_argument("--end-lr", type=float, default=10.0, help="last LR (default 10)")
    parser.add_argument("--num-steps", type=int, default=100, help="optimizer steps (default 100)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def lr_schedule(start_lr: float, end_lr: float, num_steps: int) -> list[float]:
    """``num_steps`` LRs growing geometrically from ``start_lr`` to ``end_lr``."""
    ratio = end_lr / start_lr
    return [start_lr * ratio ** (i / (num_steps - 1)) for i in range(num_steps)]


def suggest(lrs: list[float], smoothed: list[float]) -> float | None:
    """The LR of the steepest descent of ``smoothed`` over log LR (see the module docstring)."""
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    start = max(1, int(len(smoothed) * SKIP_START_FRACTION))
    if lowest - start < 2:
        return None
    import numpy as np

    window = slice(start, lowest + 1)
    slopes = np.gradient(np.asarray(smoothed[window]), np.log(np.asarray(lrs[window])))
    steepest = int(np.argmin(slopes))
    return float(lrs[start + steepest]) if slopes[steepest] < 0 else None


@dataclass
class RangeTest:
    """The losses of a range test, one per LR tried (fewer than asked when it diverged)."""

    losses: list[float]
    smoothed: list[float]
    world_size: int
    is_main: bool


def run_range_test(config: TrainConfig, lrs: list[float]) -> RangeTest:
    """Train a scratch copy of ``config`` through ``lrs`` until the loss diverges.

    Every rank gets the same (all-reduced) losses and hence stops at the same step.
    """
    from ddp_train.training.trainer import Trainer  # heavy: only when testing

    scratch = copy.deepcopy(config)
    scratch.logging.progress = "none"
    scratch.logging.system_metrics = False
    scratch.logging.tensorboard = False
    scratch.logging.csv = False
    # A non-finite step is skipped on every rank (and ends the test) instead of failing the run.
    scratch.train.nonfinite = "skip"
    scratch.train.max_nonfinite_skips = 2
    scratch.profile.enabled = False
    losses: list[float] = []
    smoothed: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ddp_train_lr_find_") as scratch_dir:
        # The trainer writes its run files here, never into the user's run directory.
        scratch.run.output_dir = scratch_dir
        with Trainer(scratch) as trainer:
            batches = trainer.step_batches()
            average, best = 0.0, math.inf
            for i, lr in enumerate(lrs):
                for group in trainer.optimizer.param_groups:
                    group["lr"] = lr
                trainer.train_step(next(batches))
                # Read after every step, the window holds that step alone: its mean over all
                # ranks, or None when every rank skipped it as non-finite. A collective, so
                # every rank reads it every step and all of them stop at the same one.
                loss = trainer.mean_train_loss()
                if loss is None or not math.isfinite(loss):
                    break
                average = SMOOTHING * average + (1 - SMOOTHING) * loss
                value = average / (1 - SMOOTHING ** (i + 1))
                losses.append(loss)
                smoothed.append(value)
                best = min(best, value)
                if value > DIVERGENCE_FACTOR * best:
                    break
            return RangeTest(losses, smoothed, trainer.env.world_size, trainer.env.is_main)


def command(argv: list[str], prog: str) -> int:
    """``lr-find``: run the range test and write lr_find.json/png on rank 0."""
    args = _parser(prog).parse_args(argv)
    config = load_config(args.config, args.overrides)
    if not (args.start_lr > 0 and math.isfinite(args.start_lr)):
        raise UsageError("--start-lr", f"expected a number > 0, got {args.start_lr}")
    if not (args.end_lr > args.start_lr and math.isfinite(args.end_lr)):
        raise UsageError("--end-lr", f"expected a number > --start-lr ({args.start_lr}), got {args.end_lr}")
    if args.num_steps < 5:
        raise UsageError("--num-steps", f"expected an integer >= 5, got {args.num_steps}")
    lrs = lr_schedule(args.start_lr, args.end_lr, args.num_steps)
    test = run_range_test(config, lrs)
    if not test.is_main:  # rank 0 writes and reports
        return 0
    losses, smoothed = test.losses, test.smoothed
    if not losses:
        raise TrainingFailed(f"the loss was not finite at the first step (lr {args.start_lr:g}); "
                             f"lower --start-lr")
    suggested = suggest(lrs[:len(losses)], smoothed)
    diverged = len(losses) < len(lrs)
    result: dict[str, Any] = {
        "lrs": lrs[:len(losses)], "losses": losses, "smoothed_losses": smoothed,
        "suggested_lr": suggested, "diverged_at_lr": lrs[len(losses)] if diverged else None,
        "start_lr": args.start_lr, "end_lr": args.end_lr, "num_steps": args.num_steps,
        "world_size": test.world_size,
        "rule": "steepest descent of the smoothed loss over log LR, between the first 10% of "
                "the steps and the lowest smoothed loss",
    }
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "lr_find.json", result)
    png = _plot(run_dir / "lr_find.png", result)
    where = f"{run_dir / 'lr_find.json'}" + (f", {png}" if png else "")
    if suggested is None:
        raise TrainingFailed(f"no suggestion: the smoothed loss did not fall over the range "
                             f"{args.start_lr:g}..{lrs[len(losses) - 1]:g} ({where}); widen the "
                             f"range or add steps")
    use = format_override("optim.lr", float(f"{suggested:.3g}"))
    print(f"suggested learning rate: {suggested:.3g}   use: {use}")
    log.info("%d steps%s | %s", len(losses),
             f", diverged at lr {result['diverged_at_lr']:.3g}" if diverged else "", where)
    return 0


def _plot(path: Path, result: dict[str, Any]) -> Path | None:
    """Loss against LR (log scale) with the suggestion marked; None without matplotlib."""
    try:
        figure, axes = new_chart("Learning-rate range test", "learning rate", "training loss")
    except ImportError:
        log.warning('lr_find.png skipped: it needs matplotlib (pip install "ddp_train[plot]")')
        return None
    axes.plot(result["lrs"], result["losses"], color="tab:blue", alpha=0.3, label="loss")
    axes.plot(result["lrs"], result["smoothed_losses"], color="tab:blue", label="smoothed loss")
    suggested = result["suggested_lr"]
    if suggested is not None:
        axes.axvline(suggested, color="red", linestyle="--", linewidth=1)
        index = result["lrs"].index(suggested)
        axes.plot([suggested], [result["smoothed_losses"][index]], marker="o", color="red",
                  linestyle="none", label=f"suggested lr {suggested:.3g}")
    axes.set_xscale("log")
    return save_chart(figure, axes, path)
