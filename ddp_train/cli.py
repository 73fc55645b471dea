"""Command line: ``python -m ddp_train [SUBCOMMAND] [--config FILE] [KEY=VALUE ...]``.

Exit codes (DESIGN.md): 0 success (early stopping included), 1 training failed,
2 usage or config error. Expected failures print one clear message, not a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from pathlib import Path
from typing import Callable

from ddp_train.config import config_to_yaml, load_config
from ddp_train.errors import ConfigError, ExportFailed, TrainingFailed
from ddp_train.extras import require
from ddp_train.observability.plots import plot_run

log = logging.getLogger("ddp_train")

EPILOG = """\
KEY=VALUE overrides use dotted keys and YAML values, e.g.
  train.max_steps=50 optim.lr=3e-4 model.args.hidden_sizes=[256,256]
They win over the --config file, which wins over the defaults.
Every key with its default and description: --print-config."""


def _train_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{prog} train", description="Train a model (DDP under torchrun or srun).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML config file")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def train_command(argv: list[str], prog: str) -> int:
    """``train``: the default subcommand."""
    args = _train_parser(prog).parse_args(argv)
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


def plot_command(argv: list[str], prog: str) -> int:
    """``plot``: PNG charts of a run's metrics.jsonl under RUN_DIR/plots."""
    parser = argparse.ArgumentParser(
        prog=f"{prog} plot", description="Draw a run's metrics.jsonl as PNG charts under "
                                         "RUN_DIR/plots: loss (train vs validation, best step "
                                         "marked), the task metric, learning rate, throughput and "
                                         "gradient norm. Needs matplotlib: pip install \"ddp_train[plot]\".")
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path,
                        help="a run directory (<run.output_dir>/<run.name>)")
    args = parser.parse_args(argv)
    for path in plot_run(args.run_dir):
        print(path)
    return 0


def sweep_command(argv: list[str], prog: str) -> int:
    """``sweep``: Optuna hyperparameter search, each trial a training run (ddp_train.tools.sweep)."""
    from ddp_train.tools.sweep import sweep_command as run_sweep

    return run_sweep(argv, prog)


def lr_find_command(argv: list[str], prog: str) -> int:
    """``lr-find``: an exponential learning-rate range test (ddp_train.tools.lr_find)."""
    from ddp_train.tools.lr_find import lr_find_command as run_lr_find

    return run_lr_find(argv, prog)


def cv_command(argv: list[str], prog: str) -> int:
    """``cv``: k-fold cross-validation, one training run per fold (ddp_train.tools.cross_validation)."""
    from ddp_train.tools.cross_validation import cv_command as run_cv

    return run_cv(argv, prog)


