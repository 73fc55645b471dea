"""``ddp-train convert CHECKPOINT_DIR``: a sharded (FSDP) checkpoint as one checkpoint file.

The file holds full tensors, so any strategy at any world size resumes from it
(``checkpoint.resume=FILE``). It runs in one process, without a launcher or process group.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ddp_train.checkpoint.sharded import sharded_to_single_file
from ddp_train.checkpoint.single_file import save_file
from ddp_train.errors import UsageError


def convert_to_file(checkpoint: Path, out: Path | None = None) -> Path:
    """Write sharded ``checkpoint`` as one file (default: ``<checkpoint>.pt``); returns its path.

    The file is written atomically and is an ordinary single-file checkpoint.
    """
    if not checkpoint.is_dir():
        reason = "is a file" if checkpoint.exists() else "does not exist"
        raise UsageError("CHECKPOINT_DIR", f"expected a sharded checkpoint directory, got "
                                           f"{str(checkpoint)!r} ({reason})")
    target = out if out is not None else checkpoint.with_name(checkpoint.name + ".pt")
    if target.is_dir():
        raise UsageError("--out", f"expected a file name, got the directory {str(target)!r}")
    try:
        state = sharded_to_single_file(checkpoint)
    except ValueError as exc:
        raise UsageError("CHECKPOINT_DIR", f"checkpoint {str(checkpoint)!r} {exc}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, target)
    return target


def _parser(prog: str) -> argparse.ArgumentParser:
    """The ``convert`` command line."""
    parser = argparse.ArgumentParser(
        prog=f"{prog} convert", description="Turn a sharded checkpoint directory (written with "
                                            "train.strategy=fsdp) into one checkpoint file with full "
                                            "tensors, which any strategy and world size resumes from "
                                            "(checkpoint.resume=FILE). Runs in one process, no "
                                            "launcher needed; it holds the whole model and optimizer "
                                            "state in memory.")
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", type=Path,
                        help="a sharded checkpoint, e.g. runs/NAME/checkpoints/step_00000100")
    parser.add_argument("--out", metavar="FILE", type=Path,
                        help="the file to write (default: CHECKPOINT_DIR.pt, next to the directory)")
    return parser


def command(argv: list[str], prog: str) -> int:
    """``convert``: write the file and print its path."""
    args = _parser(prog).parse_args(argv)
    print(convert_to_file(args.checkpoint, args.out))
    return 0
