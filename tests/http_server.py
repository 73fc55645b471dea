"""A real ``ddp-train serve`` process on a loopback port, and an HTTP client for it (the tests' side)."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import clean_env, free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Scraped metrics: (sample name, sorted labels) → value."""


class Client:
    """An HTTP/1.1 client on one kept-alive connection (the standard library's http.client)."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        self.connection.request(method, path, body, headers)
        response = self.connection.getresponse()
        return response.status, response.read()

    def predict(self, body: Any) -> tuple[int, Any]:
        """POST /predict with ``body`` (bytes as they are, anything else as JSON)."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, answer = self.request("POST", "/predict", raw)
        return status, json.loads(answer)


class Server:
    """``python -m ddp_train serve`` in a subprocess on a free loopback port."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.port = free_port()
        # -X importtime lists every module the process imports: proof of what it loaded.
        # It writes thousands of lines, to a file: a full pipe would block the server.
        self.log_path = cwd / f"serve-{self.port}.log"
        self.log = self.log_path.open("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "ddp_train", "serve", *args, "--port", str(self.port)],
            cwd=cwd, env=clean_env(), stdout=self.log, stderr=subprocess.STDOUT, text=True)
        self.stderr = ""

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                pytest.fail(f"server exited with {self.process.returncode}: {self.stderr[-2000:]}")
            try:
                if Client(self.port).request("GET", "/readyz")[0] == 200:
                    return
            except OSError:  # not listening yet
                pass
            time.sleep(0.1)
        pytest.fail(f"server not ready within {timeout} s")

    def stop(self) -> None:
        if self.log.closed:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.seek(0)
        self.stderr = self.log.read()
        self.log.close()

    def output(self) -> str:
        """What the server has written to stdout and stderr so far (it may still be running)."""
        return self.log_path.read_text()

    def imported(self) -> set[str]:
        """Top-level names of the modules the server process imported."""
        return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in self.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}


def scrape(port: int) -> Samples:
    """GET /metrics, parsed."""
    text = Client(port).request("GET", "/metrics")[1].decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}
