"""train.strategy=fsdp: equivalence with DDP, sharded checkpoints, exact resume, resharding, memory.

The runs share one spawn of 2 processes (gloo, CPU): they train every 2-rank run in turn
(the Trainers share the process group), then rank 0 alone, in a 1-rank group of its own,
resumes from the 2-rank checkpoints.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

from conftest import read_metrics, read_summary, spawn_ranks
from ddp_train import Trainer
from ddp_train.cli import main
from ddp_train.config import load_config
from ddp_train.components.losses import build_loss
from ddp_train.components.models import gpt
from ddp_train.checkpoint.sharded import ShardedCheckpointStore
from ddp_train.checkpoint.single_file import read_checkpoint
from ddp_train.distributed.fsdp import held_bytes

# AdamW, a cosine schedule with warmup, clipping and 2 micro-batches per step: every kind
# of optimizer state and the no-sync path. 2 ranks × 4 × 2 = a global batch of 16.
COMMON = ["optim.name=adamw", "optim.lr=3e-3", "optim.weight_decay=0.01", "schedule.name=cosine",
          "schedule.warmup_steps=3", "train.clip_grad_norm=0.5", "train.grad_accum_steps=2",
          "train.max_steps=20", "logging.every_steps=5", "logging.progress=none",
          "checkpoint.every_epochs=0", "eval.every_steps=10"]
CHECKPOINTED = ["checkpoint.every_steps=10"]
GPT = ["model.name=gpt", "data.name=chars", "data.args.block_size=16", "data.args.max_chars=3000",
       "model.args.n_layer=2", "model.args.n_head=2", "model.args.n_embd=32", "data.batch_size=4"]
MLP = ["model.name=user_components:tiny_mlp", "data.name=user_components:blobs",
       "data.args.n_train=204", "data.args.n_val=51", "loss.name=cross_entropy", "data.batch_size=4"]
STOP_AT = 10


def _fit(out_dir: str, args: list[str], loss_fn: Callable[..., torch.Tensor] | None = None
         ) -> tuple[dict[str, Any], dict[str, int]]:
    """Train one run; its summary and the parameter/optimizer bytes this rank held."""
    config = load_config(None, [*args, f"run.output_dir={out_dir}/runs"])
    with Trainer(config, loss_fn=loss_fn) as trainer:
        summary = trainer.fit()
        held = held_bytes(trainer.module, trainer.optimizer)
    return summary, held


def _preempting_loss(rank: int) -> Callable[..., torch.Tensor]:
    """Cross entropy that sends this process SIGUSR1 during optimizer step STOP_AT - 1 on rank 1.

    The ranks agree on the flag one step later, so training stops after step STOP_AT.
    """
    ce = build_loss("cross_entropy", {})
    calls = 0

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if rank == 1 and calls == 2 * (STOP_AT - 1):  # 2 micro-batches per step
            os.kill(os.getpid(), signal.SIGUSR1)
        return ce(outputs, targets)
    return loss


def _all_runs(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    # One process group for all the 2-rank runs: Trainers use an existing group and leave it be.
    dist.init_process_group("gloo")
    results: dict[str, Any] = {}
    for model, args in (("mlp", MLP), ("gpt", GPT)):
        for strategy in ("ddp", "fsdp"):
            name = f"{model}_{strategy}"
            saves = CHECKPOINTED if name == "gpt_fsdp" else []  # the others: no checkpoints needed
            results[name] = _fit(out_dir, [*COMMON, *args, *saves, f"train.strategy={strategy}",
                                           f"run.name={name}"])
    # Stopped by a preemption signal after step 10, then resumed (auto) to 20.
    # Ranks check for the signal after every step, so the stop comes right after step 10.
    stopped = [*COMMON, *GPT, *CHECKPOINTED, "train.strategy=fsdp", "run.name=gpt_fsdp_preempted",
               "dist.preemption_sync_s=0"]
    results["preempted"] = _fit(out_dir, stopped, _preempting_loss(rank))
    results["resumed"] = _fit(out_dir, stopped)
    dist.destroy_process_group()
    if rank == 0:
        # Then a job of 1 rank (a group of its own) resumes from the 2-rank checkpoint.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        results.update(_one_rank_runs(out_dir))
        dist.destroy_process_group()
    return results


def _one_rank_runs(out_dir: str) -> dict[str, Any]:
    step_10 = Path(out_dir) / "runs" / "gpt_fsdp" / "checkpoints" / "step_00000010"
    one_rank = [*COMMON, *GPT, "data.batch_size=8"]  # the same global batch of 16
    results = {"resharded": _fit(out_dir, [*one_rank, "train.strategy=fsdp", "run.name=resharded",
                                           f"checkpoint.resume={step_10}"])}
    converted = Path(out_dir) / "step_00000010.pt"
    assert main(["convert", str(step_10), "--out", str(converted)]) == 0
    results["converted"] = _fit(out_dir, [*one_rank, "run.name=from_converted",
                                          f"checkpoint.resume={converted}"])
    # FSDP also resumes from a single file: each rank takes its shards of the full tensors.
    results["fsdp_from_file"] = _fit(out_dir, [*one_rank, "train.strategy=fsdp",
                                               "run.name=fsdp_from_file",
                                               f"checkpoint.resume={converted}"])
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The run directory root and each rank's results of every 2-rank run."""
    out = tmp_path_factory.mktemp("fsdp2")
    results = spawn_ranks(_all_runs, 2, out, str(out), timeout=200)
    return out / "runs", results


