"""Faults around a run rather than inside a step: undefined metrics, errors while a failed run
ends, two runs on one directory, signals that come twice or after the end. Real processes."""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from conftest import clean_env, cli_command, free_port, read_summary, run_cli
from ddp_train import Trainer
from ddp_train.checkpoint.atomic import json_text
from ddp_train.config import load_config
from ddp_train.errors import TrainingFailed

QUIET = ["logging.progress=none", "logging.system_metrics=false"]


def _strict_json(text: str) -> Any:
    """Parse ``text`` as standard JSON: a bare NaN or Infinity token is an error."""
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def _wait_for(condition: Any, proc: subprocess.Popen[str], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1]}"
        time.sleep(0.02)
    pytest.fail(f"no {what} within {timeout} s")


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [record["step"] for record in map(json.loads, lines) if "train/loss" in record]


# ---------------------------------------------------------------------------------------
# Non-finite numbers in JSON files.

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children,
                                                                       max_size=4),
    max_leaves=20)


def _nulled(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _nulled(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_nulled(item) for item in value]
    return value


@settings(max_examples=200, deadline=None)
@given(_json_values)
def test_json_text_is_strict_json_with_non_finite_numbers_as_null(value: Any) -> None:
    assert _strict_json(json_text(value)) == _nulled(value)


def test_an_undefined_metric_is_null_in_summary_and_metrics_and_the_run_succeeds(workdir: Path) -> None:
    """R² over a one-sample validation set is NaN: written as null, exit 0 (was: exit 1, no summary)."""
    result = run_cli(["data.name=synthetic_regression", "data.args.n_samples=20",
                      "data.args.val_fraction=0.05", "loss.name=mse", "data.batch_size=4",
                      "train.max_steps=3", *QUIET], cwd=workdir)
    assert result.returncode == 0, result.stderr
    run_dir = workdir / "runs" / "default"
    summary = _strict_json((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["final"]["val/samples"] == 1 and summary["final"]["val/r2"] is None
    records = [_strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/r2"] for r in records if "val/r2" in r] == [None]


# ---------------------------------------------------------------------------------------
# Errors while a run ends.

def test_an_unwritable_summary_does_not_mask_why_training_failed(workdir: Path) -> None:
    """A NaN loss stops training; summary.json cannot be written (a directory holds its name):
    the user reads the NaN, in one line, with the summary's failure as a logged error."""
    run_dir = workdir / "runs" / "default"
    (run_dir / "summary.json").mkdir(parents=True)
    result = run_cli(["loss.name=user_components:sometimes_nan_loss", "train.max_steps=20", *QUIET],
                     cwd=workdir)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "training failed:" in result.stderr and "non-finite" in result.stderr
    assert "writing summary.json failed too" in result.stderr
    assert not list(run_dir.rglob(".*tmp-*")), "temporary files were left behind"


def _failing_at_step_3() -> Any:
    calls = 0

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 3 and torch.is_grad_enabled():
            raise ValueError("the loss failed at step 3")
        return torch.nn.functional.mse_loss(outputs, targets)
    return loss


def _tiny_trainer(workdir: Path, **parts: Any) -> Trainer:
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    config = load_config(None, [f"run.output_dir={workdir}", "train.max_steps=6", "data.batch_size=8",
                                "checkpoint.every_epochs=0", *QUIET])  # no saves: the end waits first
    return Trainer(config, model=torch.nn.Linear(4, 1), train_dataset=data, val_dataset=data, **parts)


class _FailingSave:
    """A checkpoint store's ``wait`` whose background save failed: raises once, as the store's does."""

    def __init__(self) -> None:
        self.failed = False

    def __call__(self) -> None:
        if not self.failed:
            self.failed = True
            raise OSError("No space left on device")


def test_a_failed_last_save_does_not_mask_why_training_failed(workdir: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    with _tiny_trainer(workdir, loss_fn=_failing_at_step_3()) as trainer:
        trainer.checkpoints.wait = _FailingSave()  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="ddp_train"), \
                pytest.raises(ValueError, match="the loss failed at step 3"):
            trainer.fit()
    assert read_summary(workdir / "default")["status"] == "failed"
    assert "the last checkpoint save failed too: No space left on device" in caplog.text


def test_a_failed_last_save_fails_a_run_that_trained_to_the_end(workdir: Path) -> None:
    with _tiny_trainer(workdir, loss_fn=torch.nn.functional.mse_loss) as trainer:
        trainer.checkpoints.wait = _FailingSave()  # type: ignore[method-assign]
        with pytest.raises(TrainingFailed, match="the last checkpoint save failed: No space left"):
            trainer.fit()
    assert read_summary(workdir / "default")["status"] == "failed"


# ---------------------------------------------------------------------------------------
# One run at a time in a run directory.

def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(run_dir)): path.read_bytes()
            for path in sorted(run_dir.rglob("*")) if path.is_file()}


def _two_ranks(args: list[str], cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """``python -m ddp_train ARGS`` as ranks 0 and 1 of a job, each with its own exit code."""
    port = free_port()
    procs = [subprocess.Popen(cli_command(args), cwd=cwd, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=clean_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for rank in range(2)]
    try:
        outputs = [proc.communicate(timeout=60) for proc in procs]
        return [subprocess.CompletedProcess(proc.args, proc.returncode, *output)
                for proc, output in zip(procs, outputs)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.timeout(180)
def test_a_second_run_on_a_busy_directory_exits_2_and_touches_nothing(workdir: Path) -> None:
    """The first run is frozen (SIGSTOP) so that nothing but the second could change its files.
    The second asks for checkpoint.resume=never, which would delete the first's checkpoints
    and metrics if it got that far."""
    args = ["loss.name=user_components:slow_loss", "train.max_steps=40", "checkpoint.every_steps=5",
            "logging.every_steps=1", *QUIET]
    run_dir = workdir / "runs" / "default"
    first = subprocess.Popen(cli_command(args), cwd=workdir, env=clean_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: 10 in _logged_steps(run_dir)
                  and (run_dir / "checkpoints" / "step_00000010.pt").exists(), first, "step 10")
        first.send_signal(signal.SIGSTOP)
        _wait_for(lambda: psutil.Process(first.pid).status() == psutil.STATUS_STOPPED, first, "the stop")
        before = _snapshot(run_dir)
        print(f"{len(before)} files, {sum(map(len, before.values()))} bytes in the busy directory")
        holder = f"pid {first.pid} on host {socket.gethostname()}"

        started = time.monotonic()
        second = run_cli([*args, "checkpoint.resume=never"], cwd=workdir, timeout=60)
        print(f"second run refused in {time.monotonic() - started:.1f} s")
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr, second.stderr
        assert "config error: run.name" in second.stderr and "in use by another run" in second.stderr
        assert holder in second.stderr, second.stderr
        assert _snapshot(run_dir) == before

        # Two ranks: rank 0 finds the directory busy; rank 1 must not wait for it, nor touch
        # it. Started as a launcher would, without one: a launcher would stop rank 1 itself.
        started = time.monotonic()
        ranks = _two_ranks([*args, "checkpoint.resume=never"], workdir)
        print(f"two-rank run refused in {time.monotonic() - started:.1f} s")
        assert [rank.returncode for rank in ranks] == [2, 2], [rank.stderr for rank in ranks]
        assert "in use by another run" in ranks[0].stderr and not ranks[1].stderr, ranks[1].stderr
        assert _snapshot(run_dir) == before
    finally:
        first.send_signal(signal.SIGCONT)
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert read_summary(run_dir)["status"] == "completed"
    assert _logged_steps(run_dir) == list(range(1, 41))  # one uninterrupted history
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert checkpoints[-1] == "step_00000040.pt"


def test_a_killed_run_leaves_its_directory_free_while_its_loader_workers_live(workdir: Path) -> None:
    """flock belongs to the open file, which forked DataLoader workers share: they must not keep
    a killed rank 0's directory locked against the run torchrun restarts."""
    proc = subprocess.Popen(cli_command(["loss.name=user_components:slow_loss", "data.num_workers=2",
                                         "train.max_steps=2000", "logging.every_steps=1", *QUIET]),
                            cwd=workdir, env=clean_env(), text=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    run_dir = workdir / "runs" / "default"
    workers: list[psutil.Process] = []
    try:
        _wait_for(lambda: 3 in _logged_steps(run_dir), proc, "step 3")
        workers = psutil.Process(proc.pid).children()
        proc.kill()
        proc.wait()
        assert [w for w in workers if w.status() != psutil.STATUS_ZOMBIE], "no worker outlived it"
        fd = os.open(run_dir / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if held
        finally:
            os.close(fd)
    finally:
        for worker in workers:
            if worker.is_running():
                worker.kill()


# ---------------------------------------------------------------------------------------
# Signals.

SLOW = ["loss.name=user_components:slow_loss", "train.max_steps=400", "logging.every_steps=1",
        "checkpoint.every_epochs=0", *QUIET]


@pytest.mark.timeout(120)
def test_sigterm_twice_to_every_rank_preempts_once_and_exits_0(workdir: Path) -> None:
    """Slurm and torchrun both signal the workers: two SIGTERMs 0.3 s apart (was: exit -15)."""
    proc = subprocess.Popen(cli_command(SLOW, nproc=2), cwd=workdir, env=clean_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run_dir = workdir / "runs" / "default"
    _wait_for(lambda: 5 in _logged_steps(run_dir), proc, "step 5")
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) == 2, workers
    signalled, sent = time.monotonic(), 0
    for _ in range(2):
        for worker in workers:
            if worker.is_running():
                worker.send_signal(signal.SIGTERM)
                sent += 1
        time.sleep(0.3)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    summary = read_summary(run_dir)
    later = stderr.count("received again") + stderr.count("received after training ended")
    print(f"preempted at step {summary['global_step']}, exit 0 {time.monotonic() - signalled:.1f} s "
          f"after the first signal; {sent - 2} second signals sent, {later} logged")
    assert summary["status"] == "preempted"
    assert (run_dir / "checkpoints" / f"step_{summary['global_step']:08d}.pt").exists()


_END_THEN_SIGNAL = """\
import os, signal, sys, time
import torch
from ddp_train.cli import main

def preempting_loss(outputs, targets):
    # Two SIGTERMs to itself at the 5th training call: a preemption mid-run.
    preempting_loss.calls = getattr(preempting_loss, "calls", 0) + torch.is_grad_enabled()
    if preempting_loss.calls == 5 and torch.is_grad_enabled():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    return torch.nn.functional.cross_entropy(outputs, targets)

sys.argv[0] = "ddp-train"
code = main()  # as the console script calls it
print("training returned", code, file=sys.stderr, flush=True)
for _ in range(2):
    os.kill(os.getpid(), signal.SIGTERM)  # the signals Slurm and torchrun send after the end
    time.sleep(0.1)
sys.exit(code)
"""


@pytest.mark.parametrize("how", ["completed", "preempted"])
def test_sigterm_after_the_end_leaves_the_result_standing(how: str, workdir: Path) -> None:
    """SIGTERM after summary.json is written: logged and ignored, exit 0 (was: killed, 143)."""
    args = ["train.max_steps=3", *QUIET] if how == "completed" else \
        ["loss.name=__main__:preempting_loss", "train.max_steps=100", *QUIET]
    result = subprocess.run([sys.executable, "-c", _END_THEN_SIGNAL, *args], cwd=workdir,
                            env=clean_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "training returned 0" in result.stderr
    assert result.stderr.count("SIGTERM received after training ended (or failed): ignored") == 2, result.stderr
    assert result.stderr.count("SIGTERM received again") == (how == "preempted"), result.stderr
    summary = read_summary(workdir / "runs" / "default")
    assert summary["status"] == how
    assert summary["global_step"] == (3 if how == "completed" else 5)
