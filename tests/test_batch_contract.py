"""The batch contract, data.collate, train.step_fn and iterable data, proven with real processes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from batch_components import read_ids
from conftest import clean_env, load_model, read_metrics, read_summary, run_cli, run_cli_concurrently

COMMON = ["logging.progress=none", "logging.every_steps=2", "optim.name=sgd", "optim.lr=0.2",
          "optim.momentum=0.9", "schedule.name=cosine", "schedule.warmup_steps=2"]
DICT = [*COMMON, "model.name=batch_components:loss_mlp", "data.name=batch_components:dict_blobs",
        "train.max_steps=18", "train.epochs=5"]
LM = [*COMMON, "model.name=batch_components:tiny_lm", "data.name=batch_components:padded_sequences",
      "data.collate=batch_components:pad_collate", "train.max_steps=10", "train.epochs=5", "optim.lr=0.5",
      "eval.every_steps=3"]
STREAM = [*COMMON, "model.name=batch_components:loss_mlp", "data.name=batch_components:stream_blobs",
          "train.epochs=2", "schedule.name=constant"]


def _runs(workdir: Path, common: list[str], runs: dict[str, tuple[int, int, int]],
          extra: tuple[str, ...] = ()) -> dict[str, dict[str, torch.Tensor]]:
    """Final weights of runs named by ``(nproc, batch, accum)``, trained side by side."""
    results = run_cli_concurrently(
        [([*common, f"run.name={name}", f"data.batch_size={batch}", f"train.grad_accum_steps={accum}",
           *extra], nproc) for name, (nproc, batch, accum) in runs.items()], cwd=workdir)
    for result in results:
        assert result.returncode == 0, result.stderr
    return {name: load_model(workdir / "runs" / name) for name in runs}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6) for key in a)


@pytest.mark.timeout(300)
def test_dict_batches_with_a_model_loss_are_equivalent_across_world_sizes(workdir: Path) -> None:
    """Mapping batches, model(**batch) returning {"loss", "logits"}: 2×B ≡ 1×2B ≡ accumulation."""
    models = _runs(workdir, DICT, {"1x16": (1, 16, 1), "2x8": (2, 8, 1), "1x8x2": (1, 8, 2),
                                   "1x32": (1, 32, 1)})
    assert _same(models["1x16"], models["2x8"]) and _same(models["1x16"], models["1x8x2"])
    assert not _same(models["1x16"], models["1x32"])  # the comparison can fail
    final = read_summary(workdir / "runs" / "2x8")["final"]
    # Metrics from the model's logits and the batch's labels, every sample counted once.
    assert final["val/samples"] == 50 and final["val/accuracy"] > 0.5


@pytest.mark.timeout(300)
def test_padded_language_model_counts_every_token_alike(workdir: Path) -> None:
    """With padding, micro-batches hold different numbers of tokens: the trainer weights each
    micro-batch by its counted tokens, so 2×B ≡ 1×2B ≡ accumulation even then; without the
    weighting (no language-model task) they differ."""
    models = _runs(workdir, LM, {"1x8": (1, 8, 1), "2x4": (2, 4, 1), "1x4x2": (1, 4, 2)})
    assert _same(models["1x8"], models["2x4"]) and _same(models["1x8"], models["1x4x2"])
    unweighted = _runs(workdir, [*LM, "eval.task=none"], {"plain_1x8": (1, 8, 1), "plain_2x4": (2, 4, 1)})
    assert not _same(unweighted["plain_1x8"], unweighted["plain_2x4"])
    metrics = [m for m in read_metrics(workdir / "runs" / "2x4") if "val/loss" in m]
    tokens = sum(len(t) - 1 for t in __import__("batch_components").PaddedSequences(40, 1).items)
    assert metrics[-1]["val/samples"] == 40 and 0 <= metrics[-1]["val/accuracy"] <= 1
    assert metrics[-1]["val/perplexity"] == pytest.approx(torch.tensor(metrics[-1]["val/loss"]).exp().item())
    assert metrics[-1]["val/loss"] < metrics[0]["val/loss"] and tokens > 40


@pytest.mark.timeout(240)
def test_step_fn_twice_the_loss_trains_as_twice_the_lr(workdir: Path) -> None:
    """train.step_fn returning 2 × cross entropy at lr η trains exactly as the built-in loss at 2η
    (plain SGD); its extra value is logged as train/<name>; validation uses it for val/loss."""
    base = ["logging.progress=none", "logging.every_steps=4", "model.name=user_components:tiny_mlp",
            "data.name=user_components:blobs", "data.args.n_train=96", "data.args.n_val=31",
            "optim.name=sgd", "optim.momentum=0", "train.max_steps=12", "data.batch_size=8"]
    results = run_cli_concurrently([
        ([*base, "run.name=step_fn", "optim.lr=0.05", "train.step_fn=batch_components:double_cross_entropy"], 2),
        ([*base, "run.name=builtin", "optim.lr=0.1"], 2)], cwd=workdir)
    for result in results:
        assert result.returncode == 0, result.stderr
    step_fn, builtin = (load_model(workdir / "runs" / name) for name in ("step_fn", "builtin"))
    assert _same(step_fn, builtin)
    records = read_metrics(workdir / "runs" / "step_fn")
    logged = [r for r in records if "train/plain_ce" in r]
    assert len(logged) == 3 and all(r["train/loss"] == pytest.approx(2 * r["train/plain_ce"], rel=1e-5)
                                    for r in logged)
    final = read_summary(workdir / "runs" / "step_fn")["final"]
    builtin_final = read_summary(workdir / "runs" / "builtin")["final"]
    assert final["val/loss"] == pytest.approx(2 * builtin_final["val/loss"], rel=1e-4)
    assert final["val/samples"] == 31


@pytest.mark.parametrize("form", ["tuple", "mapping"])
def test_pair_inputs_as_tuple_or_mapping(workdir: Path, form: str) -> None:
    """(inputs, targets) with tuple inputs → model(*inputs); mapping inputs → model(**inputs);
    a tuple output's first element is the prediction."""
    result = run_cli(["logging.progress=none", "model.name=batch_components:two_inputs",
                      "data.name=batch_components:pair_blobs", f"data.args.form={form}",
                      "train.epochs=3", "data.batch_size=16", "eval.task=classification"], cwd=workdir)
    assert result.returncode == 0, result.stderr
    final = read_summary(workdir / "runs" / "default")["final"]
    assert final["val/samples"] == 31 and final["val/accuracy"] > 0.6


