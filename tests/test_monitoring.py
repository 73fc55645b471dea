"""Monitoring: system metrics, peak FLOPs, the step profiler, CSV/TensorBoard sinks, plots."""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist

from conftest import require_modules, spawn_ranks
from ddp_train.cli import main
from ddp_train.errors import ConfigError
from ddp_train.observability.sinks import CsvSink, TensorBoardSink
from ddp_train.observability.profiling import StepProfiler
from ddp_train.observability.system_metrics import (PEAK_FLOPS, SystemMonitor, lookup_peak_flops, peak_flops,
                                      training_flops_per_sample)

CPU = torch.device("cpu")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@contextmanager
def _debug_log() -> Iterator[list[str]]:
    """The ddp_train logger's records at DEBUG level (whatever the CLI configured before)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger, handler = logging.getLogger("ddp_train"), Collect(logging.DEBUG)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# ---------------------------------------------------------------------------------------
# System metrics and peak FLOPs.

def test_system_monitor_on_cpu_reads_sane_host_metrics() -> None:
    monitor = SystemMonitor(CPU)
    torch.randn(256, 256) @ torch.randn(256, 256)  # some CPU time between the readings
    metrics = monitor.read()
    assert set(metrics) == {"sys/cpu_percent", "sys/ram_used_gb", "sys/process_rss_gb"}
    assert 0.0 <= metrics["sys/cpu_percent"] <= 100.0
    assert 0.0 < metrics["sys/process_rss_gb"] < metrics["sys/ram_used_gb"] + 1.0
    peak = monitor.peak_memory()
    assert list(peak) == ["train/peak_memory_gb"]
    # A process that imported torch has a peak RSS of tens of MB at least.
    assert peak["train/peak_memory_gb"] > 0.01
    assert peak["train/peak_memory_gb"] >= metrics["sys/process_rss_gb"] * 0.9


def test_no_gpu_with_or_without_nvidia_ml_py_is_silent(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    require_modules("pynvml")
    if torch.cuda.is_available():
        pytest.skip("this checks the behaviour without a GPU")
    # A CUDA device without a GPU makes the monitor go all the way to NVML, which fails.
    for _ in range(2):
        monitor = SystemMonitor(torch.device("cuda", 0))
        assert not any(key.startswith("sys/gpu") for key in monitor.read())
        assert "sys/cpu_percent" in monitor.read()
        monkeypatch.setitem(sys.modules, "pynvml", None)  # second round: not installed
    assert SystemMonitor(CPU).read()
    assert capsys.readouterr() == ("", "")


class _FakeNvml:
    """pynvml as on a GPU whose power reading is not supported (e.g. some boards, MIG)."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.power_calls = 0
        self.handle_uuid = ""

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self.handle_uuid = uuid
        return "handle"

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:
        return SimpleNamespace(gpu=87)

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        return SimpleNamespace(used=3 * 2**30)

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        self.power_calls += 1
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        return 61


def test_gpu_metrics_come_from_nvml_and_a_failing_one_is_left_out_quietly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(uuid=f"uuid-of-{index}"))
    with _debug_log() as messages:
        monitor = SystemMonitor(torch.device("cuda", 1))
        first, second = monitor.read(), monitor.read()
    assert fake.handle_uuid == "GPU-uuid-of-1"  # by UUID: right under CUDA_VISIBLE_DEVICES too
    for metrics in (first, second):
        assert metrics["sys/gpu_util_percent"] == 87.0
        assert metrics["sys/gpu_mem_used_gb"] == 3.0
        assert metrics["sys/gpu_temp_c"] == 61.0
        assert "sys/gpu_power_w" not in metrics
    assert fake.power_calls == 1, "an unsupported reading is not asked for again"
    assert len(messages) == 1 and "sys/gpu_power_w" in messages[0]


