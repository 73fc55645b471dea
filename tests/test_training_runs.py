"""Whole runs: the default first contact, the run directory, built-ins, precision, failures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import clean_env, load_model, read_metrics, read_summary, run_cli
from ddp_train import Trainer, TrainConfig
from ddp_train.cli import main
from ddp_train.config import load_config
from ddp_train.components.models import MODELS

QUIET = ["logging.progress=none"]


@pytest.mark.timeout(120)
def test_default_run_learns_fast_and_writes_the_run_directory(workdir: Path) -> None:
    """`python -m ddp_train` with no config: ≥ 0.9 validation accuracy in under 60 s."""
    started = time.monotonic()
    result = run_cli([], cwd=workdir)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 60
    run_dir = workdir / "runs" / "default"

    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["world_size"] == 1
    assert summary["final"]["val/accuracy"] >= 0.9
    assert summary["epochs_completed"] == 10 and summary["global_step"] == 440
    assert summary["best"]["step"] <= summary["global_step"]
    assert set(summary["train_val_gap"]) == {"train/loss", "val/loss", "gap"}
    assert summary["wall_time_s"] > 0

    records = read_metrics(run_dir)
    assert all({"step", "epoch"} <= record.keys() for record in records)
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/loss" in r]
    assert {"train/lr", "train/samples_per_s"} <= train[0].keys()
    assert len(val) == 10 and val[-1]["step"] == 440
    assert {k: v for k, v in val[-1].items() if k != "train/loss_avg"} == {
        "step": 440, "epoch": 9, **summary["final"]}  # final describes the last validation
    assert train[-1]["train/loss"] < train[0]["train/loss"] / 5

    # config.yaml: resolved (the data set's sizes filled in), versioned, loadable again.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["versions"]["torch"] == str(torch.__version__)
    assert saved["model"]["args"] == {"in_features": 64, "out_features": 10}
    assert load_config(run_dir / "config.yaml").model.args == saved["model"]["args"]

    # model.pt: a plain state dict that loads safely into the factory's model.
    model = MODELS.resolve("mlp")(**saved["model"]["args"])
    model.load_state_dict(load_model(run_dir))


@pytest.mark.parametrize("overrides", [
    ["model.name=cnn"],
    ["model.name=gpt", "data.name=chars", "model.args.n_layer=1", "model.args.n_embd=32"],
    ["data.name=synthetic_classification", "model.init=kaiming", "model.norm=weight"],
    ["data.name=synthetic_regression", "loss.name=mse", "model.init=xavier", "model.norm=spectral"],
    ["model.name=cnn", "model.init=orthogonal", "optim.name=sgd", "schedule.name=step",
     "schedule.step_size=5", "train.clip_grad_value=0.5"],
    ["optim.name=adam", "schedule.name=linear", "schedule.warmup_steps=5", "loss.args.label_smoothing=0.1"],
    ["optim.name=rmsprop", "optim.lr=1e-3", "train.clip_grad_norm=1.0", "schedule.name=cosine"],
], ids=["cnn", "gpt-chars", "classification-kaiming-weightnorm", "regression-xavier-spectral",
        "cnn-sgd-step-clipvalue", "adam-linear-warmup-smoothing", "rmsprop-cosine-clipnorm"])
def test_builtin_parts_train(overrides: list[str], workdir: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Each built-in model, data set, optimizer and schedule trains a few steps."""
    monkeypatch.chdir(workdir)
    assert main([*overrides, *QUIET, "train.max_steps=12", "logging.every_steps=4",
                 "eval.every_steps=6"]) == 0
    run_dir = workdir / "runs" / "default"
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["global_step"] == 12
    records = read_metrics(run_dir)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert [r["step"] for r in records if "val/loss" in r] == [6, 12]
    task_metric = {"data.name=chars": "val/perplexity", "loss.name=mse": "val/r2"}
    expected = next((m for o, m in task_metric.items() if o in overrides), "val/f1_macro")
    assert expected in summary["final"]
    # Whatever the init and the normalisation, model.pt loads into the factory's plain model.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    model = MODELS.resolve(saved["model"]["name"])(**saved["model"]["args"])
    model.load_state_dict(load_model(run_dir))


