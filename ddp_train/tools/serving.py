"""``ddp-train serve PATH``: an exported model behind FastAPI on uvicorn, with Prometheus metrics.

Endpoints:

* ``POST /predict`` with ``{"inputs": [...]}``: one example (the manifest's input shape
  without the batch axis) or a batch of them → ``{"outputs": [...], "predictions": [...]}``
  (predictions: the argmax class for classification and language models, the outputs
  otherwise; unbatched for one example). The body is parsed and checked here, against
  the manifest, rather than by a pydantic model: every bad request gets a 4xx whose
  ``error`` says what was expected — 400 malformed JSON, 413 body or batch too large,
  422 wrong keys, type, shape or non-finite numbers.
* ``GET /healthz`` (the process answers), ``GET /readyz`` (the model is loaded and
  answered a warm-up batch), ``GET /metrics`` (Prometheus text format).

The onnxruntime backend does not import torch (nor does this module, nor the
``ddp_train`` modules it imports), so a server starts in about a second and needs a
fraction of the memory; the torch backend runs ``model.pt2`` with ``torch.export``.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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

log = logging.getLogger("ddp_train")

ENDPOINTS = ("/predict", "/healthz", "/readyz", "/metrics")
PER_FEATURE_DRIFT_LIMIT = 64
"""Inputs with at most this many features get a drift gauge per feature (else summaries only)."""
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


class BadRequest(Exception):
    """A request the server refuses: its HTTP status and a message naming what was expected."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------
# Input validation


class InputSpec:
    """The input the manifest describes, and the parsing of request bodies against it."""

    def __init__(self, manifest: dict[str, Any], max_batch: int) -> None:
        self.example_shape = tuple(int(d) for d in manifest["input"]["shape"][1:])
        self.dtype = np.dtype(manifest["input"]["dtype"])
        self.integers = self.dtype.kind in "iu"
        self.range: list[int] | None = None
        if self.integers:
            # Token ids index an embedding: outside its range the model itself would fail.
            info = np.iinfo(self.dtype)
            self.range = manifest["input"].get("range") or [int(info.min), int(info.max)]
        self.max_batch = max_batch

    def _shape_text(self) -> str:
        """The accepted input shapes, for error messages."""
        one = list(self.example_shape)
        return f"{one} for one example or [N, {', '.join(map(str, one))}] for a batch of N ≤ {self.max_batch}"

    def parse(self, body: bytes) -> tuple[np.ndarray, bool]:
        """The batch a body carries, as the model's dtype, and whether it was one example."""
        if not body.strip():
            raise BadRequest(400, 'request body is empty; expected JSON {"inputs": [...]}')
        try:
            payload = json.loads(body, parse_constant=_reject_constant)
        except _NonFinite as exc:
            raise BadRequest(422, f"inputs: expected finite numbers, got {exc}") from None
        except RecursionError:
            raise BadRequest(400, "request body is nested too deeply to parse") from None
        except ValueError as exc:  # UnicodeDecodeError included
            raise BadRequest(400, f'request body is not valid JSON ({exc}); expected {{"inputs": [...]}}') from None
        if not isinstance(payload, dict) or "inputs" not in payload:
            got = "an object without 'inputs'" if isinstance(payload, dict) else f"a JSON {_json_type(payload)}"
            raise BadRequest(422, f'expected a JSON object {{"inputs": [...]}}, got {got}')
        extra = sorted(set(payload) - {"inputs"})
        if extra:
            raise BadRequest(422, f"unexpected key {extra[0]!r}; the body holds only 'inputs'")
        return self._array(payload["inputs"], body)

    def _array(self, inputs: Any, body: bytes) -> tuple[np.ndarray, bool]:
        """``inputs`` checked against the manifest, as an array; and whether it was one example."""
        expected = f"{'integers' if self.integers else 'numbers'} ({self.dtype.name})"
        if not isinstance(inputs, list):
            raise BadRequest(422, f"inputs: expected a (nested) list of {expected} of shape "
                                  f"{self._shape_text()}, got a JSON {_json_type(inputs)}")
        if not inputs:
            raise BadRequest(422, f"inputs: expected at least one example of shape "
                                  f"{list(self.example_shape)}, got an empty list")
        try:
            array = np.asarray(inputs)
        except (ValueError, RecursionError):
            raise BadRequest(422, f"inputs: expected a rectangular array of shape {self._shape_text()}, "
                                  f"but its rows differ in length or depth") from None
        # numpy turns a mix of booleans and numbers into numbers without a word. In a body
        # whose only key is "inputs" and whose inputs hold no strings (else the dtype is not
        # numeric), a true/false token is exactly such a boolean: a regex finds it fast.
        if array.dtype.kind not in ("iu" if self.integers else "iuf") or _BOOLEAN.search(body):
            bad = _first_non_number(inputs, integers=self.integers)
            if bad is not None:
                where, value = bad
                raise BadRequest(422, f"inputs: expected {expected}, got {_describe(value)} at {where}")
            if array.dtype.kind not in "iuf":  # every leaf a number, yet no numeric array
                raise BadRequest(422, f"inputs: expected {expected} that fit in {self.dtype.name}")
        single = array.shape == self.example_shape
        if not single and array.shape[1:] != self.example_shape:
            raise BadRequest(422, f"inputs: expected shape {self._shape_text()}, got {list(array.shape)}")
        batch = array[None] if single else array
        if len(batch) > self.max_batch:
            raise BadRequest(413, f"inputs: a batch of {len(batch)} examples is over this server's "
                                  f"limit of {self.max_batch} (--max-batch); split it")
        if self.range is not None:
            low, high = self.range
            outside = (array < low) | (array > high)
            if outside.any():
                where = [int(i) for i in np.argwhere(outside)[0]] if array.ndim else []
                raise BadRequest(422, f"inputs: expected integers in [{low}, {high}] (the model's input "
                                      f"range), got {int(array[tuple(where)])} at {where}")
            return batch.astype(self.dtype, copy=False), single
        converted = batch.astype(self.dtype)
        if not np.isfinite(converted).all():
            where = [int(i) for i in np.argwhere(~np.isfinite(converted))[0]]
            if single:
                where = where[1:]
            value = float(array[tuple(where)])
            beyond = f" (beyond {self.dtype.name}'s range)" if np.isfinite(value) else ""
            raise BadRequest(422, f"inputs: expected finite {self.dtype.name} numbers, got "
                                  f"{value!r}{beyond} at {where}")
        return converted, single


