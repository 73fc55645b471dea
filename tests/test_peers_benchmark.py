"""The peer benchmark's plumbing (benchmarks/peers.py): its batches, its clock, its statistics,
and one real 2-rank run of the hand-written loop, small enough for the suite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
# The benchmark's modules import each other by name, as they do when run as scripts.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peers
from common import spawn_ranks
from peer_loops import BLOCK_SIZE, PAD_ID, Contender, pad_collate, train_hand


def test_pad_collate_pads_to_the_block_masks_the_pads_and_ignores_them_in_the_loss() -> None:
    lengths = [3, BLOCK_SIZE, 40]
    items = [{"input_ids": torch.arange(n) % 256} for n in lengths]
    batch = pad_collate(items)
    assert {key: tuple(value.shape) for key, value in batch.items()} == {
        key: (3, BLOCK_SIZE) for key in ("input_ids", "attention_mask", "labels")}
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].sum() == length
        assert torch.equal(batch["input_ids"][row, :length], items[row]["input_ids"])
        assert torch.equal(batch["labels"][row, :length], items[row]["input_ids"])
        assert (batch["input_ids"][row, length:] == PAD_ID).all()
        assert (batch["labels"][row, length:] == -100).all()


def _runs(step_s: float, replicas: int = 4, scale: float = 1.0) -> list[dict[str, object]]:
    """Fake runs: replica r's steps take ``step_s`` × (1 + r/10) × ``scale`` (spread ±1%), and
    half that in CPU time."""
    runs = []
    for replica in range(replicas):
        steps = [step_s * (1 + replica / 10) * scale * (1 + d / 100) for d in (-1, 0, 1)]
        runs.append({"step_s": steps, "cpu_s": [x / 2 for x in steps], "loss_before": 5.5,
                     "loss_after": 3.5, "conditions": {"others_cores": 0.0}, "settings": {}})
    return runs


def test_ratios_pair_the_contenders_of_a_replica() -> None:
    """Drift between replicas (here +10% per replica, for all alike) cancels out of the ratio and
    its interval; a contender 5% slower in every replica reads 1.05, the A/A control 1."""
    results = peers.analyse({"hand": _runs(0.05), "hand_twin": _runs(0.05),
                             "ddp_train": _runs(0.05, scale=1.02), "lightning": _runs(0.05, scale=1.05)})
    for clock in ("wall", "cpu"):
        contenders = results[clock]["contenders"]
        assert contenders["hand_twin"]["ratio_to_hand"] == pytest.approx(1.0)
        assert contenders["lightning"]["ratio_to_hand"] == pytest.approx(1.05)
        assert contenders["lightning"]["ratio_to_hand_ci95"] == pytest.approx([1.05, 1.05])
        assert results[clock]["ours_over_peer"]["lightning"]["ratio"] == pytest.approx(1.02 / 1.05)
        assert set(results[clock]["ours_over_peer"]) == {"lightning"}
        assert results["goal"][clock] == {"met": True, "confirmed": True, "refuted": False}
    assert results["cpu"]["contenders"]["hand"]["summary_s"]["median"] == pytest.approx(
        results["wall"]["contenders"]["hand"]["summary_s"]["median"] / 2)
    assert "| `lightning` |" in peers.markdown({**results, "skipped": {}})


def test_a_contender_whose_package_is_missing_is_skipped_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(peers.CONTENDERS, "absent", Contender("needs a package that is not there",
                                                             train_hand, ("no_such_package.sub",)))
    runnable, skipped = peers.available(["hand", "absent"])
    assert runnable == ["hand"]
    assert skipped == {"absent": "not installed: no_such_package.sub"}


@pytest.mark.timeout(120)
def test_a_real_run_times_every_step_after_the_warmup_and_trains() -> None:
    """Two gloo ranks run the hand-written loop: the clock sees one forward per optimizer step
    (the run checks the count), the warm-up steps are set apart, and the held-out loss falls."""
    steps, warmup = 3, 2
    result = spawn_ranks(peers._rank_main, 2, "hand", steps, warmup, timeout=100)[0]
    assert len(result["step_s"]) == len(result["cpu_s"]) == steps
    assert len(result["warmup_step_s"]) == warmup
    assert all(0 < seconds < 30 for seconds in result["step_s"] + result["cpu_s"])
    assert result["loss_after"] < result["loss_before"] - 0.1
