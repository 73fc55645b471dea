"""Hugging Face models through the batch contract, with real processes on gloo: GPT-2 under DDP
and FSDP, the global-batch equivalence on padded batches, exact resume after a kill, a BERT
classifier from JSON Lines under FSDP, and an image folder read by DataLoader workers.

The runs use the examples' configs (examples/README.md), shortened by overrides.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import (REPO, clean_env, cli_command, load_model, read_metrics, read_summary, run_cli,
                      require_modules, spawn_ranks)

require_modules("transformers", "datasets", "tokenizers", "PIL")

GPT2_CONFIG = REPO / "examples" / "gpt2_chars" / "config.yaml"
# No dropout: 2 ranks and 1 rank draw different dropout masks. Warmup, a cosine schedule,
# weight decay and clipping stay on.
GPT2 = ["--config", str(GPT2_CONFIG), "model.args.dropout=0.0", "train.max_steps=15",
        "eval.every_steps=5", "checkpoint.every_steps=4", "logging.every_steps=5",
        "logging.progress=none", "schedule.warmup_steps=3"]
TWO_RANKS = [*GPT2, "data.batch_size=8"]
ONE_RANK = [*GPT2, "data.batch_size=16"]
# Rank 1's 21st collate call: training step 8's batch (5 training batches, 13 validation
# batches at step 5, then steps 6, 7, 8): after the checkpoint of step 4, before step 8's.
KILL = {"KILL_RANK": "1", "KILL_AT": "21"}
# Metrics of the machine rather than of training: no two runs share them.
_MACHINE_KEYS = ("sys/", "train/samples_per_s", "train/tokens_per_s", "train/mfu",
                 "train/peak_memory_gb", "train/step_time")


def killing_collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The GPT-2 example's collate; on the first attempt of a torchrun job, rank KILL_RANK
    SIGKILLs itself at its KILL_AT-th call (training and validation batches both count)."""
    from examples.gpt2_chars.data import collate

    killing_collate.calls = getattr(killing_collate, "calls", 0) + 1  # type: ignore[attr-defined]
    if (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            and os.environ.get("RANK") == os.environ["KILL_RANK"]
            and killing_collate.calls == int(os.environ["KILL_AT"])):  # type: ignore[attr-defined]
        Path(f"killed-rank{os.environ['RANK']}").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return collate(items)


