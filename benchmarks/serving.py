"""Benchmark: the model server's throughput and latency, onnxruntime backend against torch.

What is measured: ``ddp-train serve`` answering ``POST /predict`` with one example per
request (the built-in MLP trained briefly on the built-in digits, 64 → 128 → 128 → 10,
exported with ``ddp-train export``), at concurrency 1 and 16, for the two backends:

* ``onnxruntime``: ``model.onnx`` in an onnxruntime session (the default; no torch in
  the process);
* ``torch``: ``model.pt2`` loaded with ``torch.export.load`` and run eagerly.

Per cell (backend × concurrency): requests per second (requests / wall time of the
block), client-side latency percentiles p50 and p99 (time from sending a request to
reading the whole answer), and the server process's CPU time per request (psutil), which
depends less on the load generator sharing the machine. Also each backend's start-up time
(process start to ``/readyz`` answering 200) and resident memory after warm-up.

Why the comparison is fair: both servers run at the same time with the same options
(``--threads 1``: one intra-op thread per inference, requests in parallel on the
server's thread pool), serve the same model from the same export, and get the same
request bodies (validation examples) from the same load generator: ``concurrency``
threads, each on its own kept-alive HTTP/1.1 connection (the standard library's
``http.client``, which costs the client a fraction of what httpx's async client does).
The cells run interleaved, in blocks, in an order rotated every round after one warm-up
round; the numbers are medians over rounds, and each onnxruntime/torch ratio comes with
a 95% interval from resampling whole rounds. The load generator shares the CPU with the
servers: on a 2-core machine the absolute rates are the machine's, compare ratios.

Run: ``PYTHONPATH=. python benchmarks/serving.py [--rounds N] [--requests N] [--out DIR]``;
writes ``serving.json`` (every block's rate and latency percentiles, medians, ratios, the
machine and its load) and
``serving.png``. Needs ``pip install "ddp_train[export,serve,plot]"``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from common import CpuWatch, free_port, machine_info, paired_bootstrap, rotated, utc_now, wait_for_quiet

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("onnxruntime", "torch")
CONCURRENCY = (1, 16)
TRAIN = ["train.max_steps=50", "logging.progress=none", "logging.system_metrics=false"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                     "MASTER_", "SLURM_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _cli(args: list[str], cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "ddp_train", *args], cwd=cwd, env=_env(),
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"ddp_train {' '.join(args[:2])} failed: {result.stderr[-2000:]}")


class Connection:
    """One kept-alive HTTP/1.1 connection that times its requests."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, float]:
        started = time.perf_counter()
        self.connection.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        response = self.connection.getresponse()
        data = response.read()
        return response.status, data, time.perf_counter() - started