def test_peak_flops_table_override_and_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3") == PEAK_FLOPS["H100"] == 989e12
    assert lookup_peak_flops("NVIDIA H100 PCIe") == 756e12  # the longer key wins
    assert lookup_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12  # A100, not A10
    assert lookup_peak_flops("NVIDIA A10G") == PEAK_FLOPS["A10G"]
    assert lookup_peak_flops("NVIDIA L40S") == 362e12 and lookup_peak_flops("NVIDIA L4") == 121e12
    assert lookup_peak_flops("nvidia geforce rtx 4090") == PEAK_FLOPS["RTX 4090"]
    assert lookup_peak_flops("Some Future GPU") is None

    assert peak_flops(CPU, None) is None
    assert peak_flops(CPU, 5e12) == 5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_flops(torch.device("cuda", 0), None) == 989e12
    assert peak_flops(torch.device("cuda", 0), 1e12) == 1e12  # the override wins

    assert training_flops_per_sample(num_params=1000, tokens_per_sample=1) == 6000
    assert training_flops_per_sample(num_params=1000, tokens_per_sample=128) == 6000 * 128


# ---------------------------------------------------------------------------------------
# Profiler.

def _profile_rank(rank: int, world_size: int, run_dir: str) -> dict[str, Any]:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    profiler = StepProfiler(Path(run_dir), rank, CPU, wait=1, warmup=1, active=2,
                            record_shapes=True, memory=True)
    profiler.start()
    for _ in range(6):  # the window ends before training does
        loss = model(torch.randn(8, 16)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        profiler.step()
    table = profiler.stop()
    dist.destroy_process_group()
    return {"table": table, "traces": [str(path) for path in profiler.traces]}


@pytest.mark.timeout(120)
def test_step_profiler_writes_a_trace_per_rank_under_gloo(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    results = spawn_ranks(_profile_rank, 2, tmp_path / "out", str(run_dir))
    for rank, result in enumerate(results):
        traces = sorted((run_dir / "profile").glob(f"rank{rank}_*trace*.json"))
        assert [str(path) for path in traces] == result["traces"]
        assert traces[0].name == f"rank{rank}_trace_step4.json"  # 1 wait + 1 warmup + 2 active
        events = json.loads(traces[0].read_text())["traceEvents"]
        assert any("aten::" in event.get("name", "") for event in events)
        assert any("gloo" in event.get("name", "") for event in events), "DDP's all-reduce is in it"
    table = results[0]["table"]
    assert isinstance(table, str) and "Self CPU" in table and "aten::" in table
    assert results[1]["table"] is None  # the summary is rank 0's


def _train_steps(profiler: StepProfiler, steps: int) -> None:
    model = torch.nn.Linear(4, 1)
    for _ in range(steps):
        model(torch.randn(2, 4)).sum().backward()
        profiler.step()


def test_step_profiler_when_training_ends_inside_or_before_the_window(tmp_path: Path) -> None:
    inside = StepProfiler(tmp_path / "inside", 0, CPU, wait=0, warmup=1, active=5)
    inside.start(global_step=100)  # a resumed run: files carry global step numbers
    _train_steps(inside, 3)
    assert inside.stop() is not None  # what was recorded is still written and summarised
    assert [path.name for path in inside.traces] == ["rank0_trace_step103.json"]

    before = StepProfiler(tmp_path / "before", 0, CPU, wait=5, warmup=1, active=1)
    before.start()
    _train_steps(before, 2)
    assert before.stop() is None and before.traces == []
    assert before.stop() is None  # stopping twice is harmless


# ---------------------------------------------------------------------------------------
# Sinks.

TRAIN_1 = {"step": 10, "epoch": 0, "train/loss": 2.5, "train/lr": 0.1}
VAL_1 = {"step": 20, "epoch": 0, "val/loss": 1.5, "val/accuracy": 0.75, "val/samples": 40,
         "val/confusion_matrix": [[1, 2], [3, 4]]}
TRAIN_2 = {"step": 30, "epoch": 1, "train/loss": 1.25, "train/lr": 0.05, "train/grad_norm": 0.5}


def test_csv_sink_widens_its_header_and_skips_lists(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    sink = CsvSink(path)
    sink.log(TRAIN_1)
    with path.open(newline="") as file:  # readable while the run goes on
        assert list(csv.DictReader(file)) == [
            {"step": "10", "epoch": "0", "train/loss": "2.5", "train/lr": "0.1"}]
    sink.log(VAL_1)
    sink.log(TRAIN_2)
    sink.close()
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    assert reader.fieldnames == ["step", "epoch", "train/loss", "train/lr", "val/loss",
                                 "val/accuracy", "val/samples", "train/grad_norm"]
    assert [row["step"] for row in rows] == ["10", "20", "30"]
    assert rows[0]["val/loss"] == "" and rows[1]["train/loss"] == ""
    assert float(rows[1]["val/accuracy"]) == 0.75 and float(rows[2]["train/grad_norm"]) == 0.5
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file is left behind"


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_tensorboard_sink_writes_every_numeric_metric(tmp_path: Path) -> None:
    require_modules("tensorboard")
    log_dir = tmp_path / "tensorboard"
    sink = TensorBoardSink(log_dir)
    for record in (TRAIN_1, VAL_1, TRAIN_2):
        sink.log(record)
    sink.close()
    assert list(log_dir.glob("events.out.tfevents*"))
    scalars = _scalars(log_dir)
    assert set(scalars) == {"train/loss", "train/lr", "train/grad_norm", "val/loss",
                            "val/accuracy", "val/samples"}
    assert scalars["train/loss"] == [(10, 2.5), (30, 1.25)]
    assert scalars["val/accuracy"] == [(20, 0.75)]

    # Resumed from step 20: the first run's step 30 gives way to the redone one.
    resumed = TensorBoardSink(log_dir, keep_through_step=20)
    resumed.log({**TRAIN_2, "train/loss": 1.0})
    resumed.close()
    assert _scalars(log_dir)["train/loss"] == [(10, 2.5), (30, 1.0)]


def test_missing_tensorboard_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r'pip install "ddp_train\[tensorboard\]"'):
        TensorBoardSink(tmp_path / "tensorboard")


# ---------------------------------------------------------------------------------------
# Plots.

def _write_run(run_dir: Path, metric: str, grad_norm: bool) -> None:
    records: list[dict[str, Any]] = []
    for step in range(10, 210, 10):
        record = {"step": step, "epoch": step // 50, "train/loss": 3.0 / step ** 0.5,
                  "train/lr": 0.1 * (1 - step / 250), "train/samples_per_s": 1000.0 + step}
        if grad_norm:
            record["train/grad_norm"] = 1.0 + (step % 30) / 10
        records.append(record)
        if step % 50 == 0:  # validation: overfits after step 150
            records.append({"step": step, "epoch": step // 50, "val/loss": abs(step - 150) / 100 + 0.3,
                            metric: 0.9 - abs(step - 150) / 1000, "val/confusion_matrix": [[1]]})
    records[3]["train/loss"] = None  # a non-finite value, as JsonlSink writes it
    lines = [json.dumps(record) for record in records]
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 2')  # torn last line


def test_plot_draws_the_charts_of_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_modules("matplotlib")
    from matplotlib.image import imread

    run_dir = tmp_path / "runs" / "demo"
    _write_run(run_dir, "val/accuracy", grad_norm=True)
    assert main(["plot", str(run_dir)]) == 0
    names = ["loss.png", "metric.png", "lr.png", "throughput.png", "grad_norm.png"]
    assert capsys.readouterr().out.split() == [str(run_dir / "plots" / name) for name in names]
    for name in names:
        data = (run_dir / "plots" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
    assert imread(run_dir / "plots" / "loss.png").shape == (540, 960, 4)  # 8 × 4.5 in at 120 dpi

    regression = tmp_path / "runs" / "regression"
    _write_run(regression, "val/r2", grad_norm=False)
    assert main(["plot", str(regression)]) == 0
    assert sorted(p.name for p in (regression / "plots").iterdir()) == [
        "loss.png", "lr.png", "metric.png", "throughput.png"]


@pytest.mark.parametrize("case", ["no_dir", "no_metrics", "no_matplotlib"])
def test_plot_usage_errors_exit_2_without_traceback(
        case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    expected = {"no_dir": "no such directory", "no_metrics": "metrics.jsonl",
                "no_matplotlib": 'pip install "ddp_train[plot]"'}[case]
    if case != "no_dir":
        run_dir.mkdir()
    if case == "no_matplotlib":
        _write_run(tmp_path / "complete", "val/accuracy", grad_norm=False)
        run_dir = tmp_path / "complete"
        monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert main(["plot", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (run_dir / "plots").exists()
