"""Export (ONNX, torch.export, TorchScript, int8, pruning) and the HTTP model server, for real.

One user model is trained once (a subprocess, world size 1) and exported once through the
CLI's entry point with every format and int8 quantization; the tests check the files
independently of the exporter's own report (onnxruntime, torch.export.load, torch.jit.load,
on batch sizes the exporter never tried) and talk to real server processes (``python -m
ddp_train serve``) over loopback HTTP with the standard library's client.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from conftest import clean_env, free_port, load_model, read_summary, require_modules, run_cli
from ddp_train.cli import main
from ddp_train.config import config_to_yaml, load_config

require_modules("onnx", "onnxscript", "onnxruntime", "fastapi", "uvicorn", "prometheus_client")

import onnxruntime  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import user_components  # noqa: E402

FEATURES, CLASSES = 32, 4
DATA = ["data.name=synthetic_classification", f"data.args.n_features={FEATURES}",
        f"data.args.n_classes={CLASSES}", "data.args.n_samples=1024"]
TRAIN = ["model.name=user_components:wide_mlp", *DATA, "train.max_steps=60", "data.batch_size=32",
         "logging.progress=none", "logging.system_metrics=false"]


def _val_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The run's validation set, built independently of the exporter."""
    from ddp_train.components.datasets import synthetic_classification

    train, val = synthetic_classification(n_samples=1024, n_features=FEATURES, n_classes=CLASSES)
    return val.inputs, val.targets