_BOOLEAN = re.compile(rb"\b(?:true|false)\b")


class _NonFinite(ValueError):
    """NaN or Infinity in the body (JSON has no such numbers; Python's parser accepts them)."""


def _reject_constant(name: str) -> Any:
    """``json.loads``' hook for NaN and ±Infinity: refuse them."""
    raise _NonFinite(name)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _describe(value: Any) -> str:
    """A short description of a value that is not a valid input number, for error messages."""
    kind = _json_type(value)
    if isinstance(value, int) and kind == "number":
        return f"the integer {value} (out of range)"
    if kind == "number":
        return f"the non-integer {value!r}"
    text = json.dumps(value)
    return f"a {kind} ({text[:40]}{'...' if len(text) > 40 else ''})"


_INT64_MIN, _INT64_MAX = -2 ** 63, 2 ** 63 - 1


def _first_non_number(value: Any, integers: bool) -> tuple[list[int], Any] | None:
    """The index path and value of the first leaf that is not a number (or not an integer).

    numpy would silently turn ``true`` into 1 and ``"1.5"`` into 1.5 in some mixes,
    hence the walk over the parsed JSON itself.
    """
    stack: list[tuple[list[int], Any]] = [([], value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, list):
            stack.extend((where + [i], child) for i, child in reversed(list(enumerate(item))))
        elif (type(item) is int and _INT64_MIN <= item <= _INT64_MAX) or (type(item) is float and not integers):
            continue
        else:
            return where, item
    return None


# ---------------------------------------------------------------------------------------
# Backends


class Backend(Protocol):
    """What runs the model: :class:`OnnxBackend`, or the torch backend of :mod:`.serving_torch`."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The model's output for ``batch``."""


class OnnxBackend:
    """An ONNX file run with onnxruntime on the CPU; no torch."""

    def __init__(self, path: Path, input_name: str, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # Requests run in parallel on a thread pool; one intra-op thread each avoids
        # oversubscribing the cores.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = input_name

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The model's first output for ``batch``."""
        return self.session.run(None, {self.input_name: batch})[0]


# ---------------------------------------------------------------------------------------
# Metrics


class DriftMonitor:
    """Running mean of the served inputs against the training inputs' mean and std.

    The mean is over all inputs until ``window`` samples have been seen, then
    exponentially weighted with that window, so it follows a shift in what clients send.
    Drift per feature is the z-score of the running mean, ``(mean - train_mean) /
    train_std``; features constant in the training data (std 0) are left out.
    """

    def __init__(self, stats: dict[str, Any], window: int) -> None:
        self.train_mean = np.asarray(stats["mean"], dtype=np.float64)
        std = np.asarray(stats["std"], dtype=np.float64)
        self.varying = std > 0
        self.train_std = np.where(self.varying, std, 1.0)
        self.window = window
        self.mean = np.zeros_like(self.train_mean)
        self.samples = 0

    def update(self, batch: np.ndarray) -> None:
        """Fold a batch of inputs into the running mean."""
        flat = batch.reshape(len(batch), -1)
        self.samples += len(flat)
        weight = len(flat) / min(self.samples, max(self.window, len(flat)))
        self.mean += weight * (flat.mean(axis=0, dtype=np.float64) - self.mean)

    def z_scores(self) -> np.ndarray:
        """Per feature z-score of the running mean (0 where the training std was 0)."""
        return np.where(self.varying, (self.mean - self.train_mean) / self.train_std, 0.0)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Prometheus gauges, computed when scraped rather than on every request."""
        z = np.abs(self.z_scores()) if self.samples else np.zeros_like(self.mean)
        varying = z[self.varying] if self.varying.any() else np.zeros(1)
        yield CounterMetricFamily("ddp_serve_input_samples", "Examples folded into the running "
                                  "input mean", value=self.samples)
        yield GaugeMetricFamily("ddp_serve_input_drift_mean_abs_z",
                                "Mean over features of |running input mean - training mean| / "
                                "training std", value=float(varying.mean()))
        yield GaugeMetricFamily("ddp_serve_input_drift_max_abs_z",
                                "Largest |z| of the running input mean over features",
                                value=float(varying.max()))
        if len(z) <= PER_FEATURE_DRIFT_LIMIT:
            family = GaugeMetricFamily("ddp_serve_input_drift_z", "z-score of the running input "
                                       "mean per feature", labels=["feature"])
            for index, value in enumerate(self.z_scores() if self.samples else z):
                family.add_metric([str(index)], float(value))
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


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body of {declared} bytes is over this server's limit of "
                              f"{limit} bytes (--max-body-bytes)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # no or a false Content-Length: stop reading at the limit
                raise BadRequest(413, f"request body is over this server's limit of {limit} bytes "
                                      f"(--max-body-bytes)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest(400, "the client disconnected before sending the whole body") from None
    return b"".join(chunks)


def load_backend(directory: Path, manifest: dict[str, Any], options: ServeOptions
                 ) -> tuple[Backend, Path]:
    """The backend ``options`` ask for, on the file the manifest vouches for."""
    if options.backend == "onnxruntime":
        require(("onnxruntime",), "serve", "the onnxruntime backend", "--backend")
        path = format_file(directory, manifest, "onnx_int8" if options.int8 else "onnx",
                           "--int8" if options.int8 else "--backend")
        return OnnxBackend(path, manifest["input"]["name"], options.threads), path
    if options.int8:
        raise UsageError("--int8", "the int8 model is an ONNX file: use --backend onnxruntime")
    require(("torch",), "serve", "the torch backend", "--backend")
    from ddp_train.tools.serving_torch import TorchBackend  # torch: only for this backend

    path = format_file(directory, manifest, "exported", "--backend")
    return TorchBackend(path, options.threads), path


def create_app(options: ServeOptions) -> FastAPI:
    """The FastAPI app for the export ``options.path`` names, its model loaded and warmed up.

    Raises UsageError for a missing or inconsistent export (before any port is bound).
    """
    if options.max_batch < 1:
        raise UsageError("--max-batch", f"expected at least 1, got {options.max_batch}")
    for option, value in (("--max-body-bytes", options.max_body_bytes), ("--threads", options.threads),
                          ("--drift-window", options.drift_window)):
        if value < 1:
            raise UsageError(option, f"expected at least 1, got {value}")
    directory = find_export_dir(options.path)
    manifest = read_manifest(directory)
    spec = InputSpec(manifest, options.max_batch)
    backend, model_path = load_backend(directory, manifest, options)
    classify = manifest["task"] in ("classification", "language_model")
    drift = DriftMonitor(manifest["input_stats"], options.drift_window)
    metrics = ServerMetrics(options.max_batch, drift)
    fmt = "onnx_int8" if options.int8 else ("onnx" if options.backend == "onnxruntime" else "exported")
    model_info = {"file": model_path.name, "sha256": manifest["formats"][fmt]["sha256"],
                  "format": fmt, "backend": options.backend, "task": manifest["task"],
                  "exported_utc": str(manifest.get("created_utc", "")),
                  "source_model_sha256": str(manifest.get("source", {}).get("model_sha256", ""))}
    metrics.model.info(model_info)
    # A warm-up batch proves the model runs before the server reports ready.
    backend.run(np.zeros((1, *spec.example_shape), dtype=spec.dtype))
    state = {"ready": False}
    global POOL
    import concurrent.futures, multiprocessing
    POOL = concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context('forkserver'))

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
    async def predict(request: Request) -> JSONResponse:
        import asyncio
        batch, single = await asyncio.get_running_loop().run_in_executor(POOL, spec.parse, await read_body(request, options.max_body_bytes))
        drift.update(batch)
        metrics.batch_size.observe(len(batch))
        try:
            outputs = await run_in_threadpool(backend.run, batch)
        except Exception as exc:  # a server-side failure on validated input: 500, and keep serving
            message = first_line(exc)
            log.error("the model failed on a batch of %d: %s", len(batch), message)
            return JSONResponse({"error": f"the model failed on these inputs: {message}"}, status_code=500)
        predictions = outputs.argmax(axis=-1) if classify else outputs
        if single:
            outputs, predictions = outputs[0], predictions[0]
        return JSONResponse({"outputs": outputs.tolist(), "predictions": predictions.tolist()})

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
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
