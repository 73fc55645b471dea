"""``ddp-train plot RUN_DIR``: PNG charts of a run's metrics.jsonl under RUN_DIR/plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from ddp_train.observability.plots import plot_run


def _parser(prog: str) -> argparse.ArgumentParser:
    """The ``plot`` command line."""
    parser = argparse.ArgumentParser(
        prog=f"{prog} plot", description="Draw a run's metrics.jsonl as PNG charts under "
                                         "RUN_DIR/plots: loss (train vs validation, best step "
                                         "marked), the task metric, learning rate, throughput and "
                                         "gradient norm. Needs matplotlib: pip install \"ddp_train[plot]\".")
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path,
                        help="a run directory (<run.output_dir>/<run.name>)")
    return parser


def command(argv: list[str], prog: str) -> int:
    """``plot``: draw the charts and print the path of each PNG written."""
    args = _parser(prog).parse_args(argv)
    for path in plot_run(args.run_dir):
        print(path)
    return 0
