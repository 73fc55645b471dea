"""``ddp-train serve PATH``: the command line of the model server (:mod:`ddp_train.tools.serving`).

This module imports neither torch nor the server's libraries: ``serve --help`` and a
missing extra are answered before anything heavy loads, and the onnxruntime backend
serves without torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ddp_train.extras import require


def _parser(prog: str) -> argparse.ArgumentParser:
    """The ``serve`` command line."""
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
    return parser


def command(argv: list[str], prog: str) -> int:
    """``serve``: serve until interrupted (SIGINT/SIGTERM), then return 0."""
    args = _parser(prog).parse_args(argv)
    require(("fastapi", "uvicorn", "prometheus_client"), "serve", "ddp-train serve")
    from ddp_train.tools.serving import ServeOptions, serve  # fastapi, onnxruntime: only when serving

    serve(ServeOptions(args.path, args.host, args.port, args.backend, args.int8, args.max_batch,
                       args.max_body_bytes, args.threads, args.drift_window))
    return 0