def test_lr_schedule_is_followed(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train/lr: linear warmup to optim.lr, then cosine down to min_lr_ratio × lr."""
    monkeypatch.chdir(workdir)
    assert main([*QUIET, "train.max_steps=40", "logging.every_steps=1", "optim.lr=0.01",
                 "schedule.name=cosine", "schedule.warmup_steps=9", "schedule.min_lr_ratio=0.1"]) == 0
    lrs = [r["train/lr"] for r in read_metrics(workdir / "runs" / "default") if "train/lr" in r]
    assert lrs[0] == pytest.approx(0.001) and lrs[8] == pytest.approx(0.009)
    assert lrs[9] == pytest.approx(0.01)
    assert lrs[-1] == pytest.approx(0.001 + 0.009 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 30 / 31)).item()))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_library_api_with_user_objects(workdir: Path) -> None:
    """A user passes a model, data sets and a loss object directly: no registry involved."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 4, generator=generator)
    targets = inputs @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    data = torch.utils.data.TensorDataset(inputs, targets)
    config = TrainConfig()
    config.run.output_dir = str(workdir)
    config.optim.lr = 0.05
    config.train.epochs = 20
    config.eval.task = "regression"
    config.logging.progress = "none"
    with Trainer(config, model=torch.nn.Linear(4, 1), train_dataset=data, val_dataset=data,
                 loss_fn=torch.nn.MSELoss()) as trainer:
        summary = trainer.fit()
    assert summary["final"]["val/r2"] > 0.99
    assert (workdir / "default" / "model.pt").exists()


@pytest.mark.timeout(180)
def test_bf16_on_two_ranks(workdir: Path) -> None:
    result = run_cli([*QUIET, "train.precision=bf16", "train.epochs=3"], cwd=workdir, nproc=2)
    assert result.returncode == 0, result.stderr
    summary = read_summary(workdir / "runs" / "default")
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    assert summary["final"]["val/accuracy"] > 0.85
    assert all(t.dtype == torch.float32 for t in load_model(workdir / "runs" / "default").values())


@pytest.mark.timeout(180)
def test_compiled_model_trains(workdir: Path) -> None:
    result = run_cli([*QUIET, "train.compile=true", "train.max_steps=30"], cwd=workdir)
    assert result.returncode == 0, result.stderr
    run_dir = workdir / "runs" / "default"
    assert read_summary(run_dir)["final"]["val/accuracy"] > 0.5
    MODELS.resolve("mlp")().load_state_dict(load_model(run_dir))  # no _orig_mod. prefixes


@pytest.mark.timeout(120)
def test_exception_on_one_rank_ends_the_job(workdir: Path) -> None:
    """A user error on rank 1 only: the whole job exits non-zero quickly, no hang."""
    started = time.monotonic()
    result = run_cli([*QUIET, "loss.name=user_components:rank1_crashes", "dist.timeout_s=60"],
                     cwd=workdir, nproc=2, timeout=100)
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    assert "user loss exploded on rank 1" in result.stderr


@pytest.mark.timeout(120)
def test_srun_style_launch_without_torchrun(workdir: Path) -> None:
    """`srun python -m ddp_train`: ranks from SLURM_* variables, rendezvous on the node list."""
    job_id = next(str(j) for j in range(4242, 24242, 97) if _port_is_free(15000 + j % 20000))
    procs = []
    for rank in range(2):
        env = clean_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2",
                        SLURM_STEP_NUM_TASKS="2", SLURM_STEP_ID="0", SLURM_JOB_ID=job_id,
                        SLURM_STEP_NODELIST="localhost", SLURM_JOB_NODELIST="localhost")
        procs.append(subprocess.Popen([sys.executable, "-m", "ddp_train", *QUIET, "train.max_steps=20"],
                                      cwd=workdir, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=100) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert read_summary(workdir / "runs" / "default")["world_size"] == 2


def _port_is_free(port: int) -> bool:
    """True when nothing listens on ``port`` (ddp_train derives MASTER_PORT from the job id)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_progress_lines_and_bar(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(workdir)
    assert main(["logging.progress=lines", "train.max_steps=20"]) == 0
    err = capsys.readouterr().err
    assert "step 10 | epoch 0 | train/loss" in err and "val/accuracy" in err
    assert main(["logging.progress=bar", "train.max_steps=20", "run.name=bar"]) == 0
    assert "20/20" in capsys.readouterr().err  # tqdm's counter
    assert json.loads((workdir / "runs" / "bar" / "summary.json").read_text())["global_step"] == 20
    # No temporaries left; the run's lock file stays (removing it would race the next run's lock).
    assert os.listdir(workdir / "runs" / "bar") and not any(
        name.startswith(".") and name != ".lock" for name in os.listdir(workdir / "runs" / "bar"))