@pytest.mark.timeout(300)
def test_iterable_data_is_sharded_like_map_style_data(workdir: Path) -> None:
    """A stream without __len__: 2 ranks × B ≡ 1 rank × 2B (also with DataLoader workers), every
    item of an epoch trained on once, every validation item counted once."""
    log = workdir / "ids"
    models = _runs(workdir, [*STREAM, "train.max_steps=20"], {"1x16": (1, 16, 1), "2x8": (2, 8, 1)})
    workers = run_cli([*STREAM, "run.name=workers", "data.batch_size=8", "data.num_workers=2",
                       "train.max_steps=20"], cwd=workdir, nproc=2, timeout=200)
    assert workers.returncode == 0, workers.stderr
    assert _same(models["1x16"], models["2x8"])
    assert _same(models["2x8"], load_model(workdir / "runs" / "workers"))
    epoch = run_cli([*STREAM, "run.name=epoch", "data.batch_size=8", "train.epochs=1"], cwd=workdir,
                    nproc=2, env=clean_env(ID_LOG=str(log)))
    assert epoch.returncode == 0, epoch.stderr
    summary = read_summary(workdir / "runs" / "epoch")
    # 204 items, global batch 16: 12 full steps, the 12 items left over dropped.
    assert summary["global_step"] == 12 and summary["epochs_completed"] == 1
    ids = read_ids(log)
    assert len(ids) == 192 and len(set(ids)) == 192
    assert summary["final"]["val/samples"] == 51


@pytest.mark.timeout(200)
def test_uneven_stream_shards_end_the_epoch_together(workdir: Path) -> None:
    """31 items on 2 ranks × batch 8: rank 0 has two full batches, rank 1 one. The epoch ends for
    both after one step (no hang), three times over."""
    result = run_cli([*STREAM, "data.args.n_train=31", "data.batch_size=8", "train.epochs=3",
                      "dist.timeout_s=30"], cwd=workdir, nproc=2, timeout=150)
    assert result.returncode == 0, result.stderr
    summary = read_summary(workdir / "runs" / "default")
    assert summary["global_step"] == 3 and summary["epochs_completed"] == 3


def test_a_stream_of_unknown_length_and_a_decaying_schedule_need_steps_per_epoch(workdir: Path) -> None:
    """A cosine schedule needs the run's length, which a stream without __len__ leaves open."""
    args = [*STREAM, "data.args.endless=true", "data.batch_size=8", "schedule.name=cosine"]
    refused = run_cli(args, cwd=workdir)
    assert refused.returncode == 2 and "data.steps_per_epoch" in refused.stderr
    assert "Traceback" not in refused.stderr
    bounded = run_cli([*args, "data.steps_per_epoch=5", "train.epochs=2"], cwd=workdir)
    assert bounded.returncode == 0, bounded.stderr
    summary = read_summary(workdir / "runs" / "default")
    assert summary["global_step"] == 10 and summary["epochs_completed"] == 2


