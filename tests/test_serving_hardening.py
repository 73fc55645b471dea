"""The model server under hostile or careless clients, for real: ``python -m ddp_train serve``
processes on loopback, spoken to with the standard library (raw sockets where a client
misbehaves on purpose).

What is proven: the drift gauges reveal no single request's inputs; a large, slow body
does not hold up ``/healthz``; connections beyond ``--max-concurrency`` get 503; a body
that does not arrive within ``--body-timeout`` gets 408; an idle kept-alive connection is
closed after ``--keep-alive-timeout``.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require_modules
from ddp_train.cli import main
from ddp_train.config import config_to_yaml, load_config

require_modules("onnx", "onnxscript", "onnxruntime", "fastapi", "uvicorn", "prometheus_client")

import user_components  # noqa: E402
from http_server import Client, Samples, Server, scrape  # noqa: E402

FEATURES = 8


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLP (seeded, untrained: serving does not care) exported to ONNX."""
    run_dir = tmp_path_factory.mktemp("hardening") / "mlp"
    run_dir.mkdir()
    config = load_config(None, ["model.name=user_components:wide_mlp", "data.name=synthetic_classification",
                                f"data.args.n_features={FEATURES}", "data.args.n_classes=3",
                                "data.args.n_samples=256", "model.args.hidden=16"])
    (run_dir / "config.yaml").write_text(config_to_yaml(config))
    torch.manual_seed(0)
    torch.save(user_components.wide_mlp(in_features=FEATURES, out_features=3, hidden=16).state_dict(),
               run_dir / "model.pt")
    assert main(["export", str(run_dir), "--format", "onnx"]) == 0
    return run_dir / "export"


def _server(export_dir: Path, *options: str) -> Iterator[Server]:
    server = Server([str(export_dir), *options], export_dir)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(export_dir: Path) -> Iterator[Server]:
    """Drift published per window of 5 requests, its running mean over all of them."""
    yield from _server(export_dir, "--drift-min-samples", "5", "--drift-window", "1000000")


@pytest.fixture(scope="module")
def strict_server(export_dir: Path) -> Iterator[Server]:
    """Two connections at most, one second for a body and for an idle kept-alive connection."""
    yield from _server(export_dir, "--max-concurrency", "2", "--body-timeout", "1", "--keep-alive-timeout", "1")


def _drift(samples: Samples) -> Samples:
    """The samples that describe the served inputs."""
    return {key: value for key, value in samples.items() if key[0].startswith("ddp_serve_input_")}


def test_drift_gauges_move_only_once_a_window_of_requests_is_complete(export_dir: Path, server: Server) -> None:
    stats = json.loads((export_dir / "manifest.json").read_text())["input_stats"]["input"]
    generator = np.random.default_rng(0)
    client = Client(server.port)
    sent = []
    before = _drift(scrape(server.port))
    assert before[("ddp_serve_input_samples_total", ())] == 0
    for request in range(1, 5):  # a window is 5 requests: the first 4 publish nothing
        batch = generator.normal(2.0, 1.0, (request, FEATURES))
        sent.append(batch)
        assert client.predict({"inputs": batch.tolist()})[0] == 200
        # Two scrapes around one request: nothing about it shows.
        assert _drift(scrape(server.port)) == before, request
    sent.append(generator.normal(2.0, 1.0, (3, FEATURES)))
    assert client.predict({"inputs": sent[-1].tolist()})[0] == 200
    published = _drift(scrape(server.port))
    # The window is complete: the gauges show the mean of its 13 examples, and only that.
    window = np.concatenate(sent).astype(np.float32).astype(np.float64)
    assert published[("ddp_serve_input_samples_total", ())] == len(window) == 13
    expected_z = (window.mean(0) - np.array(stats["mean"])) / np.array(stats["std"])
    got_z = [published[("ddp_serve_input_drift_z", (("feature", str(i)), ("input", "input")))]
             for i in range(FEATURES)]
    np.testing.assert_allclose(got_z, expected_z, rtol=1e-9, atol=1e-9)
    assert published[("ddp_serve_input_drift_max_abs_z", ())] == pytest.approx(np.abs(expected_z).max())
    assert client.predict({"inputs": sent[0].tolist()})[0] == 200
    assert _drift(scrape(server.port)) == published  # the next window has begun: again nothing


def _slow_large_body() -> bytes:
    """4 MB of zeros with one ``true`` at the very end: parsed, then walked leaf by leaf in
    Python to find the boolean (seconds of work), then refused with 422."""
    row = b"[" + b",".join([b"0"] * FEATURES) + b"]"
    rows = (4 << 20) // (len(row) + 1)
    body = b'{"inputs": [' + b",".join([row] * rows) + b"]}"
    return body[: -len(b"0]]}")] + b"true]]}"


def test_healthz_answers_while_a_large_body_is_parsed(server: Server) -> None:
    body = _slow_large_body()
    assert len(body) >= (4 << 20) - 64
    outcome: dict[str, object] = {}

    def post() -> None:
        started = time.perf_counter()
        outcome["status"], outcome["answer"] = Client(server.port).predict(body)
        outcome["seconds"] = time.perf_counter() - started

    big = threading.Thread(target=post)
    health = Client(server.port)
    assert health.request("GET", "/healthz")[0] == 200  # connected and warm before the race
    big.start()
    latencies = []
    while big.is_alive():
        started = time.perf_counter()
        assert health.request("GET", "/healthz")[0] == 200
        latencies.append(time.perf_counter() - started)
        time.sleep(0.02)
    big.join()
    assert outcome["status"] == 422 and "got a boolean (true)" in outcome["answer"]["error"]  # type: ignore[index]
    seconds = float(outcome["seconds"])  # type: ignore[arg-type]
    assert seconds > 0.5, "the body was parsed too fast for the comparison to say anything"
    # Parsed on the event loop, /healthz would wait for the whole parse; on a worker thread
    # it waits at most for one C call (json.loads) to let go of the GIL.
    assert len(latencies) >= 5 and max(latencies) < seconds / 2, (seconds, sorted(latencies)[-3:])


def _stalled_request(port: int) -> socket.socket:
    """A connection whose request promises a body of 100 bytes and sends 10."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n" + b'{"inputs":')
    return sock


def test_connections_beyond_the_concurrency_limit_get_503(strict_server: Server) -> None:
    stalled = [_stalled_request(strict_server.port) for _ in range(2)]
    try:
        time.sleep(0.2)  # both accepted and waiting for their bodies
        assert Client(strict_server.port).request("GET", "/healthz")[0] == 503
    finally:
        for sock in stalled:
            sock.close()
    deadline = time.monotonic() + 5
    while Client(strict_server.port).request("GET", "/healthz")[0] != 200:
        assert time.monotonic() < deadline, "the server did not recover once the connections closed"
        time.sleep(0.05)


def test_a_body_that_does_not_arrive_in_time_gets_408(strict_server: Server) -> None:
    started = time.perf_counter()
    with _stalled_request(strict_server.port) as sock:
        response = http.client.HTTPResponse(sock)
        response.begin()
        answer = json.loads(response.read())
    elapsed = time.perf_counter() - started
    assert response.status == 408
    assert answer == {"error": "the request body did not arrive within 1 s (--body-timeout)"}
    assert 0.9 <= elapsed < 5


def test_an_idle_kept_alive_connection_is_closed_after_the_timeout(strict_server: Server) -> None:
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
        assert not response.will_close  # kept alive, until the server times it out
        started = time.perf_counter()
        assert sock.recv(65536) == b""  # the server closed the connection
        assert time.perf_counter() - started < 4  # uvicorn's own default is 5 s