def export_command(argv: list[str], prog: str) -> int:
    """``export``: ONNX, torch.export and TorchScript files of a run's model, checked against it."""
    parser = argparse.ArgumentParser(
        prog=f"{prog} export", description="Export a finished run's model (config.yaml + model.pt) "
        "with a dynamic batch axis, check every file against the model on real validation batches "
        "(a difference over the tolerance fails, exit 1), and write manifest.json: input/output "
        "names, shapes and dtypes, checksums, the differences, the task and the training inputs' "
        "mean/std for drift monitoring. ONNX needs: pip install \"ddp_train[export]\".")
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a finished run directory")
    parser.add_argument("--format", default="all", choices=("onnx", "exported", "torchscript", "all"),
                        help="model.onnx (torch.onnx, dynamo), model.pt2 (torch.export), model.ts "
                             "(torch.jit.trace, legacy) or all three (default)")
    parser.add_argument("--quantize", choices=("int8",),
                        help="also write model.int8.onnx (onnxruntime dynamic quantization) and "
                             "report its size and validation metrics against fp32")
    parser.add_argument("--prune", type=float, metavar="AMOUNT",
                        help="first zero this fraction of each Linear/Conv weight (L1 unstructured, "
                             "permanent) and report validation metrics before and after")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output directory (default RUN_DIR/export)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest absolute difference from the model allowed (default 1e-4)")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help="example batch size (default: the run's validation batch size)")
    args = parser.parse_args(argv)
    from ddp_train.tools.export import FORMATS, ExportRequest, export_run  # torch: only when exporting

    request = ExportRequest(args.run_dir, args.out or args.run_dir / "export",
                            FORMATS if args.format == "all" else (args.format,), args.quantize,
                            args.prune, args.tolerance, args.batch_size)
    export_run(request)
    print(request.out_dir)
    return 0


def serve_command(argv: list[str], prog: str) -> int:
    """``serve``: an HTTP model server for an exported model (FastAPI on uvicorn)."""
    parser = argparse.ArgumentParser(
        prog=f"{prog} serve", description="Serve an exported model over HTTP: POST /predict "
        "{\"inputs\": [...]} (one example or a batch), GET /healthz, /readyz and /metrics "
        "(Prometheus: requests, latency, batch sizes, model version, input drift against the "
        "training data). Inputs are checked against manifest.json. Needs: "
        "pip install \"ddp_train[serve]\"; the onnxruntime backend does not load torch.")
    parser.add_argument("path", metavar="PATH", type=Path,
                        help="an export directory or a run directory exported with 'export'")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch"),
                        help="run model.onnx with onnxruntime (default) or model.pt2 with torch")
    parser.add_argument("--int8", action="store_true",
                        help="serve model.int8.onnx (export --quantize int8; onnxruntime only)")
    parser.add_argument("--max-batch", type=int, default=256, metavar="N",
                        help="largest batch one request may send (default 256)")
    parser.add_argument("--max-body-bytes", type=int, default=8 << 20, metavar="BYTES",
                        help="largest request body accepted (default 8 MiB)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="intra-op threads per inference; requests run in parallel (default 1)")
    parser.add_argument("--drift-window", type=int, default=1000, metavar="N",
                        help="examples the running input mean for drift spans (default 1000)")
    args = parser.parse_args(argv)
    require(("fastapi", "uvicorn", "prometheus_client"), "serve", "ddp-train serve")
    from ddp_train.tools.serving import ServeOptions, serve  # fastapi, onnxruntime: only when serving

    serve(ServeOptions(args.path, args.host, args.port, args.backend, args.int8, args.max_batch,
                       args.max_body_bytes, args.threads, args.drift_window))


def convert_command(argv: list[str], prog: str) -> int:
    """``convert``: a sharded (FSDP) checkpoint directory into a single-file checkpoint."""
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
    args = parser.parse_args(argv)
    from ddp_train.checkpoint.sharded import convert_to_file  # heavy: only when converting

    print(convert_to_file(args.checkpoint, args.out))
    return 0


SUBCOMMANDS: dict[str, tuple[Callable[[list[str], str], int], str]] = {
    "train": (train_command, "train a model (the default)"),
    "plot": (plot_command, "draw a run's metrics as PNG charts"),
    "sweep": (sweep_command, "hyperparameter search with Optuna (trials are training runs)"),
    "lr-find": (lr_find_command, "learning-rate range test: suggests optim.lr"),
    "cv": (cv_command, "k-fold cross-validation, one training run per fold"),
    "export": (export_command, "export a run's model to ONNX, torch.export and TorchScript"),
    "serve": (serve_command, "serve an exported model over HTTP with Prometheus metrics"),
    "convert": (convert_command, "turn a sharded (FSDP) checkpoint into a single file"),
}


def _top_help(prog: str) -> str:
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
    """Run a subcommand and return the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # The model server runs without torch (onnxruntime backend): it has no launcher
        # ranks and no torchelastic error file, whose helpers would import torch.
        return _run(argv, prog, rank=0)
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
    command, _ = SUBCOMMANDS[name]
    try:
        return command(argv, prog)
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
        first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return (f"lost contact with another rank, which died or hung ({first_line[:300]}); "
                f"the job stops")
    return None