@pytest.mark.timeout(300)
def test_an_endless_stream_resumes_bitwise_after_a_kill(workdir: Path) -> None:
    """Killed mid-epoch at step 7 of a 5-step-epoch stream, resumed by auto-resume: the final
    model equals an uninterrupted run's bit for bit, and the resumed run skips exactly the
    items already trained on."""
    args = [*STREAM, "data.args.endless=true", "data.batch_size=8", "data.steps_per_epoch=5",
            "train.epochs=3", "checkpoint.every_steps=1", "checkpoint.keep_last=1"]
    reference = run_cli([*args, "run.name=reference"], cwd=workdir, nproc=2)
    assert reference.returncode == 0, reference.stderr
    first = run_cli([*args, "run.name=resumed", "train.max_steps=7"], cwd=workdir, nproc=2)
    assert first.returncode == 0, first.stderr
    log = workdir / "ids"
    second = run_cli([*args, "run.name=resumed"], cwd=workdir, nproc=2, env=clean_env(ID_LOG=str(log)))
    assert second.returncode == 0, second.stderr
    reference_model, resumed_model = (load_model(workdir / "runs" / n) for n in ("reference", "resumed"))
    assert all(torch.equal(reference_model[k], resumed_model[k]) for k in reference_model)
    # Steps 8..15 of the stream: epoch 1's steps 3-5 (items 32..79), epoch 2's 1-5 (items 0..79).
    assert Counter(read_ids(log)) == Counter([*range(32, 80), *range(80)])


@pytest.mark.timeout(300)
def test_resume_at_another_global_batch_uses_every_sample_once(workdir: Path) -> None:
    """A 2-rank run stopped mid-epoch, resumed at world size 1 with the same data.batch_size (the
    global batch halves), then with another grad_accum_steps: across the runs every training
    sample of the epoch is used exactly once."""
    log = workdir / "ids"
    args = [*DICT, "train.epochs=1", "data.batch_size=8", "checkpoint.every_steps=1",
            "data.args.n_train=200"]  # 200 samples: 12 steps of 16 at 2 ranks, 8 left over
    env = clean_env(ID_LOG=str(log))
    first = run_cli([*args, "train.max_steps=5"], cwd=workdir, nproc=2, env=env)  # 80 samples
    assert first.returncode == 0, first.stderr
    second = run_cli([*args, "train.max_steps=9"], cwd=workdir, nproc=1, env=env)  # + 4 × 8
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stderr
    third = run_cli([*args, "train.grad_accum_steps=3"], cwd=workdir, nproc=1, env=env)  # + 3 × 24
    assert third.returncode == 0, third.stderr
    ids = read_ids(log)
    counts = Counter(ids)
    assert max(counts.values()) == 1, "a sample was trained on twice"
    # 80 + 32 + 72 = 184 of 200; the 16 left are fewer than one global batch of 24.
    assert len(ids) == 184
    summary = read_summary(workdir / "runs" / "default")
    assert summary["status"] == "completed" and summary["epochs_completed"] == 1
    assert summary["global_step"] == 12


@pytest.mark.parametrize("args, expected", [
    (["data.name=batch_components:strings"], "of 16 str"),
    (["model.name=batch_components:says_hello"], "'greeting': str"),
    (["model.name=batch_components:tiny_lm", "data.name=user_components:blobs"], "does not take"),
    # A model that does not fit the data: its first forward's error, with where it was raised.
    (["model.args.in_features=5"], "the first batch failed (RuntimeError at "),
    (["model.args.out_features=2"], "the first batch failed ("),
    (["eval.task=regression"], "eval.task: regression compares predictions with targets of the same shape"),
    (["eval.task=classification", "loss.name=mse", "data.name=batch_components:regression_blobs"],
     "eval.task: classification expects integer class indices"),
])
def test_an_unusable_batch_or_output_is_one_line_exit_2(workdir: Path, args: list[str], expected: str) -> None:
    result = run_cli(["logging.progress=none", "data.batch_size=16", "train.max_steps=2",
                      "model.name=user_components:tiny_mlp", "data.name=user_components:blobs",
                      *args], cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and expected in errors[0], result.stderr
