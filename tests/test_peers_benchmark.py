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


def _replicas(scales: dict[str, float], replicas: int = 3, rounds: int = 4) -> list[dict[str, object]]:
    """Fake replicas: in round r of replica i a contender's steps take 50 ms × its scale ×
    (1 + i/10) × (1 + r/20), spread ±1%, half that in CPU time, and a tenth between steps."""
    fakes = []
    for replica in range(replicas):
        contenders = {}
        for name, scale in scales.items():
            turns = [[0.05 * scale * (1 + replica / 10) * (1 + r / 20) * (1 + d / 100) for d in (-1, 0, 1)]
                     for r in range(rounds)]
            contenders[name] = {"step_s": turns, "cpu_s": [[x / 2 for x in turn] for turn in turns],
                                "between_s": [[x / 10 for x in turn] for turn in turns],
                                "loss_before": 5.5, "loss_after": 3.5, "settings": {}}
        fakes.append({"contenders": contenders})
    return fakes


def test_ratios_pair_the_contenders_of_a_round() -> None:
    """Drift between replicas and rounds (here +10% per replica, +5% per round, for all alike)
    cancels out of the ratios and their intervals: a contender 5% slower in every round reads
    1.05, the A/A control 1."""
    results = peers.analyse(_replicas({"hand": 1.0, "hand_twin": 1.0, "ddp_train": 1.02,
                                       "lightning": 1.05}))
    for clock in ("wall", "cpu", "between"):
        contenders = results[clock]["contenders"]
        assert contenders["hand_twin"]["ratio_to_hand"] == pytest.approx(1.0)
        assert contenders["lightning"]["ratio_to_hand"] == pytest.approx(1.05)
        assert contenders["lightning"]["ratio_to_hand_ci95"] == pytest.approx([1.05, 1.05])
        assert contenders["lightning"]["ratio_to_hand_per_replica"] == pytest.approx([1.05] * 3)
        assert results[clock]["ours_over_peer"]["lightning"]["ratio"] == pytest.approx(1.02 / 1.05)
        assert set(results[clock]["ours_over_peer"]) == {"lightning"}
    for clock in ("wall", "cpu"):
        assert results["goal"][clock] == {"met": True, "confirmed": True, "refuted": False}
    assert results["cpu"]["contenders"]["hand"]["summary_s"]["median"] == pytest.approx(
        results["wall"]["contenders"]["hand"]["summary_s"]["median"] / 2)
    # The hand loop's median step is 50 ms × 1.1 (replica 1 of 0..2) × 1.075 (between rounds 1 and 2).
    hand_ms = 50 * 1.1 * 1.075
    assert results["between"]["contenders"]["lightning"]["added_s"] * 1e3 == pytest.approx(
        hand_ms * 0.05 / 10, rel=0.05)
    assert "| `lightning` |" in peers.markdown({**results, "skipped": {}})


def test_a_contender_whose_package_is_missing_is_skipped_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(peers.CONTENDERS, "absent", Contender("needs a package that is not there",
                                                             train_hand, ("no_such_package.sub",)))
    runnable, skipped = peers.available(["hand", "absent"])
    assert runnable == ["hand"]
    assert skipped == {"absent": "not installed: no_such_package.sub"}


@pytest.mark.timeout(120)
def test_two_contenders_take_turns_and_every_step_is_timed() -> None:
    """Two gloo ranks run two copies of the hand-written loop in turns: each turn times its
    steps but the cold first one (the run checks that the clock saw every forward), warm-up
    and the last step are set apart, and both copies train."""
    rounds, steps_per_turn, warmup = 2, 3, 2
    orders = [["hand", "hand_twin"], ["hand_twin", "hand"]]
    result = spawn_ranks(peers._rank_main, 2, ["hand", "hand_twin"], orders, steps_per_turn,
                         warmup, timeout=100)[0]
    for name in ("hand", "hand_twin"):
        run = result[name]
        assert [len(turn) for turn in run["step_s"]] == [steps_per_turn - peers.COLD_STEPS] * rounds
        assert [len(turn) for turn in run["cpu_s"]] == [steps_per_turn - peers.COLD_STEPS] * rounds
        assert len(run["warmup_step_s"]) == warmup
        assert all(0 < seconds < 30 for turn in run["step_s"] + run["cpu_s"] for seconds in turn)
        # The loop's work between steps is a part of each step.
        assert all(0 < gap < step for gaps, steps in zip(run["between_s"], run["step_s"])
                   for gap, step in zip(gaps, steps))
        assert run["loss_after"] < run["loss_before"] - 0.1
