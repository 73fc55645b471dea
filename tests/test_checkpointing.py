"""Checkpoints, exact resume, preemption and failures, with real processes on gloo."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from torch.utils.data import TensorDataset

from conftest import clean_env, load_model, read_summary, run_cli
from ddp_train import Trainer
from ddp_train.checkpoint.single_file import FileCheckpointStore, read_checkpoint
from ddp_train.cli import main
from ddp_train.config import load_config



def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(workdir: Path) -> None:
    args = ["train.max_steps=30", "checkpoint.every_steps=10", "checkpoint.keep_last=3",
            "model.args.dropout=0.1", "logging.progress=none"]
    first = run_cli(args, cwd=workdir)
    assert first.returncode == 0, first.stderr
    run_dir = workdir / "runs" / "default"
    reference = load_model(run_dir)
    newest = run_dir / "checkpoints" / "step_00000030.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    again = run_cli(args, cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert "skipping checkpoint" in again.stderr and "step_00000030.pt" in again.stderr
    assert "resuming from" in again.stderr and "step_00000020.pt" in again.stderr
    _assert_bitwise_equal(load_model(run_dir), reference)
    assert read_checkpoint(newest)["progress"]["global_step"] == 30  # rewritten whole


def _start(args: list[str], cwd: Path, nproc: int, **env: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "ddp_train", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=clean_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1]}"
        if metrics.exists() and any(f'"step": {step},' in line for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)
    pytest.fail(f"step {step} not reached in {timeout} s")


def _workers(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) >= 2, workers
    return workers


SLOW = ["loss.name=user_components:slow_loss", "train.max_steps=120", "logging.every_steps=1",
        "checkpoint.every_epochs=0", "model.args.dropout=0.1", "logging.progress=none"]


@pytest.mark.timeout(180)
def test_sigterm_to_all_ranks_preempts_then_resumes_exactly(workdir: Path) -> None:
    reference_dir = workdir / "reference"
    reference_dir.mkdir()
    reference = run_cli(SLOW, cwd=reference_dir, nproc=2)
    assert reference.returncode == 0, reference.stderr

    proc = _start(SLOW, workdir, nproc=2)
    run_dir = workdir / "runs" / "default"
    _wait_for_step(run_dir, 15, proc)
    for worker in _workers(proc):
        worker.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    summary = read_summary(run_dir)
    assert summary["status"] == "preempted" and 15 <= summary["global_step"] < 120
    assert (run_dir / "checkpoints" / f"step_{summary['global_step']:08d}.pt").exists()
    assert not (run_dir / "model.pt").exists()

    rerun = run_cli(SLOW, cwd=workdir, nproc=2)
    assert rerun.returncode == 0, rerun.stderr
    assert read_summary(run_dir)["status"] == "completed"
    _assert_bitwise_equal(load_model(run_dir), load_model(reference_dir / "runs" / "default"))


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2])
def test_slurm_signals_preempt_a_single_process(signum: signal.Signals, workdir: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "ddp_train", *SLOW], cwd=workdir,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = workdir / "runs" / "default"
    _wait_for_step(run_dir, 5, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert f"{signum.name} received" in stderr
    summary = read_summary(run_dir)
    assert summary["status"] == "preempted"
    assert FileCheckpointStore(run_dir / "checkpoints", load_config().checkpoint).list()[-1].step == summary["global_step"]


@pytest.mark.timeout(150)
def test_a_stopped_rank_fails_the_job_within_the_timeout(workdir: Path) -> None:
    """SIGSTOP one rank: the other times out after dist.timeout_s and the job exits non-zero.

    torchrun then gives the frozen worker its fixed 30 s to exit before SIGKILL.
    """
    proc = _start([*SLOW, "train.max_steps=100000", "dist.timeout_s=5"], workdir, nproc=2)
    _wait_for_step(workdir / "runs" / "default", 5, proc)
    frozen = _workers(proc)[-1]
    frozen.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=100)
    finally:
        for worker in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            worker.kill()
    assert proc.returncode != 0
    assert time.monotonic() - stopped_at < 5 + 30 + 20
    assert "lost contact with another rank" in stderr


@pytest.mark.timeout(180)
def test_a_kill_during_a_checkpoint_write_never_leaves_a_loadable_partial(workdir: Path) -> None:
    """SIGKILL while a large checkpoint is being written: nothing incomplete is ever listed."""
    args = ["model.args.hidden_sizes=[1536,1536]", "checkpoint.every_steps=1", "train.max_steps=400",
            "logging.progress=none", "checkpoint.keep_last=2"]
    run_dir = workdir / "runs" / "default"
    checkpoints = run_dir / "checkpoints"
    caught = 0
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-m", "ddp_train", *args], cwd=workdir,
                                env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            names = [p.name for p in checkpoints.iterdir()] if checkpoints.is_dir() else []
            # Mid-write of a later save, with an earlier complete one to fall back on.
            if any(n.startswith(".") for n in names) and any(n.startswith("step_") for n in names):
                proc.kill()  # SIGKILL, mid-write
                caught += 1
                break
        proc.wait()
        if any(p.name.startswith(".") for p in checkpoints.iterdir()):
            # Every checkpoint that resume could pick is complete and loads.
            for checkpoint in FileCheckpointStore(checkpoints, load_config().checkpoint).list():
                read_checkpoint(checkpoint.path)
            break
    assert caught, "never caught a save in progress"
    resumed = run_cli([*args, "train.max_steps=402", "checkpoint.every_steps=1000"], cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "left by a save that did not finish" in resumed.stderr
    assert "resuming from" in resumed.stderr
    assert not any(p.name.startswith(".") for p in checkpoints.iterdir())


def test_resume_modes(workdir: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    quiet = ["logging.progress=none", "train.max_steps=20", "checkpoint.every_steps=10"]
    assert main([*quiet, "run.name=a"]) == 0
    a_checkpoint = workdir / "runs" / "a" / "checkpoints" / "step_00000010.pt"
    capsys.readouterr()

    # A path: another run's checkpoint (file or run directory) seeds this run.
    assert main([*quiet, "run.name=b", f"checkpoint.resume={a_checkpoint}", "train.max_steps=25"]) == 0
    assert "resuming from" in capsys.readouterr().err
    assert read_summary(workdir / "runs" / "b")["global_step"] == 25
    assert main([*quiet, "run.name=c", f"checkpoint.resume={workdir / 'runs' / 'a'}"]) == 0
    assert "step_00000020.pt" in capsys.readouterr().err

    # never: starts over, removing the earlier run's checkpoints.
    assert main([*quiet, "run.name=a", "checkpoint.resume=never", "train.max_steps=5"]) == 0
    assert "removing 2 checkpoint(s)" in capsys.readouterr().err
    assert read_summary(workdir / "runs" / "a")["global_step"] == 5

    # Bad paths and checkpoints that do not fit: exit 2, the key named, no traceback.
    broken = workdir / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    for resume in (str(broken), str(workdir / "missing.pt"), str(workdir)):
        assert main([*quiet, "run.name=d", f"checkpoint.resume={resume}"]) == 2
        err = capsys.readouterr().err
        assert "checkpoint.resume" in err and "Traceback" not in err
    assert main([*quiet, "run.name=a", "model.args.hidden_sizes=[7]"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this run" in err and "checkpoint.resume=never" in err


def test_async_save_matches_sync_and_keeps_the_best_apart(workdir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    common = ["logging.progress=none", "train.epochs=4", "checkpoint.keep_last=1",
              "checkpoint.save_best=true", "model.args.dropout=0.1", "optim.lr=0.02"]
    assert main([*common, "run.name=sync"]) == 0
    assert main([*common, "run.name=async", "checkpoint.async_save=true"]) == 0
    _assert_bitwise_equal(load_model(workdir / "runs" / "sync"), load_model(workdir / "runs" / "async"))
    for name in ("sync", "async"):
        files = FileCheckpointStore(workdir / "runs" / name / "checkpoints", load_config().checkpoint).list()
        best_step = read_summary(workdir / "runs" / name)["best"]["step"]
        assert [(c.kind, c.step) for c in files] == sorted(
            [("best", best_step), ("step", 176)], key=lambda kind_step: (kind_step[1], kind_step[0] == "step"))
        for checkpoint in files:
            assert read_checkpoint(checkpoint.path)["progress"]["global_step"] == checkpoint.step


class CountingDataset(TensorDataset):
    """Counts the samples it is asked for."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        super().__init__(*tensors)
        self.loaded = 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        self.loaded += 1
        return super().__getitem__(index)


