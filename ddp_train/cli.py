"""Command line: ``python -m ddp_train [SUBCOMMAND] [--config FILE] [KEY=VALUE ...]``.

This module only dispatches: each subcommand lives in its own module, imported when it
runs, so a subcommand never pays for another's imports (``serve`` starts without torch).

Exit codes: 0 success (early stopping included), 1 training failed, 2 usage or config
error. Expected failures print one clear message, not a traceback.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import sys

from ddp_train.distributed.signals import keep_handlers_until_exit
from ddp_train.errors import ConfigError, ExportFailed, TrainingFailed, UsageError, first_line

log = logging.getLogger("ddp_train")

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ddp_train.tools.train", "train a model (the default)"),
    "plot": ("ddp_train.tools.plot", "draw a run's metrics as PNG charts"),
    "sweep": ("ddp_train.tools.sweep", "hyperparameter search with Optuna (trials are training runs)"),
    "lr-find": ("ddp_train.tools.lr_find", "learning-rate range test: suggests optim.lr"),
    "cv": ("ddp_train.tools.cross_validation", "k-fold cross-validation, one training run per fold"),
    "export": ("ddp_train.tools.export", "export a run's model to ONNX, torch.export and TorchScript"),
    "serve": ("ddp_train.tools.serve", "serve an exported model over HTTP with Prometheus metrics"),
    "convert": ("ddp_train.tools.convert", "turn a sharded (FSDP) checkpoint into a single file"),
}
"""Each subcommand: the module whose ``command(argv, prog) -> int`` runs it, and its help line."""


def _top_help(prog: str) -> str:
    """``--help`` without a subcommand: the subcommands, then how overrides are written."""
    from ddp_train.tools.train import EPILOG  # train's help ends the same way

    commands = "\n".join(f"  {name:<10} {text}" for name, (_, text) in SUBCOMMANDS.items())
    return (f"usage: {prog} [SUBCOMMAND] [--config FILE] [--print-config] [KEY=VALUE ...]\n\n"
            f"Distributed PyTorch training; runs alike with python, torchrun and srun.\n\n"
            f"subcommands:\n{commands}\n\n"
            f"'{prog} SUBCOMMAND --help' describes one.\n\n{EPILOG}\n")


def _configure_logging(rank: int) -> None:
    """Rank 0 reports progress; other ranks only warnings, tagged with their rank."""
    handler = logging.StreamHandler(sys.stderr)
    tag = f"[rank {rank}] " if rank > 0 else ""
    handler.setFormatter(logging.Formatter(f"{tag}%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


def main(argv: list[str] | None = None, prog: str = "ddp-train") -> int:
    """Run a subcommand and return the process exit code.

    Without ``argv`` this is the process's entry point (``ddp-train``, ``python -m
    ddp_train``), which ends when the command does.
    """
    process_entry = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # The model server runs without torch (onnxruntime backend): it has no launcher
        # ranks and no torchelastic error file, whose helpers would import torch.
        return _run(argv, prog, rank=0)
    if process_entry:
        # A SIGTERM after a run's end (Slurm and torchrun both signal) must not make it exit 143.
        keep_handlers_until_exit()
    from torch.distributed.elastic.multiprocessing.errors import record

    from ddp_train.distributed.environment import read_launch_info

    return record(_run)(argv, prog, read_launch_info().rank)


def _run(argv: list[str], prog: str, rank: int) -> int:
    """Dispatch ``argv`` to its subcommand; expected failures become one line and an exit code."""
    _configure_logging(rank)
    if argv and argv[0] in ("-h", "--help"):
        print(_top_help(prog), end="")
        return 0
    name = "train"
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        name = argv.pop(0)
        if name not in SUBCOMMANDS:
            close = difflib.get_close_matches(name, SUBCOMMANDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            print(f"{prog}: unknown subcommand {name!r}{hint} (one of: {', '.join(SUBCOMMANDS)})",
                  file=sys.stderr)
            return 2
    module_name, _ = SUBCOMMANDS[name]
    try:
        # Imported inside the try: an interrupt during a slow import (torch) is one line too.
        return importlib.import_module(module_name).command(argv, prog)
    except UsageError as exc:
        if rank == 0:  # every rank reads the same command line: one message is enough
            print(f"{prog}: usage error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        if rank == 0:  # every rank reads the same config: one message is enough
            print(f"{prog}: config error: {exc}", file=sys.stderr)
        return 2
    except ExportFailed as exc:
        print(f"{prog}: export failed: {exc}", file=sys.stderr)
        return 1
    except TrainingFailed as exc:
        if rank == 0 or not exc.shared:
            print(f"{prog}: training failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    except Exception as exc:
        lost_peer = _lost_peer_message(exc)
        if lost_peer is None:
            raise  # a bug or an error in user code: the traceback is what helps
        print(f"{prog}: rank {rank}: {lost_peer}", file=sys.stderr)
        return 1


def _lost_peer_message(exc: Exception) -> str | None:
    """A one-line message when ``exc`` means another rank died or hung, else None."""
    import torch.distributed as dist

    text = str(exc)
    peer_words = ("Connection closed by peer", "Connection reset by peer", "Timed out",
                  "timed out", "Broken pipe", "NCCL communicator was aborted")
    if isinstance(exc, dist.DistError) or any(word in text for word in peer_words):
        return f"lost contact with another rank, which died or hung ({first_line(exc)}); the job stops"
    return None
