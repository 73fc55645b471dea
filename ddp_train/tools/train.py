"""``ddp-train [train]``: train a model as the config says (the default subcommand)."""

from __future__ import annotations

import argparse
import logging

from ddp_train.config import config_to_yaml, load_config

log = logging.getLogger("ddp_train")

EPILOG = """\
KEY=VALUE overrides use dotted keys and YAML values, e.g.
  train.max_steps=50 optim.lr=3e-4 model.args.hidden_sizes=[256,256]
They win over the --config file, which wins over the defaults.
Every key with its default and description: --print-config."""
"""How overrides are written: the end of ``train --help`` and of the top-level help."""


def _parser(prog: str) -> argparse.ArgumentParser:
    """The ``train`` command line."""
    parser = argparse.ArgumentParser(
        prog=f"{prog} train", description="Train a model (DDP under torchrun or srun).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML config file")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def command(argv: list[str], prog: str) -> int:
    """``train``: fit the configured model, then log how the run ended."""
    args = _parser(prog).parse_args(argv)
    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    from ddp_train.training.trainer import Trainer, describe  # heavy: only when training

    with Trainer(config) as trainer:
        log.info(describe(trainer))
        summary = trainer.fit()
    final = ", ".join(f"{k} {v:.4g}" for k, v in summary["final"].items() if isinstance(v, float))
    log.info("%s after %d steps in %.1f s%s | %s", summary["status"], summary["global_step"],
             summary["wall_time_s"], f" | {final}" if final else "", config.run_dir)
    return 0