class Server:
    """``ddp-train serve`` in its own process; start-up time measured to /readyz."""

    def __init__(self, export_dir: Path, backend: str) -> None:
        self.backend = backend
        self.port = free_port()
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ddp_train", "serve", str(export_dir), "--backend", backend,
             "--threads", "1", "--port", str(self.port)], env=_env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the {backend} server exited with {self.process.returncode}")
            try:
                if Connection(self.port).request("GET", "/readyz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.02)
        self.startup_s = time.perf_counter() - started
        self.ps = psutil.Process(self.process.pid)

    def cpu_s(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def run_block(server: Server, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    """Send every body, ``concurrency`` requests at a time; the block's rate and latencies."""
    local = threading.local()

    def one(body: bytes) -> float:
        if not hasattr(local, "connection"):
            local.connection = Connection(server.port)
        status, _, seconds = local.connection.request("POST", "/predict", body)
        if status != 200:
            raise SystemExit(f"{server.backend}: status {status}")
        return seconds

    cpu = server.cpu_s()
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, bodies))
    wall = time.perf_counter() - started
    return {"requests_per_s": len(bodies) / wall, "latencies_s": latencies,
            "server_cpu_us_per_request": (server.cpu_s() - cpu) / len(bodies) * 1e6}


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _bodies(count: int) -> list[bytes]:
    """Single-example request bodies from the validation data of the run."""
    from ddp_train.components.datasets import digits

    _, val = digits()
    return [json.dumps({"inputs": val.inputs[i % len(val)].tolist()}).encode() for i in range(count)]


def measure(rounds: int, requests: int) -> dict[str, Any]:
    """Train, export, start both servers, then run the interleaved rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _cli([*TRAIN, f"run.output_dir={root}", "run.name=bench"], root)
        run_dir = root / "bench"
        _cli(["export", str(run_dir)], root)
        manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
        bodies = _bodies(requests)
        # Started one after the other, so each start-up time is measured alone.
        servers = {backend: Server(run_dir / "export", backend) for backend in BACKENDS}
        try:
            cells = [(backend, concurrency) for backend in BACKENDS for concurrency in CONCURRENCY]
            for backend, concurrency in cells:  # warm-up round, not recorded
                run_block(servers[backend], bodies[: requests // 4], concurrency)
            memory = {backend: server.ps.memory_info().rss / 2**20 for backend, server in servers.items()}
            samples: dict[str, list[dict[str, Any]]] = {f"{b}/c{c}": [] for b, c in cells}
            with CpuWatch() as watch:
                server_cpu = sum(server.cpu_s() for server in servers.values())
                for index in range(rounds):
                    for backend, concurrency in rotated(cells, index):
                        block = run_block(servers[backend], bodies, concurrency)
                        samples[f"{backend}/c{concurrency}"].append(block)
                    print(f"  round {index + 1}/{rounds} done", flush=True)
                server_cpu = sum(server.cpu_s() for server in servers.values()) - server_cpu
            startup = {backend: server.startup_s for backend, server in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
    conditions = dict(watch.result)
    # CpuWatch counts the servers (children not yet waited for) as other processes.
    conditions["others_cores"] = round(max(conditions["others_cores"] - server_cpu / conditions["wall_s"], 0), 2)
    conditions["servers_cores"] = round(server_cpu / conditions["wall_s"], 2)
    return {"samples": samples, "startup_s": startup, "rss_mb": memory, "conditions": conditions,
            "model": {"name": "mlp", "args": manifest["source"]["model"]["args"],
                      "inputs": manifest["inputs"], "onnx_bytes": manifest["formats"]["onnx"]["size_bytes"]}}


def summarize_cells(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per cell: medians over rounds of the rate, p50, p99 and server CPU per request."""
    cells = {}
    for key, blocks in samples.items():
        cells[key] = {
            "requests_per_s": statistics.median(b["requests_per_s"] for b in blocks),
            "p50_ms": statistics.median(percentile(b["latencies_s"], 50) * 1e3 for b in blocks),
            "p99_ms": statistics.median(percentile(b["latencies_s"], 99) * 1e3 for b in blocks),
            "server_cpu_us_per_request": statistics.median(b["server_cpu_us_per_request"] for b in blocks),
            "rounds": len(blocks), "requests_per_round": len(blocks[0]["latencies_s"])}
    return cells


def block_summary(block: dict[str, Any]) -> dict[str, Any]:
    """One block as saved: its rate, latency percentiles and server CPU (not every latency)."""
    latencies = block["latencies_s"]
    return {"requests": len(latencies), "requests_per_s": block["requests_per_s"],
            **{f"p{q}_ms": percentile(latencies, q) * 1e3 for q in (50, 90, 99)},
            "max_ms": max(latencies) * 1e3, "server_cpu_us_per_request": block["server_cpu_us_per_request"]}


def ratios(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """onnxruntime / torch per concurrency: rate, p50 and server CPU, with 95% intervals."""
    result = {}
    for concurrency in CONCURRENCY:
        ort, torch_ = samples[f"onnxruntime/c{concurrency}"], samples[f"torch/c{concurrency}"]
        for name, value in (("requests_per_s", lambda b: [b["requests_per_s"]]),
                            ("p50_latency", lambda b: [percentile(b["latencies_s"], 50)]),
                            ("server_cpu_per_request", lambda b: [b["server_cpu_us_per_request"]])):
            a, b = [value(x) for x in ort], [value(x) for x in torch_]
            flat_a, flat_b = [v for r in a for v in r], [v for r in b for v in r]
            result[f"c{concurrency}/{name}"] = {
                "onnxruntime_over_torch": statistics.median(flat_a) / statistics.median(flat_b),
                "ci95": paired_bootstrap(a, b, lambda x, y: statistics.median(x) / statistics.median(y))}
    return result


def plot(results: dict[str, Any], path: Path) -> None:
    """Three panels: requests/s, latency p50/p99, and server CPU per request."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    colors = {"onnxruntime": "#2ca02c", "torch": "#ee4c2c"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 5), dpi=110)
    width = 0.38
    for offset, backend in ((-width / 2, "onnxruntime"), (width / 2, "torch")):
        xs = [i + offset for i in range(len(CONCURRENCY))]
        keys = [f"{backend}/c{c}" for c in CONCURRENCY]
        axes[0].bar(xs, [cells[k]["requests_per_s"] for k in keys], width, color=colors[backend], label=backend)
        axes[1].bar(xs, [cells[k]["p99_ms"] for k in keys], width, color=colors[backend], alpha=0.35,
                    label=f"{backend} p99")
        axes[1].bar(xs, [cells[k]["p50_ms"] for k in keys], width, color=colors[backend], label=f"{backend} p50")
        axes[2].bar(xs, [cells[k]["server_cpu_us_per_request"] for k in keys], width, color=colors[backend],
                    label=backend)
    titles = ("requests per second (median over rounds)", "client latency, ms, log scale (p50 solid, p99 light)",
              "server CPU time per request, µs")
    axes[1].set_yscale("log")
    for ax, title in zip(axes, titles):
        ax.set_xticks(range(len(CONCURRENCY)), [f"concurrency {c}" for c in CONCURRENCY])
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    machine = results["machine"]
    fig.suptitle(f"ddp-train serve, one example per request: {results['model']['name']} "
                 f"{results['model']['inputs'][0]['shape']} — startup onnxruntime "
                 f"{results['startup_s']['onnxruntime']:.2f} s / torch {results['startup_s']['torch']:.2f} s, "
                 f"RSS {results['rss_mb']['onnxruntime']:.0f} / {results['rss_mb']['torch']:.0f} MiB", fontsize=10)
    others = results["conditions"]["others_cores"]
    fig.text(0.01, 0.005, f"{machine['cpu_cores']}-core {machine['cpu_model']}, torch {machine['torch']}, "
                          f"{machine['timestamp_utc']}; load generator on the same machine; other processes "
                          f"took {others:.2f} cores meanwhile", fontsize=8, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write serving.json and serving.png."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--requests", type=int, default=1000, help="requests per cell and round (default 1000)")
    parser.add_argument("--max-wait", type=float, default=120, help="seconds to wait for a quiet machine")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    args = parser.parse_args(argv)
    quiet = wait_for_quiet(max_load=None, max_busy=0.25, max_wait_s=args.max_wait)
    started = utc_now()
    measured = measure(args.rounds, args.requests)
    results = {"benchmark": "serving", "machine": machine_info(), "started_utc": started,
               "quiet_before": quiet, **{k: v for k, v in measured.items() if k != "samples"},
               "cells": summarize_cells(measured["samples"]), "ratios": ratios(measured["samples"]),
               "samples": {key: [block_summary(block) for block in blocks]
                           for key, blocks in measured["samples"].items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / "serving.png")
    for key, cell in results["cells"].items():
        print(f"{key:<16} {cell['requests_per_s']:8.0f} req/s   p50 {cell['p50_ms']:6.2f} ms   "
              f"p99 {cell['p99_ms']:6.2f} ms   server CPU {cell['server_cpu_us_per_request']:6.0f} µs/request")
    for key, ratio in results["ratios"].items():
        low, high = ratio["ci95"]
        print(f"{key:<30} onnxruntime/torch {ratio['onnxruntime_over_torch']:.2f} [{low:.2f}, {high:.2f}]")
    print(f"startup {results['startup_s']}, RSS MiB {results['rss_mb']}, conditions {results['conditions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
