"""Non-finite values, gradient health, diagnostics and monitoring in real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import read_metrics, read_summary, run_cli
from ddp_train.cli import main

QUIET = ["logging.progress=none"]


def test_nan_loss_stops_with_exit_1_naming_the_step(workdir: Path) -> None:
    result = run_cli([*QUIET, "loss.name=user_components:nan_loss"], cwd=workdir)
    assert result.returncode == 1
    assert "non-finite loss" in result.stderr and "optimizer step 3" in result.stderr
    assert "Traceback" not in result.stderr
    summary = read_summary(workdir / "runs" / "default")
    assert summary["status"] == "failed" and summary["global_step"] == 2
    assert not (workdir / "runs" / "default" / "model.pt").exists()


def test_skip_policy_skips_and_counts(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    assert main([*QUIET, "loss.name=user_components:sometimes_nan_loss", "train.nonfinite=skip",
                 "train.max_steps=30", "logging.every_steps=5"]) == 0
    run_dir = workdir / "runs" / "default"
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["global_step"] == 30
    skips = [r["train/nonfinite_skips"] for r in read_metrics(run_dir) if "train/nonfinite_skips" in r]
    assert skips[-1] == 4  # training calls 7, 14, 21, 28
    assert all(r.get("train/loss") is None or r["train/loss"] == r["train/loss"]
               for r in read_metrics(run_dir))  # no NaN leaked into the logged loss


def test_skip_policy_gives_up_after_too_many_in_a_row(workdir: Path) -> None:
    result = run_cli([*QUIET, "loss.name=user_components:nan_loss", "train.nonfinite=skip",
                      "train.max_nonfinite_skips=4"], cwd=workdir)
    assert result.returncode == 1
    assert "4 steps in a row" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.timeout(120)
def test_nan_on_one_rank_is_skipped_by_both(workdir: Path) -> None:
    """Rank 1 alone sees NaN losses: DDP's all-reduced gradients make both ranks skip alike."""
    result = run_cli([*QUIET, "loss.name=user_components:rank1_nan_loss", "train.nonfinite=skip",
                      "train.max_steps=20", "logging.every_steps=10"], cwd=workdir, nproc=2)
    assert result.returncode == 0, result.stderr
    records = read_metrics(workdir / "runs" / "default")
    assert [r["train/nonfinite_skips"] for r in records if "train/nonfinite_skips" in r] == [2, 4]
    assert read_summary(workdir / "runs" / "default")["status"] == "completed"


def test_diagnostics_and_system_metrics_are_logged(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(workdir)
    assert main([*QUIET, "train.max_steps=10", "logging.every_steps=5", "debug.layer_grad_norms=true",
                 "debug.activation_stats=true", "debug.grad_norm_low=1000", "debug.grad_norm_high=2000",
                 "logging.csv=true", "logging.peak_flops=1e12"]) == 0
    assert "looks vanishing" in capsys.readouterr().err
    run_dir = workdir / "runs" / "default"
    record = next(r for r in read_metrics(run_dir) if "train/loss" in r)
    for key in ("train/grad_norm", "train/samples_per_s", "train/mfu", "train/peak_memory_gb",
                "sys/cpu_percent", "sys/process_rss_gb", "grad_norm/1.weight", "act/1/mean", "act/3/std"):
        assert key in record, key
    assert 0 < record["train/mfu"] < 1
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss" in header and "val/accuracy" in header


@pytest.mark.timeout(120)
def test_profiler_on_two_ranks_leaves_a_trace_per_rank(workdir: Path) -> None:
    result = run_cli([*QUIET, "profile.enabled=true", "train.max_steps=12", "logging.every_steps=2",
                      "logging.tensorboard=true"], cwd=workdir, nproc=2)
    assert result.returncode == 0, result.stderr
    run_dir = workdir / "runs" / "default"
    for rank in (0, 1):
        traces = list((run_dir / "profile").glob(f"rank{rank}*trace*.json"))
        assert traces, f"no trace for rank {rank}"
        assert json.loads(traces[0].read_text())["traceEvents"]
    assert "top operators by self time" in result.stderr
    record = next(r for r in read_metrics(run_dir) if "train/loss" in r)
    assert {"train/grad_norm", "train/samples_per_s"} <= record.keys()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents*"))
