"""Export (ONNX, torch.export, TorchScript, int8, pruning) and the HTTP model server, for real.

One user model is trained once (a subprocess, world size 1) and exported once through the
CLI's entry point with every format and int8 quantization; the tests check the files
independently of the exporter's own report (onnxruntime, torch.export.load, torch.jit.load,
on batch sizes the exporter never tried) and talk to real server processes (``python -m
ddp_train serve``) over loopback HTTP with the standard library's client. Models with
several named inputs (``input_ids``, ``attention_mask``: a user model and a Hugging Face
BERT) fed by mapping batches through a padding collate are exported and served too, at
batch sizes and sequence lengths the exporter never tried.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from conftest import load_model, read_summary, require_modules, run_cli
from ddp_train.cli import main
from ddp_train.config import config_to_yaml, load_config

require_modules("onnx", "onnxscript", "onnxruntime", "fastapi", "uvicorn", "prometheus_client")

import onnxruntime  # noqa: E402

import serving_components  # noqa: E402
import user_components  # noqa: E402
from http_server import Client, Samples, Server, scrape  # noqa: E402

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
    assert exported["inputs"] == [{"name": "input", "shape": ["batch", FEATURES], "dtype": "float32"}]
    assert exported["axis_limits"] == {}
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
    stats = exported["input_stats"]["input"]
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


@pytest.fixture(scope="module")
def servers(run_dir: Path, exported: dict[str, Any]) -> Iterator[dict[str, Server]]:
    """An onnxruntime server (on the run directory) and a torch one (on the export directory)."""
    started = {"onnxruntime": Server([str(run_dir), "--max-batch", "64"], run_dir),
               "torch": Server([str(run_dir / "export"), "--backend", "torch", "--drift-window", "50",
                                "--drift-min-samples", "2"], run_dir)}
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def _requests(metrics: Samples, status: int) -> float:
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
        before = scrape(server.port)
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
        after = scrape(server.port)
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
    before = scrape(server.port)
    bodies = [json.dumps({"inputs": inputs[i % len(inputs)].tolist()}).encode() for i in range(1000)]
    statuses = _hammer(server.port, bodies, concurrency=16)
    assert statuses == [200] * 1000
    after = scrape(server.port)
    assert _requests(after, 200) - _requests(before, 200) == 1000
    assert (after[("ddp_serve_batch_size_count", ())] - before[("ddp_serve_batch_size_count", ())]) == 1000
    # Drift is published per window of 100 requests: all but the last partial one are in.
    assert after[("ddp_serve_input_samples_total", ())] - before[("ddp_serve_input_samples_total", ())] >= 1000 - 99
    latency = ("ddp_serve_request_duration_seconds_count", (("endpoint", "/predict"),))
    assert after[latency] - before[latency] == 1000
    info = dict(next(labels for name, labels in after if name == "ddp_serve_model_info"))
    assert info["sha256"] == exported["formats"]["onnx"]["sha256"] and info["backend"] == "onnxruntime"
    # Validation inputs come from the training distribution: no drift.
    assert after[("ddp_serve_input_drift_mean_abs_z", ())] < 0.2


def test_drift_gauge_follows_shifted_inputs(exported: dict[str, Any], servers: dict[str, Server]) -> None:
    server = servers["torch"]  # its running mean spans 50 examples, published per 2 requests
    inputs, _ = _val_data()
    shifted = inputs[:50] + 3 * torch.tensor(exported["input_stats"]["input"]["std"], dtype=torch.float32)
    client = Client(server.port)
    for half in (inputs[:25], inputs[25:50]):
        assert client.predict({"inputs": half.tolist()})[0] == 200
    calm = scrape(server.port)[("ddp_serve_input_drift_mean_abs_z", ())]
    for half in (shifted[:25], shifted[25:]):
        assert client.predict({"inputs": half.tolist()})[0] == 200
    drifted = scrape(server.port)
    assert calm < 0.5 and drifted[("ddp_serve_input_drift_mean_abs_z", ())] > 2.0
    assert drifted[("ddp_serve_input_drift_z", (("feature", "0"), ("input", "input")))] > 2.0


def test_onnxruntime_server_never_imports_torch(servers: dict[str, Server]) -> None:
    for server in servers.values():
        server.stop()
    assert "onnxruntime" in servers["onnxruntime"].imported()
    assert "torch" not in servers["onnxruntime"].imported()
    assert "torch" in servers["torch"].imported()  # the check can see torch where it is imported


# ---------------------------------------------------------------------------------------
# A model with several named inputs (input_ids, attention_mask), fed by mapping batches
# through a padding collate: never trained (the weights do not matter to parity)


def _named_inputs_run(root: Path, model_name: str) -> Path:
    """A run directory (config.yaml + model.pt, seeded weights) of ``model_name`` on the
    padded token data of :mod:`serving_components`."""
    run_dir = root / model_name.split(":")[-1]
    run_dir.mkdir(parents=True)
    config = load_config(None, [f"model.name={model_name}", "data.name=serving_components:token_data",
                                "data.collate=serving_components:pad_batch", "data.batch_size=8"])
    (run_dir / "config.yaml").write_text(config_to_yaml(config))
    torch.manual_seed(0)
    factory = getattr(serving_components, model_name.split(":")[-1])
    torch.save(factory().state_dict(), run_dir / "model.pt")
    return run_dir


def _token_model(run_dir: Path, factory: Any) -> torch.nn.Module:
    model = factory()
    model.load_state_dict(load_model(run_dir))
    return model.eval()


def _padded(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of random sequences of ``lengths``, padded to the longest."""
    generator = torch.Generator().manual_seed(seed)
    items = [{"input_ids": torch.randint(1, serving_components.VOCAB, (length,), generator=generator), "labels": 0}
             for length in lengths]
    batch = serving_components.pad_batch(items)
    return batch["input_ids"], batch["attention_mask"]