def _models_close(a: Path, b: Path, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    left = torch.load(a / "model.pt", weights_only=True)
    right = torch.load(b / "model.pt", weights_only=True)
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=rtol, atol=atol, msg=key)


def _grad_norms(run_dir: Path) -> list[float]:
    return [r["train/grad_norm"] for r in read_metrics(run_dir) if "train/grad_norm" in r]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_fsdp_matches_ddp(model: str, two_ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    """FSDP on 2 ranks trains the same model as DDP on 2 ranks (clip norm, accumulation)."""
    runs, _ = two_ranks
    fsdp, ddp = runs / f"{model}_fsdp", runs / f"{model}_ddp"
    for run in (fsdp, ddp):
        summary = read_summary(run)
        assert summary["status"] == "completed" and summary["global_step"] == 20
    _models_close(fsdp, ddp, atol=1e-5)  # reduce-scatter and all-reduce sum in different orders
    # The global, pre-clip gradient norm over shards equals DDP's over full gradients.
    norms = _grad_norms(fsdp)
    assert len(norms) == 4 and max(norms) > 0.5, "clipping must have been active"
    torch.testing.assert_close(norms, _grad_norms(ddp), rtol=1e-5, atol=0)
    assert read_summary(fsdp)["final"]["val/loss"] == pytest.approx(
        read_summary(ddp)["final"]["val/loss"], rel=1e-5)
    # model.pt is the plain, full state dict of the factory's model.
    if model == "gpt":
        reference = gpt(vocab_size=_vocab(fsdp), block_size=16, n_layer=2, n_head=2, n_embd=32)
        reference.load_state_dict(torch.load(fsdp / "model.pt", weights_only=True), strict=True)


def _vocab(run_dir: Path) -> int:
    return int(torch.load(run_dir / "model.pt", weights_only=True)["tok_emb.weight"].shape[0])


def test_a_sharded_checkpoint_in_a_ddp_run_says_how_to_convert(
        two_ranks: tuple[Path, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    runs, _ = two_ranks
    step = runs / "gpt_fsdp" / "checkpoints" / "step_00000010"
    monkeypatch.chdir(tmp_path)
    assert main([*GPT, "logging.progress=none", f"checkpoint.resume={step}"]) == 2
    err = capsys.readouterr().err
    assert "is a sharded checkpoint" in err and f"ddp-train convert {step}" in err
    assert "Traceback" not in err


def test_sharded_checkpoint_layout(two_ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    """One directory per checkpoint, a shard file per rank, nothing temporary left."""
    runs, _ = two_ranks
    checkpoints = runs / "gpt_fsdp" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000010", "step_00000020"]
    for step in ("step_00000010", "step_00000020"):
        files = sorted(p.name for p in (checkpoints / step).iterdir())
        assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.pt"], files
        # Everything but tensors lives in trainer.pt, loadable the safe way.
        state = torch.load(checkpoints / step / "trainer.pt", weights_only=True)
        assert state["progress"]["global_step"] == int(step[-8:]) and len(state["ranks"]) == 2


@pytest.mark.timeout(200)
def test_fsdp_resume_after_preemption_is_bitwise_exact(two_ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    """Stopped by a signal after step 10 and resumed to 20 ≡ 20 steps uninterrupted, bit for bit."""
    runs, results = two_ranks
    stopped, _ = results[0]["preempted"]
    assert stopped["status"] == "preempted" and stopped["global_step"] == STOP_AT
    resumed, _ = results[0]["resumed"]
    assert resumed["status"] == "completed" and resumed["global_step"] == 20
    run, reference = runs / "gpt_fsdp_preempted", runs / "gpt_fsdp"
    _models_close(run, reference, rtol=0, atol=0)
    # The logged losses, norms and validations match too: metrics.jsonl reads as one run.
    keep = ("train/loss", "train/grad_norm", "train/lr", "val/loss", "step")
    records = [{k: v for k, v in r.items() if k in keep} for r in read_metrics(run)]
    assert records == [{k: v for k, v in r.items() if k in keep} for r in read_metrics(reference)]


def test_fsdp_halves_parameter_and_optimizer_memory(two_ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    """Per rank, FSDP holds ≤ 0.6 × the parameter + optimizer-state bytes DDP holds."""
    _, results = two_ranks
    for rank_results in results:
        _, fsdp = rank_results["gpt_fsdp"]
        _, ddp = rank_results["gpt_ddp"]
        assert fsdp["optimizer_state"] > 0 and ddp["optimizer_state"] > 0
        ratio = (fsdp["parameters"] + fsdp["optimizer_state"]) / (ddp["parameters"] + ddp["optimizer_state"])
        assert ratio <= 0.6, (fsdp, ddp)


@pytest.mark.timeout(200)
def test_resume_on_one_rank_from_two_rank_sharded_checkpoint(
        two_ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    """A 2-rank sharded checkpoint resumes on 1 rank (resharded), directly or converted to a file."""
    runs, (results, _) = two_ranks
    resharded, from_file = runs / "resharded", runs / "from_converted"
    for name in ("resharded", "converted", "fsdp_from_file"):
        summary, _ = results[name]
        assert summary["status"] == "completed" and summary["global_step"] == 20
        assert summary["world_size"] == 1
    # Resharded by DCP or gathered into one file: the same state, so the same model, bit for bit.
    _models_close(resharded, from_file, rtol=0, atol=0)
    # Same global batch, same data order: the uninterrupted 2-rank model, up to rounding.
    for run in (resharded, runs / "fsdp_from_file"):
        _models_close(run, runs / "gpt_fsdp", atol=1e-5)
    converted = read_checkpoint(runs.parent / "step_00000010.pt")
    assert converted["progress"]["global_step"] == 10 and converted["world_size"] == 2


def test_incomplete_sharded_checkpoint_is_skipped(two_ranks: tuple[Path, list[dict[str, Any]]],
                                                  tmp_path: Path) -> None:
    """A lost or truncated shard makes a checkpoint invisible to auto-resume, with a warning."""
    runs, _ = two_ranks
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(runs / "gpt_fsdp" / "checkpoints", checkpoints)
    shard = checkpoints / "step_00000020" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (checkpoints / ".step_00000030.tmp-123").mkdir()  # a save killed half-way
    config = load_config(None, [])
    manager = ShardedCheckpointStore(checkpoints, config.checkpoint)
    manager.remove_stale_temporaries()
    assert not (checkpoints / ".step_00000030.tmp-123").exists()
    warnings = _Collect()
    logging.getLogger("ddp_train").addHandler(warnings)
    try:
        found = manager.load_newest()
    finally:
        logging.getLogger("ddp_train").removeHandler(warnings)
    assert found is not None and found[1].name == "step_00000010"
    assert any("step_00000020" in m and "truncated" in m for m in warnings.messages), warnings.messages


class _Collect(logging.Handler):
    """Keeps the messages logged to it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
