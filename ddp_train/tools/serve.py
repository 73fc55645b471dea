"""``ddp-train serve PATH``: the command line of the model server (:mod:`ddp_train.tools.serving`).

This module imports neither torch nor the server's libraries: ``serve --help`` and a
missing extra are answered before anything heavy loads, and the onnxruntime backend
serves without torch. A run directory that has not been exported is exported first, by
``ddp-train export`` in a child process, so that the server itself stays torch-free.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from ddp_train.extras import require
from ddp_train.tools.manifest import is_unexported_run

log = logging.getLogger("ddp_train")


def _parser(prog: str) -> argparse.ArgumentParser:
    """The ``serve`` command line."""
    parser = argparse.ArgumentParser(
        prog=f"{prog} serve", description="Serve an exported model over HTTP: POST /predict "
        "{\"inputs\": [...]} (one example or a batch; {\"inputs\": {\"input_ids\": [...], "
        "\"attention_mask\": [...]}} names each input of a model with several), GET /healthz, "
        "/readyz and /metrics (Prometheus: requests, latency, batch sizes, model version, input "
        "drift against the training data). Inputs are checked against manifest.json. A run "
        "directory that has not been exported is exported first. Needs: "
        "pip install \"ddp_train[serve]\"; the onnxruntime backend does not load torch. "
        "Trust: exporting a run directory imports and runs the factories its config.yaml names, "
        "and --backend torch loads model.pt2, which may unpickle objects: serve only run and "
        "export directories you made or trust.")
    parser.add_argument("path", metavar="PATH", type=Path,
                        help="an export directory, or a run directory (exported first if it has "
                             "not been)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch"),
                        help="run model.onnx with onnxruntime (default) or model.pt2 with torch "
                             "(which may unpickle: trusted exports only)")
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
    parser.add_argument("--drift-min-samples", type=int, default=100, metavar="N",
                        help="requests summed before the drift gauges move, so that no scrape "
                             "reveals fewer requests' inputs (default 100)")
    parser.add_argument("--max-concurrency", type=int, default=64, metavar="N",
                        help="connections and requests at once; beyond, 503 (default 64)")
    parser.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="an idle kept-alive connection is closed after this (default 5)")
    parser.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="a request body not received within this is refused, 408 (default 30)")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="on SIGTERM, how long requests in flight may take to finish (default 10)")
    return parser


def export_first(run_dir: Path, backend: str, int8: bool) -> int:
    """``ddp-train export RUN_DIR`` for the file ``backend`` serves, in a child process; its exit code.

    The child reports its own errors (one line); this process never imports torch.
    """
    formats = ["--format", "exported"] if backend == "torch" else ["--format", "onnx"]
    argv = ["export", str(run_dir), *formats, *(["--quantize", "int8"] if int8 else [])]
    log.warning("%s has not been exported yet: exporting it first (ddp-train %s)", run_dir, " ".join(argv))
    return subprocess.run([sys.executable, "-m", "ddp_train", *argv], stdin=subprocess.DEVNULL).returncode


def command(argv: list[str], prog: str) -> int:
    """``serve``: serve until interrupted (SIGINT/SIGTERM), then return 0."""
    args = _parser(prog).parse_args(argv)
    require(("fastapi", "uvicorn", "prometheus_client"), "serve", "ddp-train serve")
    # fastapi and onnxruntime load only when serving.
    from ddp_train.tools.serving import ServeOptions, check_options, serve

    options = ServeOptions(args.path, args.host, args.port, args.backend, args.int8, args.max_batch,
                           args.max_body_bytes, args.threads, args.drift_window, args.drift_min_samples,
                           args.max_concurrency, args.keep_alive_timeout, args.body_timeout,
                           args.shutdown_timeout)
    check_options(options)  # a bad option: exit 2 before minutes of exporting
    if is_unexported_run(args.path):
        code = export_first(args.path, args.backend, args.int8)
        if code != 0:
            return code
    serve(options)
    return 0