def test_mid_epoch_resume_does_not_load_skipped_samples(workdir: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(400, 8, generator=generator), torch.randint(0, 3, (400,), generator=generator)

    def run(max_steps: int) -> tuple[int, dict[str, torch.Tensor]]:
        config = load_config(None, [f"run.output_dir={workdir}", "logging.progress=none",
                                    "data.batch_size=10", f"train.max_steps={max_steps}",
                                    "checkpoint.every_steps=13", "eval.task=none"])
        train = CountingDataset(inputs, labels)
        torch.manual_seed(1)
        with Trainer(config, model=torch.nn.Linear(8, 3), train_dataset=train, val_dataset=None) as trainer:
            trainer.fit()
            return train.loaded, {k: v.clone() for k, v in trainer.module.state_dict().items()}

    loaded_first, _ = run(13)  # 13 steps of the 40 in epoch 0, checkpoint at 13
    loaded_resumed, resumed = run(30)
    assert loaded_first == 130
    assert loaded_resumed == 170  # steps 14..30 only: the first 130 samples are not loaded again
    (workdir / "default" / "checkpoints").rename(workdir / "elsewhere")
    _, straight = run(30)
    _assert_bitwise_equal(resumed, straight)


def test_an_explicit_resume_sets_the_abandoned_branch_aside(workdir: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Resuming from step 10 of a run that went on to 20: rotation keeps the new branch's
    checkpoints, and the next auto resume continues it instead of jumping back to step 20."""
    monkeypatch.chdir(workdir)
    quiet = ["logging.progress=none", "checkpoint.every_epochs=0", "checkpoint.keep_last=3"]
    assert main([*quiet, "train.max_steps=20", "checkpoint.every_steps=5"]) == 0
    run_dir = Path("runs") / "default"  # relative, as the messages name it
    checkpoints = run_dir / "checkpoints"
    capsys.readouterr()

    branch = [*quiet, "checkpoint.every_steps=1", "optim.lr=0.01"]
    assert main([*branch, "train.max_steps=12", f"checkpoint.resume={checkpoints / 'step_00000010.pt'}"]) == 0
    err = capsys.readouterr().err
    abandoned = checkpoints / "abandoned" / "after_step_00000010"
    assert f"moved 2 checkpoint(s) newer than step 10 into {abandoned}" in err
    assert "step_00000015.pt, step_00000020.pt" in err
    assert sorted(p.name for p in checkpoints.glob("step_*")) == [
        "step_00000010.pt", "step_00000011.pt", "step_00000012.pt"]
    assert read_checkpoint(abandoned / "step_00000020.pt")["progress"]["global_step"] == 20  # kept whole

    assert main([*branch, "train.max_steps=14"]) == 0
    assert f"resuming from {checkpoints / 'step_00000012.pt'} at step 12" in capsys.readouterr().err
    assert read_summary(run_dir)["global_step"] == 14


def test_rotation_after_skipping_a_corrupt_newest_keeps_the_new_checkpoints(
        workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    quiet = ["logging.progress=none", "checkpoint.every_epochs=0"]
    assert main([*quiet, "train.max_steps=20", "checkpoint.every_steps=5", "checkpoint.keep_last=3"]) == 0
    checkpoints = Path("runs") / "default" / "checkpoints"  # relative, as the messages name it
    (checkpoints / "step_00000020.pt").write_bytes(b"")  # a full disk at the last save
    capsys.readouterr()

    resumed = [*quiet, "checkpoint.every_steps=1", "checkpoint.keep_last=1"]
    assert main([*resumed, "train.max_steps=17"]) == 0
    err = capsys.readouterr().err
    assert "step_00000020.pt: it is empty (0 bytes)" in err and "at step 15" in err
    assert [p.name for p in checkpoints.glob("step_*")] == ["step_00000017.pt"]
    assert main([*resumed, "train.max_steps=18"]) == 0
    assert f"resuming from {checkpoints / 'step_00000017.pt'} at step 17" in capsys.readouterr().err


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    """Even next to a higher-numbered checkpoint of another branch (keep_last=1)."""
    config = load_config(None, ["checkpoint.keep_last=1"]).checkpoint
    store = FileCheckpointStore(tmp_path, config)
    state = {"format_version": 1, "model": {"weight": torch.ones(2)}, "optimizer": {}, "scheduler": {},
             "progress": {}, "ranks": []}
    store.save(state, 50, periodic=True, best=False)
    store.save(state, 12, periodic=True, best=True)
    store.save(state, 13, periodic=False, best=True)
    store.wait()
    assert [(c.kind, c.step) for c in store.list()] == [("step", 12), ("best", 13)]
