"""``ddp-train serve PATH``: an exported model behind FastAPI on uvicorn, with Prometheus metrics.

Endpoints:

* ``POST /predict`` with ``{"inputs": [...]}`` (a model with one input) or ``{"inputs":
  {"input_ids": [...], "attention_mask": [...]}}`` (each input by name, any model): one
  example (the manifest's input shape without the batch axis) or a batch of them →
  ``{"outputs": [...], "predictions": [...]}`` (predictions: the argmax class for
  classification and language models, the outputs otherwise; unbatched for one example).
  The body is parsed and checked here, against the manifest, rather than by a pydantic
  model: every bad request gets a 4xx whose ``error`` says what was expected, naming the
  input — 400 malformed JSON, 408 a body that does not arrive in time, 413 body or batch
  too large, 422 wrong keys, type, shape (a dynamic axis too long, inputs disagreeing on
  a shared axis) or non-finite numbers. Parsing, the model and encoding the answer run on
  worker threads, never on the event loop. A failure of the model is a 500 with a
  generic body and an id; the exception's text goes to the server log only.
* ``GET /healthz`` (the process answers), ``GET /readyz`` (the model is loaded and
  answered a warm-up batch), ``GET /metrics`` (Prometheus text format; input drift only
  as aggregates over windows of at least ``--drift-min-samples`` requests).

uvicorn runs with a limit on concurrent connections and requests (503 beyond it) and
keep-alive, body and shutdown timeouts.

The onnxruntime backend does not import torch (nor does this module, nor the
``ddp_train`` modules it imports), so a server starts in about a second and needs a
fraction of the memory; the torch backend runs ``model.pt2`` with ``torch.export``.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ddp_train.errors import UsageError, first_line
from ddp_train.extras import require
from ddp_train.tools.manifest import find_export_dir, format_file, read_manifest
from ddp_train.tools.serving_inputs import BadRequest, ModelInputs

log = logging.getLogger("ddp_train")

ENDPOINTS = ("/predict", "/healthz", "/readyz", "/metrics")
PER_FEATURE_DRIFT_LIMIT = 64
"""Models with at most this many input features get a drift gauge per feature (else summaries only)."""
MAX_TIMEOUT_S = 86400.0
"""The longest timeout an option takes (a day): beyond, a typo rather than a choice."""
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]


@dataclass
class ServeOptions:
    """What ``ddp-train serve`` was asked for."""

    path: Path
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "onnxruntime"
    int8: bool = False
    max_batch: int = 256
    max_body_bytes: int = 8 << 20
    threads: int = 1
    drift_window: int = 1000
    drift_min_samples: int = 100
    """Requests summed into one published drift update (no gauge reflects fewer)."""
    max_concurrency: int = 64
    keep_alive_timeout: float = 5.0
    body_timeout: float = 30.0
    shutdown_timeout: float = 10.0


# ---------------------------------------------------------------------------------------
# Backends


class Backend(Protocol):
    """What runs the model: :class:`OnnxBackend`, or the torch backend of :mod:`.serving_torch`."""

    def run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """The model's output for ``batch`` (its inputs by name)."""


class OnnxBackend:
    """An ONNX file run with onnxruntime on the CPU; no torch."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # Requests run in parallel on a thread pool; one intra-op thread each avoids
        # oversubscribing the cores.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """The model's first output for ``batch``."""
        return self.session.run(None, batch)[0]


# ---------------------------------------------------------------------------------------
# Metrics