def _logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask)
    return output["logits"]


@pytest.fixture(scope="module")
def token_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _named_inputs_run(tmp_path_factory.mktemp("tokens"), "serving_components:token_classifier")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_named_inputs_export_with_dynamic_batch_and_sequence_axes(token_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert main(["export", str(token_run), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    vocab, classes = serving_components.VOCAB, serving_components.CLASSES
    # The labels the collate adds are the targets: not an input of the served model.
    assert manifest["inputs"] == [
        {"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64", "range": [0, vocab - 1]},
        {"name": "attention_mask", "shape": ["batch", "sequence"], "dtype": "int64", "range": [0, 1]}]
    assert manifest["output"] == {"name": "output", "shape": ["batch", classes], "dtype": "float32"}
    assert manifest["input_stats"] == {}  # no input of one fixed shape: no per-feature drift
    for fmt in ("onnx", "exported", "torchscript"):
        assert manifest["formats"][fmt]["max_abs_diff"] <= 1e-5, fmt
        assert len(set(manifest["formats"][fmt]["checked_batch_sizes"])) == 3

    # Independently of the exporter's checks: batch sizes and sequence lengths it never tried.
    model = _token_model(token_run, serving_components.token_classifier)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("input_ids", "tensor(int64)"),
                                                                ("attention_mask", "tensor(int64)")]
    assert all(isinstance(dim, str) for i in session.get_inputs() for dim in i.shape)  # both axes dynamic
    program = torch.export.load(out / "model.pt2").module()
    traced = torch.jit.load(str(out / "model.ts"))
    for lengths in ([14, 3, 9, 14, 1], [2], [16] * 7):
        input_ids, attention_mask = _padded(lengths, seed=len(lengths))
        expected = _logits(model, input_ids, attention_mask)
        answers = {"onnx": torch.from_numpy(session.run(None, {"input_ids": input_ids.numpy(),
                                                               "attention_mask": attention_mask.numpy()})[0]),
                   "pt2": program(input_ids, attention_mask), "ts": traced(input_ids, attention_mask)}
        for name, got in answers.items():
            assert got.shape == expected.shape, (name, lengths)
            assert (got - expected).abs().max().item() <= 1e-5, (name, lengths)


@pytest.fixture(scope="module")
def token_server(token_run: Path) -> Iterator[Server]:
    """``serve RUN_DIR`` on the token run, which has not been exported: it exports it first."""
    server = Server([str(token_run)], token_run)
    try:
        server.wait_ready(timeout=300)
        yield server
    finally:
        server.stop()


def test_serve_exports_a_run_first_and_takes_named_inputs(token_run: Path, token_server: Server) -> None:
    assert f"{token_run} has not been exported yet: exporting it first" in token_server.output()
    manifest = json.loads((token_run / "export" / "manifest.json").read_text())
    assert set(manifest["formats"]) == {"onnx"}  # what the onnxruntime backend serves, no more

    model = _token_model(token_run, serving_components.token_classifier)
    input_ids, attention_mask = _padded([5, 2, 11], seed=3)
    expected = _logits(model, input_ids, attention_mask)
    client = Client(token_server.port)
    status, answer = client.predict({"inputs": {"input_ids": input_ids.tolist(),
                                                "attention_mask": attention_mask.tolist()}})
    assert status == 200, answer
    assert (torch.tensor(answer["outputs"]) - expected).abs().max().item() <= 1e-5
    assert answer["predictions"] == expected.argmax(-1).tolist()
    # One example: each input without the batch axis.
    status, single = client.predict({"inputs": {"input_ids": input_ids[1, :2].tolist(),
                                                "attention_mask": attention_mask[1, :2].tolist()}})
    assert status == 200 and single["predictions"] == int(expected[1].argmax())

    ids, mask = input_ids.tolist(), attention_mask.tolist()
    bad_requests: list[tuple[Any, str]] = [
        ({"inputs": ids}, 'this model takes several inputs: expected an object {"input_ids": [...], '
                          '"attention_mask": [...]}, got a JSON array'),
        ({"inputs": {"input_ids": ids}}, "expected the model's inputs ['input_ids', 'attention_mask'], "
                                         "but the object lacks 'attention_mask'"),
        ({"inputs": {"input_ids": ids, "attention_mask": mask, "token_type_ids": mask}},
         "has 'token_type_ids', which the model does not take"),
        ({"inputs": {"input_ids": ids, "attention_mask": [[1.0, 0.5] + row[2:] for row in mask]}},
         "inputs.attention_mask: expected integers (int64), got the non-integer 1.0 at [0, 0]"),
        ({"inputs": {"input_ids": ids, "attention_mask": [[1, 2] + row[2:] for row in mask]}},
         "inputs.attention_mask: expected integers in [0, 1] (the model's input range), got 2 at [0, 1]"),
        ({"inputs": {"input_ids": [row[:-1] for row in ids], "attention_mask": mask}},
         "inputs: 'input_ids' and 'attention_mask' share the sequence axis but have lengths 10 and 11"),
        ({"inputs": {"input_ids": ids[:2], "attention_mask": mask}},
         "inputs: 'input_ids' and 'attention_mask' share the batch axis but have lengths 2 and 3"),
        ({"inputs": {"input_ids": [[3, 4, 5], [6]], "attention_mask": [[1, 1, 1], [1]]}},
         "inputs.input_ids: expected a rectangular array of shape [sequence] for one example or "
         "[N, sequence] for a batch of N ≤ 256 (sequence: any length ≥ 1), but its rows differ"),
        ({"inputs": {"input_ids": [[3, 4, 5, 99]], "attention_mask": [[1, 1, 1, 1]]}},
         "inputs.input_ids: expected integers in [0, 39] (the model's input range), got 99 at [0, 3]"),
        ({"inputs": {"input_ids": [[[3]]], "attention_mask": [[[1]]]}},
         "inputs.input_ids: expected shape [sequence] for one example or [N, sequence]"),
    ]
    for body, message in bad_requests:
        status, answer = client.predict(body)
        assert status == 422 and message in answer["error"], (body, answer)


def test_a_model_failure_is_a_generic_500_with_the_detail_in_the_log(token_server: Server) -> None:
    # Positions beyond the model's table of 16: a failure inside the model, which neither the
    # exporter nor the manifest can foresee (an embedding lookup has no shape guard).
    input_ids, attention_mask = _padded([20], seed=4)
    client = Client(token_server.port)
    status, answer = client.predict({"inputs": {"input_ids": input_ids.tolist(),
                                                "attention_mask": attention_mask.tolist()}})
    assert status == 500
    incident = answer["error"].split("request ")[1].split(";")[0]
    assert answer == {"error": f"internal error: the model could not answer (request {incident}; "
                               f"the server log has the details)"}
    logged = next(line for line in token_server.output().splitlines() if f"request {incident}:" in line)
    detail = logged.split("the model failed: ")[1]
    assert "ONNXRuntimeError" in detail and detail not in json.dumps(answer)
    # And it keeps serving.
    input_ids, attention_mask = _padded([3], seed=4)
    assert client.predict({"inputs": {"input_ids": input_ids.tolist(),
                                      "attention_mask": attention_mask.tolist()}})[0] == 200


def test_hugging_face_model_exports_within_its_position_table_and_is_served_within_it(tmp_path: Path) -> None:
    require_modules("transformers")
    run_dir = _named_inputs_run(tmp_path, "serving_components:tiny_bert")
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [entry["name"] for entry in manifest["inputs"]] == ["input_ids", "attention_mask"]
    # BERT's position table bounds the sequence; torch.export found the bound.
    assert manifest["axis_limits"] == {"sequence": serving_components.MAX_LENGTH}

    model = _token_model(run_dir, serving_components.tiny_bert)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    program = torch.export.load(out / "model.pt2").module()
    input_ids, attention_mask = _padded([16, 5, 9], seed=5)
    expected = _logits(model, input_ids, attention_mask)
    onnx = session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})[0]
    assert np.abs(onnx - expected.numpy()).max() <= 1e-5
    assert (program(input_ids, attention_mask) - expected).abs().max().item() <= 1e-5

    server = Server([str(out)], tmp_path)
    try:
        server.wait_ready()
        client = Client(server.port)
        status, answer = client.predict({"inputs": {"input_ids": input_ids.tolist(),
                                                    "attention_mask": attention_mask.tolist()}})
        assert status == 200 and np.abs(np.array(answer["outputs"]) - expected.numpy()).max() <= 1e-5
        long_ids, long_mask = _padded([17], seed=5)
        status, answer = client.predict({"inputs": {"input_ids": long_ids.tolist(),
                                                    "attention_mask": long_mask.tolist()}})
        assert status == 422
        assert "inputs.input_ids: its sequence axis has length 17" in answer["error"]
        assert "(sequence: any length ≥ 1 up to 16)" in answer["error"]
    finally:
        server.stop()