def _eager(run_dir: Path) -> torch.nn.Module:
    model = user_components.wide_mlp(in_features=FEATURES, out_features=CLASSES)
    model.load_state_dict(load_model(run_dir))
    return model.eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained user model (world size 1, 60 steps)."""
    root = tmp_path_factory.mktemp("export")
    result = run_cli([*TRAIN, f"run.output_dir={root}", "run.name=wide"], cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "wide"


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> dict[str, Any]:
    """``ddp-train export RUN_DIR --quantize int8``: all formats plus int8.

    In this process (the CLI's own entry point), so that the exporters' one-time set-up
    (torch.export, the ONNX operator registry) is shared with the other export tests.
    """
    assert main(["export", str(run_dir), "--quantize", "int8"]) == 0
    return json.loads((run_dir / "export" / "manifest.json").read_text())


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_every_format_answers_like_the_model_at_other_batch_sizes(run_dir: Path, exported: dict[str, Any]) -> None:
    export_dir = run_dir / "export"
    assert set(exported["formats"]) == {"onnx", "exported", "torchscript", "onnx_int8"}
    for fmt in ("onnx", "exported", "torchscript"):
        entry = exported["formats"][fmt]
        assert entry["max_abs_diff"] <= 1e-4
        assert len(set(entry["checked_batch_sizes"])) == 3 and 1 in entry["checked_batch_sizes"]
        path = export_dir / entry["file"]
        assert entry["size_bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "legacy" in exported["formats"]["torchscript"]["note"]
    assert exported["input"] == {"name": "input", "shape": ["batch", FEATURES], "dtype": "float32"}
    assert exported["output"] == {"name": "output", "shape": ["batch", CLASSES], "dtype": "float32"}
    assert exported["task"] == "classification" and exported["num_classes"] == CLASSES
    assert {"torch", "onnx", "onnxruntime", "ddp_train"} <= set(exported["versions"])

    # Independently of the exporter's report: batch sizes it never tried (5 and 64).
    inputs, _ = _val_data()
    model = _eager(run_dir)
    session = onnxruntime.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    program = torch.export.load(export_dir / "model.pt2").module()
    traced = torch.jit.load(str(export_dir / "model.ts"))
    for batch in (inputs[:5], inputs[100:164]):
        with torch.no_grad():
            expected = model(batch)
            answers = {"onnx": torch.from_numpy(session.run(None, {"input": batch.numpy()})[0]),
                       "pt2": program(batch), "ts": traced(batch)}
        for name, got in answers.items():
            assert got.shape == expected.shape, name
            assert (got - expected).abs().max().item() <= 1e-4, name


def test_manifest_holds_the_training_inputs_statistics(exported: dict[str, Any]) -> None:
    from ddp_train.components.datasets import synthetic_classification

    train, _ = synthetic_classification(n_samples=1024, n_features=FEATURES, n_classes=CLASSES)
    stats = exported["input_stats"]
    assert stats["samples"] == len(train)
    np.testing.assert_allclose(stats["mean"], train.inputs.double().mean(0).numpy(), atol=1e-9)
    np.testing.assert_allclose(stats["std"], train.inputs.double().std(0, unbiased=False).numpy(), atol=1e-9)


def _accuracy(path: Path, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": inputs.numpy()})[0]
    return float((outputs.argmax(-1) == targets.numpy()).mean())


def test_int8_quantization_shrinks_the_file_and_keeps_the_accuracy(run_dir: Path, exported: dict[str, Any]) -> None:
    export_dir = run_dir / "export"
    fp32, int8 = export_dir / "model.onnx", export_dir / "model.int8.onnx"
    assert int8.stat().st_size <= 0.35 * fp32.stat().st_size
    inputs, targets = _val_data()
    before, after = _accuracy(fp32, inputs, targets), _accuracy(int8, inputs, targets)
    # The fp32 file is the trained model: its accuracy is the run's final validation accuracy.
    assert before == pytest.approx(read_summary(run_dir)["final"]["val/accuracy"], abs=1e-9)
    assert before > 0.8, "the model did not learn, so the comparison would say nothing"
    assert abs(after - before) <= 0.01
    quantization = exported["quantization"]
    assert quantization["size_ratio"] == pytest.approx(int8.stat().st_size / fp32.stat().st_size)
    assert quantization["metrics_before"]["val/accuracy"] == pytest.approx(before)
    assert quantization["metrics_after"]["val/accuracy"] == pytest.approx(after)


def test_pruning_is_permanent_and_reported(run_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pruned"
    assert main(["export", str(run_dir), "--format", "exported", "--prune", "0.5", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    pruning = manifest["pruning"]
    assert pruning["weight_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert pruning["metrics_before"]["val/accuracy"] == pytest.approx(read_summary(run_dir)["final"]["val/accuracy"])
    assert "val/accuracy" in pruning["metrics_after"]
    # Permanent: the exported program holds plain weights with half of them zero, no masks.
    state = torch.export.load(out / "model.pt2").state_dict
    weights = [value for key, value in state.items() if key.endswith("weight")]
    assert len(weights) == 3 and not any("mask" in key or "orig" in key for key in state)
    for weight in weights:
        assert (weight == 0).double().mean().item() == pytest.approx(0.5, abs=0.01)
    assert manifest["formats"]["exported"]["max_abs_diff"] <= 1e-4  # of the pruned model


def _fake_run(root: Path, model_name: str) -> Path:
    """A run directory (config.yaml + model.pt) for a model that needs no training to fail."""
    run_dir = root / model_name.split(":")[-1]
    run_dir.mkdir(parents=True)
    config = load_config(None, [f"model.name={model_name}", *DATA[:1], "data.args.n_features=8",
                                "data.args.n_classes=3", "data.args.n_samples=64"])
    (run_dir / "config.yaml").write_text(config_to_yaml(config))
    factory = getattr(user_components, model_name.split(":")[-1])
    torch.save(factory().state_dict(), run_dir / "model.pt")
    return run_dir


def test_unexportable_models_fail_naming_the_construct(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    branchy = _fake_run(tmp_path, "user_components:branchy")
    assert main(["export", str(branchy)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "export failed: model.onnx: cannot export" in err[0] and "data-dependent control flow" in err[0]
    assert "user_components.py" in err[0] and "if x.sum() > 0:" in err[0]

    svd = _fake_run(tmp_path, "user_components:svd_model")
    assert main(["export", str(svd), "--format", "onnx"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("model.onnx: cannot export the model: operator aten._linalg_svd has no "
                            "ONNX translation in torch.onnx"), err
    assert not (svd / "export" / "manifest.json").exists()


def test_parity_over_the_tolerance_fails_with_the_numbers(run_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # onnxruntime and torch sum in different orders: not bit-identical, so 1e-12 is too tight.
    assert main(["export", str(run_dir), "--format", "onnx", "--tolerance", "1e-12",
                 "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "model.onnx answers differently from the model: max abs difference" in err
    assert "> tolerance 1e-12 on validation batches of sizes [32, 1, 17]" in err
    assert not (tmp_path / "manifest.json").exists()


def test_usage_errors_exit_2_with_one_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cases = [
        (["export", str(tmp_path)], "RUN_DIR: expected a finished run directory"),
        (["export", str(run_dir), "--prune", "1.5"], "--prune: expected a fraction of weights in (0, 1), got 1.5"),
        (["export", str(run_dir), "--format", "exported", "--quantize", "int8"], "use --format onnx or --format all"),
        (["serve", str(tmp_path)], f"expected an export directory (with manifest.json) or an exported run "
                                   f"directory, but {str(tmp_path)!r} holds no manifest.json"),
        (["serve", str(run_dir), "--backend", "torch", "--int8"], "--int8: the int8 model is an ONNX file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    assert main(["export", str(run_dir), "--format", "onnx"]) == 2
    assert 'onnxruntime, which is not installed: pip install "ddp_train[export]"' in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert main(["serve", str(run_dir)]) == 2
    assert 'fastapi, which is not installed: pip install "ddp_train[serve]"' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# The server


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
        self.log = (cwd / f"serve-{self.port}.log").open("w+")
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

    def imported(self) -> set[str]:
        """Top-level names of the modules the server process imported."""
        return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in self.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}


@pytest.fixture(scope="module")
def servers(run_dir: Path, exported: dict[str, Any]) -> Iterator[dict[str, Server]]:
    """An onnxruntime server (on the run directory) and a torch one (on the export directory)."""
    started = {"onnxruntime": Server([str(run_dir), "--max-batch", "64"], run_dir),
               "torch": Server([str(run_dir / "export"), "--backend", "torch", "--drift-window", "50"], run_dir)}
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = Client(port).request("GET", "/metrics")[1].decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _requests(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], status: int) -> float:
    return metrics.get(("ddp_serve_requests_total", (("endpoint", "/predict"), ("status", str(status)))), 0.0)


BAD_REQUESTS: list[tuple[Any, int, str]] = [
    (b'{"inputs": [1, 2', 400, "request body is not valid JSON"),
    (b"", 400, "request body is empty"),
    ({"input": [0.0] * FEATURES}, 422, 'expected a JSON object {"inputs": [...]}'),
    ({"inputs": [0.0] * (FEATURES - 1)}, 422,
     f"expected shape [{FEATURES}] for one example or [N, {FEATURES}] for a batch of N ≤ 64, got [{FEATURES - 1}]"),
    ({"inputs": [[0.0] * FEATURES, [0.0] * 3]}, 422, "rows differ in length"),
    ({"inputs": ["0.5"] * FEATURES}, 422, 'expected numbers (float32), got a string ("0.5") at [0]'),
    ({"inputs": [[1.0] * (FEATURES - 1) + [True]]}, 422, f"got a boolean (true) at [0, {FEATURES - 1}]"),
    (b'{"inputs": [' + b"NaN, " * (FEATURES - 1) + b"1]}", 422, "expected finite numbers, got NaN"),
    ({"inputs": [1e39] * FEATURES}, 422, "got 1e+39 (beyond float32's range) at [0]"),
    ({"inputs": [[0.0] * FEATURES] * 65}, 413, "a batch of 65 examples is over this server's limit of 64"),
    (b'{"inputs": [' + b"0.0, " * 2_000_000 + b"0]}", 413, "over this server's limit of 8388608 bytes"),
]


def test_server_answers_like_the_model_and_refuses_bad_requests_clearly(run_dir: Path, servers: dict[str, Server]) -> None:
    inputs, _ = _val_data()
    with torch.no_grad():
        expected = _eager(run_dir)(inputs[:20])
    for name, server in servers.items():
        before = _metrics(server.port)
        client = Client(server.port)
        status, batch = client.predict({"inputs": inputs[:20].tolist()})
        assert status == 200, (name, batch)
        outputs = torch.tensor(batch["outputs"])
        assert (outputs - expected).abs().max().item() <= 1e-4, name
        assert batch["predictions"] == expected.argmax(-1).tolist(), name
        status, single = client.predict({"inputs": inputs[3].tolist()})
        assert single["predictions"] == int(expected[3].argmax())  # one example in, one out
        assert torch.allclose(torch.tensor(single["outputs"]), expected[3], atol=1e-4)
        if name != "onnxruntime":
            continue
        for body, expected_status, message in BAD_REQUESTS:
            status, answer = Client(server.port).predict(body)
            assert status == expected_status, (body[:80], answer)
            assert message in answer["error"], answer
        after = _metrics(server.port)
        for code in (400, 413, 422):
            sent = sum(1 for _, s, _ in BAD_REQUESTS if s == code)
            assert _requests(after, code) - _requests(before, code) == sent, code
        assert _requests(after, 500) == 0
        assert client.request("GET", "/predict")[0] == 405


def _hammer(port: int, bodies: list[bytes], concurrency: int) -> list[int]:
    """POST every body, ``concurrency`` at a time, each worker on its own kept-alive connection."""
    local = threading.local()

    def one(body: bytes) -> int:
        if not hasattr(local, "client"):
            local.client = Client(port)
        return local.client.request("POST", "/predict", body)[0]

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, bodies))


def test_thousand_concurrent_requests_without_error_and_counted(exported: dict[str, Any],
                                                               servers: dict[str, Server]) -> None:
    server = servers["onnxruntime"]
    inputs, _ = _val_data()
    before = _metrics(server.port)
    bodies = [json.dumps({"inputs": inputs[i % len(inputs)].tolist()}).encode() for i in range(1000)]
    statuses = _hammer(server.port, bodies, concurrency=16)
    assert statuses == [200] * 1000
    after = _metrics(server.port)
    assert _requests(after, 200) - _requests(before, 200) == 1000
    assert (after[("ddp_serve_batch_size_count", ())] - before[("ddp_serve_batch_size_count", ())]) == 1000
    assert after[("ddp_serve_input_samples_total", ())] - before[("ddp_serve_input_samples_total", ())] == 1000
    latency = ("ddp_serve_request_duration_seconds_count", (("endpoint", "/predict"),))
    assert after[latency] - before[latency] == 1000
    info = dict(next(labels for name, labels in after if name == "ddp_serve_model_info"))
    assert info["sha256"] == exported["formats"]["onnx"]["sha256"] and info["backend"] == "onnxruntime"
    # Validation inputs come from the training distribution: no drift.
    assert after[("ddp_serve_input_drift_mean_abs_z", ())] < 0.2


def test_drift_gauge_follows_shifted_inputs(exported: dict[str, Any], servers: dict[str, Server]) -> None:
    server = servers["torch"]  # its running mean spans 50 examples
    inputs, _ = _val_data()
    shifted = inputs[:50] + 3 * torch.tensor(exported["input_stats"]["std"], dtype=torch.float32)
    client = Client(server.port)
    assert client.predict({"inputs": inputs[:50].tolist()})[0] == 200
    calm = _metrics(server.port)[("ddp_serve_input_drift_mean_abs_z", ())]
    assert client.predict({"inputs": shifted.tolist()})[0] == 200
    drifted = _metrics(server.port)
    assert calm < 0.5 and drifted[("ddp_serve_input_drift_mean_abs_z", ())] > 2.0
    assert drifted[("ddp_serve_input_drift_z", (("feature", "0"),))] > 2.0


def test_onnxruntime_server_never_imports_torch(servers: dict[str, Server]) -> None:
    for server in servers.values():
        server.stop()
    assert "onnxruntime" in servers["onnxruntime"].imported()
    assert "torch" not in servers["onnxruntime"].imported()
    assert "torch" in servers["torch"].imported()  # the check can see torch where it is imported