class DriftMonitor:
    """Input drift against the training inputs' mean and std, published only in aggregates.

    Features are the elements of a flattened example of each input the manifest has
    statistics for (the inputs of one fixed shape). Requests are summed into a window;
    when it holds ``min_requests`` requests, its mean is folded into the published
    running mean — over all windows until ``window`` examples have been folded, then
    exponentially weighted with that span, so it follows a shift in what clients send —
    and the window starts again. Between two folds nothing published moves: two scrapes
    around one request say nothing about that request's inputs, only about the mean of
    at least ``min_requests`` requests. Drift per feature is the z-score of the running
    mean, ``(mean - train_mean) / train_std``; features constant in the training data
    (std 0) are left out.
    """

    def __init__(self, stats: dict[str, dict[str, Any]], window: int, min_requests: int) -> None:
        self.inputs = list(stats)
        self.labels = [(name, str(index)) for name in self.inputs for index in range(len(stats[name]["mean"]))]
        self.train_mean = np.asarray([m for name in self.inputs for m in stats[name]["mean"]], dtype=np.float64)
        std = np.asarray([s for name in self.inputs for s in stats[name]["std"]], dtype=np.float64)
        self.varying = std > 0
        self.train_std = np.where(self.varying, std, 1.0)
        self.window = window
        self.min_requests = min_requests
        self.mean = np.zeros_like(self.train_mean)
        self.samples = 0  # examples folded into the published mean
        self.pending_sum = np.zeros_like(self.train_mean)
        self.pending_samples = self.pending_requests = 0
        # Requests are answered on worker threads; scrapes read on the event loop.
        self.lock = threading.Lock()

    def update(self, batch: dict[str, np.ndarray]) -> None:
        """Add one request's inputs to the window; fold the window in once it is full."""
        if not self.inputs:
            return
        examples = len(batch[self.inputs[0]])
        flat = np.concatenate([batch[name].reshape(examples, -1) for name in self.inputs], axis=1)
        total = flat.sum(axis=0, dtype=np.float64)
        with self.lock:
            self.pending_sum += total
            self.pending_samples += examples
            self.pending_requests += 1
            if self.pending_requests >= self.min_requests:
                self._fold()

    def _fold(self) -> None:
        """The window's mean into the published running mean (the lock held)."""
        count = self.pending_samples
        self.samples += count
        weight = count / min(self.samples, max(self.window, count))
        self.mean += weight * (self.pending_sum / count - self.mean)
        self.pending_sum[:] = 0.0
        self.pending_samples = self.pending_requests = 0

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Prometheus gauges, computed when scraped rather than on every request."""
        with self.lock:
            samples, mean = self.samples, self.mean.copy()
        yield CounterMetricFamily("ddp_serve_input_samples", "Examples folded into the published "
                                  "running input mean (whole windows of --drift-min-samples requests)",
                                  value=samples)
        if not self.inputs:
            return
        z = np.where(self.varying & (samples > 0), (mean - self.train_mean) / self.train_std, 0.0)
        varying = np.abs(z[self.varying]) if self.varying.any() else np.zeros(1)
        yield GaugeMetricFamily("ddp_serve_input_drift_mean_abs_z",
                                "Mean over features of |running input mean - training mean| / "
                                "training std", value=float(varying.mean()))
        yield GaugeMetricFamily("ddp_serve_input_drift_max_abs_z",
                                "Largest |z| of the running input mean over features",
                                value=float(varying.max()))
        if len(z) <= PER_FEATURE_DRIFT_LIMIT:
            family = GaugeMetricFamily("ddp_serve_input_drift_z", "z-score of the running input "
                                       "mean per feature", labels=["input", "feature"])
            for labels, value in zip(self.labels, z):
                family.add_metric(list(labels), float(value))
            yield family


class ServerMetrics:
    """The server's Prometheus registry (its own, so that several apps can share a process)."""

    def __init__(self, max_batch: int, drift: DriftMonitor) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ddp_serve_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("ddp_serve_request_duration_seconds", "Time to answer a request",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        buckets = sorted({2 ** i for i in range(max_batch.bit_length())} | {max_batch})
        self.batch_size = Histogram("ddp_serve_batch_size", "Examples per accepted /predict request",
                                    buckets=buckets, registry=self.registry)
        self.model = Info("ddp_serve_model", "The model served: file, checksum, format, backend, export time",
                          registry=self.registry)
        self.registry.register(drift)  # type: ignore[arg-type]

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every response by endpoint and status and times it (a plain ASGI wrapper).

    Paths other than the known endpoints share one label, so a scan of random URLs does
    not create unbounded series.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


# ---------------------------------------------------------------------------------------
# The app


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes,
    and with 408 when it has not all arrived within ``timeout`` seconds (a client that
    trickles a body would otherwise hold its connection and its slot for ever)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body of {declared} bytes is over this server's limit of "
                              f"{limit} bytes (--max-body-bytes)")
    chunks, size = [], 0
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # no or a false Content-Length: stop reading at the limit
                    raise BadRequest(413, f"request body is over this server's limit of {limit} bytes "
                                          f"(--max-body-bytes)")
                chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest(400, "the client disconnected before sending the whole body") from None
    except TimeoutError:
        raise BadRequest(408, f"the request body did not arrive within {timeout:g} s (--body-timeout)") from None
    return b"".join(chunks)


def load_backend(directory: Path, manifest: dict[str, Any], options: ServeOptions
                 ) -> tuple[Backend, Path]:
    """The backend ``options`` ask for, on the file the manifest vouches for."""
    if options.backend == "onnxruntime":
        require(("onnxruntime",), "serve", "the onnxruntime backend", "--backend")
        path = format_file(directory, manifest, "onnx_int8" if options.int8 else "onnx",
                           "--int8" if options.int8 else "--backend")
        return OnnxBackend(path, options.threads), path
    require(("torch",), "serve", "the torch backend", "--backend")
    from ddp_train.tools.serving_torch import TorchBackend  # torch: only for this backend

    path = format_file(directory, manifest, "exported", "--backend")
    return TorchBackend(path, [entry["name"] for entry in manifest["inputs"]], options.threads), path