def _fsdp_gpt2(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    """The two-rank GPT-2 run under FSDP through the Trainer API: its units and shards, then fit."""
    from torch.distributed.fsdp import FSDPModule

    from ddp_train import Trainer
    from ddp_train.config import load_config

    sys.path.insert(0, str(REPO))  # the examples package, as `python -m ddp_train` in the repository sees it
    from examples.gpt2_chars.data import pieces

    config = load_config(GPT2_CONFIG, [*TWO_RANKS[2:], "train.strategy=fsdp",
                                       "train.fsdp.shard_modules=[GPT2Block]",
                                       f"run.output_dir={out_dir}", "run.name=fsdp"])
    with Trainer(config) as trainer:
        units = [type(module).__name__ for module in trainer.model.modules() if isinstance(module, FSDPModule)]
        local = sum(p.to_local().numel() for p in trainer.model.parameters())
        full = sum(p.numel() for p in trainer.model.parameters())
        summary = trainer.fit()
    return {"units": units, "local": local, "full": full, "status": summary["status"],
            "lengths": [len(item["input_ids"]) for item in pieces()[0]]}


def _start(args: list[str], cwd: Path, nproc: int, env: dict[str, str] | None = None,
           launcher_args: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(cli_command(args, nproc, launcher_args), cwd=cwd, env=env or clean_env(),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def gpt2_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The GPT-2 runs, side by side: 2 ranks × 8 (DDP), 1 rank × 16, the DDP run killed
    mid-epoch under torchrun --max-restarts=1, and FSDP (spawned, through the Trainer API)."""
    root = tmp_path_factory.mktemp("gpt2")
    for name in ("ddp", "single", "killed"):
        (root / name).mkdir()
    procs = {"ddp": _start(TWO_RANKS, root / "ddp", 2),
             "single": _start(ONE_RANK, root / "single", 1),
             "killed": _start([*TWO_RANKS, "data.collate=test_huggingface:killing_collate"],
                              root / "killed", 2, clean_env(**KILL), ("--max-restarts=1",))}
    try:
        fsdp_ranks = spawn_ranks(_fsdp_gpt2, 2, root / "fsdp", str(root / "fsdp"), timeout=200)
        deadline = time.monotonic() + 200
        results = {}
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():  # a timeout or a failed rank: no orphans
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
    return {"root": root, "results": results, "fsdp": fsdp_ranks,
            "dirs": {name: root / name / "runs" / "gpt2_chars" for name in results} | {
                "fsdp": root / "fsdp" / "fsdp"}}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=atol, msg=key)


@pytest.mark.timeout(300)
def test_gpt2_two_ranks_match_one_rank_with_twice_the_batch(gpt2_runs: dict[str, Any]) -> None:
    """2 ranks × 8 ≡ 1 rank × 16 on pieces of 16 to 64 tokens: every micro-batch is padded
    differently and counts a different number of tokens, which the trainer weights."""
    lengths = torch.tensor(gpt2_runs["fsdp"][0]["lengths"], dtype=torch.float)
    assert lengths.min() < 20 and lengths.max() > 60 and lengths.std() > 10
    dirs = gpt2_runs["dirs"]
    for name in ("ddp", "single"):
        summary = read_summary(dirs[name])
        assert summary["status"] == "completed" and summary["global_step"] == 15
    _assert_close(load_model(dirs["ddp"]), load_model(dirs["single"]), atol=1e-5)


@pytest.mark.timeout(300)
def test_gpt2_fsdp_shards_every_block_and_matches_ddp(gpt2_runs: dict[str, Any]) -> None:
    for rank in gpt2_runs["fsdp"]:
        # A unit per GPT2Block (2 layers), then the root with the embeddings and the head
        # (fully_shard gives each unit's class an FSDP prefix).
        assert rank["units"] == ["FSDPGPT2LMHeadModel", "FSDPGPT2Block", "FSDPGPT2Block"]
        assert rank["status"] == "completed"
        assert rank["local"] <= 0.55 * rank["full"]  # each rank holds about half of every parameter
    # Reduce-scatter and all-reduce add in different orders: equal up to float rounding.
    _assert_close(load_model(gpt2_runs["dirs"]["fsdp"]), load_model(gpt2_runs["dirs"]["ddp"]), atol=1e-5)


@pytest.mark.timeout(300)
def test_gpt2_killed_mid_epoch_resumes_bitwise(gpt2_runs: dict[str, Any]) -> None:
    killed, reference = gpt2_runs["dirs"]["killed"], gpt2_runs["dirs"]["ddp"]
    assert (gpt2_runs["root"] / "killed" / "killed-rank1").exists(), "the kill did not happen"
    assert "resuming from" in gpt2_runs["results"]["killed"].stderr
    assert read_summary(killed)["global_step"] == 15
    a, b = load_model(killed), load_model(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)

    def comparable(run_dir: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in record.items() if not k.startswith(_MACHINE_KEYS)}
                for record in read_metrics(run_dir)]

    assert comparable(killed) == comparable(reference)


@pytest.mark.timeout(300)
def test_gpt2_validation_perplexity_falls(gpt2_runs: dict[str, Any]) -> None:
    perplexity = [r["val/perplexity"] for r in read_metrics(gpt2_runs["dirs"]["ddp"]) if "val/perplexity" in r]
    assert len(perplexity) == 3 and perplexity[-1] < 0.8 * perplexity[0], perplexity


@pytest.mark.timeout(240)
def test_bert_from_jsonl_under_fsdp_reaches_90_percent(workdir: Path) -> None:
    """The BERT example sharded one BertLayer per unit: the JSON Lines files are written by
    the first rank to find them missing, read by both, and the classifier learns."""
    result = run_cli(["--config", str(REPO / "examples" / "bert_jsonl" / "config.yaml"),
                      "train.strategy=fsdp", "train.fsdp.shard_modules=[BertLayer]",
                      "logging.progress=none"], cwd=workdir, nproc=2, timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(workdir / "runs" / "bert_jsonl")
    assert summary["final"]["val/accuracy"] >= 0.9, summary["final"]
    assert (workdir / "data" / "bert_jsonl" / "train.jsonl").read_text().count("\n") == 2000


@pytest.mark.timeout(240)
def test_image_folder_with_workers_at_three_ranks(workdir: Path) -> None:
    """PNG files read by 2 DataLoader workers per rank: the CNN learns, and the 100 validation
    images, split 34/33/33 over the ranks, are each counted once."""
    result = run_cli(["--config", str(REPO / "examples" / "image_folder" / "config.yaml"),
                      "logging.progress=none"], cwd=workdir, nproc=3, timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(workdir / "runs" / "image_folder")
    assert summary["world_size"] == 3 and summary["final"]["val/samples"] == 100
    assert summary["final"]["val/accuracy"] >= 0.6, summary["final"]  # chance: 0.25
    assert len(list((workdir / "data" / "shapes").rglob("*.png"))) == 500