def check_options(options: ServeOptions) -> None:
    """Usage errors (exit 2) for option values, before anything is loaded."""
    if options.int8 and options.backend != "onnxruntime":
        raise UsageError("--int8", "the int8 model is an ONNX file: use --backend onnxruntime")
    for option, value in (("--max-batch", options.max_batch), ("--max-body-bytes", options.max_body_bytes),
                          ("--threads", options.threads), ("--drift-window", options.drift_window),
                          ("--drift-min-samples", options.drift_min_samples),
                          ("--max-concurrency", options.max_concurrency)):
        if value < 1:
            raise UsageError(option, f"expected at least 1, got {value}")
    for option, seconds in (("--keep-alive-timeout", options.keep_alive_timeout),
                            ("--body-timeout", options.body_timeout),
                            ("--shutdown-timeout", options.shutdown_timeout)):
        if not 0 < seconds <= MAX_TIMEOUT_S:
            raise UsageError(option, f"expected seconds in (0, {MAX_TIMEOUT_S}], got {seconds!r}")


def create_app(options: ServeOptions) -> FastAPI:
    """The FastAPI app for the export ``options.path`` names, its model loaded and warmed up.

    Raises UsageError for a missing or inconsistent export (before any port is bound).
    """
    check_options(options)
    directory = find_export_dir(options.path)
    manifest = read_manifest(directory)
    inputs = ModelInputs(manifest, options.max_batch)
    backend, model_path = load_backend(directory, manifest, options)
    classify = manifest["task"] in ("classification", "language_model")
    drift = DriftMonitor(manifest["input_stats"], options.drift_window, options.drift_min_samples)
    metrics = ServerMetrics(options.max_batch, drift)
    fmt = "onnx_int8" if options.int8 else ("onnx" if options.backend == "onnxruntime" else "exported")
    model_info = {"file": model_path.name, "sha256": manifest["formats"][fmt]["sha256"],
                  "format": fmt, "backend": options.backend, "task": manifest["task"],
                  "exported_utc": str(manifest.get("created_utc", "")),
                  "source_model_sha256": str(manifest.get("source", {}).get("model_sha256", ""))}
    metrics.model.info(model_info)
    # A warm-up batch proves the model runs before the server reports ready.
    backend.run(inputs.warm_up_batch())
    state = {"ready": False}

    def answer(body: bytes) -> bytes:
        """One /predict request, parsed, checked, run and encoded: on a worker thread, so that
        a large body keeps neither the event loop nor /healthz waiting."""
        batch, single = inputs.parse(body)
        metrics.batch_size.observe(len(next(iter(batch.values()))))
        drift.update(batch)
        outputs = backend.run(batch)
        predictions = outputs.argmax(axis=-1) if classify else outputs
        if single:
            outputs, predictions = outputs[0], predictions[0]
        return json.dumps({"outputs": outputs.tolist(), "predictions": predictions.tolist()},
                          allow_nan=False, separators=(",", ":")).encode()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        state["ready"] = True
        yield
        state["ready"] = False  # draining: load balancers stop sending

    app = FastAPI(title="ddp_train model server", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 404/405 bodies do not say what exists.
        return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}; this "
                                      f"server has POST /predict, GET /healthz, /readyz, /metrics"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        body = await read_body(request, options.max_body_bytes, options.body_timeout)
        try:
            return Response(await run_in_threadpool(answer, body), media_type="application/json")
        except BadRequest:
            raise
        except Exception as exc:  # a server-side failure on validated input: 500, and keep serving
            # The exception's text can hold the model's internals or another request's
            # data: the client gets an id to quote, the log gets the detail.
            incident = uuid.uuid4().hex[:12]
            log.error("request %s: the model failed: %s: %s", incident, type(exc).__name__, first_line(exc))
            return JSONResponse({"error": f"internal error: the model could not answer (request "
                                          f"{incident}; the server log has the details)"}, status_code=500)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if not state["ready"]:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready", "model": model_info})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(MetricsMiddleware, metrics=metrics)  # type: ignore[arg-type]
    return app


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``; a port in use or a bad address is a usage error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except (OSError, OverflowError) as exc:
        raise UsageError("--port", f"cannot listen on {host}:{port}: "
                                   f"{getattr(exc, 'strerror', None) or exc}") from None
    return sock


def serve(options: ServeOptions) -> None:
    """Load the model, bind the port, and serve until interrupted (SIGINT/SIGTERM)."""
    import uvicorn

    app = create_app(options)
    sock = _listen(options.host, options.port)
    host, port = sock.getsockname()[:2]
    log.info("serving %s with %s on http://%s:%d (POST /predict, GET /healthz /readyz /metrics)",
             options.path, options.backend, host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            # Beyond this many connections and requests, new requests get 503
                            # at once: a flood cannot grow memory (each may hold a large body).
                            limit_concurrency=options.max_concurrency,
                            timeout_keep_alive=options.keep_alive_timeout,
                            timeout_graceful_shutdown=options.shutdown_timeout)
    uvicorn.Server(config).run(sockets=[sock])
