"""The distributed semantics users rely on (README), proven with real processes on gloo."""


from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from sklearn import metrics as skm

from conftest import load_model, read_summary, run_cli, run_cli_concurrently, spawn_ranks
from ddp_train import Trainer
from ddp_train.config import load_config

# A user model and data, SGD with momentum, fp32, shuffled, crossing an epoch boundary
# (204 training samples / global batch 16 = 12 steps per epoch; 20 steps in all).
EQUIV = ["model.name=user_components:tiny_mlp", "data.name=user_components:blobs",
         "data.args.n_train=204", "data.args.n_val=50", "loss.name=cross_entropy",
         "optim.name=sgd", "optim.lr=0.2", "optim.momentum=0.9", "schedule.name=cosine",
         "schedule.warmup_steps=3", "train.max_steps=20", "train.epochs=5",
         "logging.progress=none", "logging.every_steps=5"]


def _train_all(workdir: Path, runs: dict[str, tuple[int, int, int]], extra: tuple[str, ...] = ()
               ) -> dict[str, dict[str, torch.Tensor]]:
    """The final weights of runs named by ``(nproc, batch, accum)``, trained side by side."""
    results = run_cli_concurrently(
        [([*EQUIV, f"run.name={name}", f"data.batch_size={batch}", f"train.grad_accum_steps={accum}",
           *extra], nproc) for name, (nproc, batch, accum) in runs.items()], cwd=workdir)
    models = {}
    for (name, (nproc, _, _)), result in zip(runs.items(), results):
        assert result.returncode == 0, result.stderr
        summary = read_summary(workdir / "runs" / name)
        assert summary["world_size"] == nproc and summary["global_step"] == 20
        models[name] = load_model(workdir / "runs" / name)
    return models


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def _differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


@pytest.mark.timeout(240)
def test_global_batch_equivalence(workdir: Path) -> None:
    """N ranks × B ≡ 1 rank × N·B, and k micro-batches ≡ one batch k times larger."""
    models = _train_all(workdir, {"1x16": (1, 16, 1), "2x8": (2, 8, 1), "1x32": (1, 32, 1),
                                  "1x8x4": (1, 8, 4), "2x8x2": (2, 8, 2)})
    _assert_same(models["1x16"], models["2x8"])
    _assert_same(models["1x32"], models["1x8x4"])
    _assert_same(models["1x32"], models["2x8x2"])
    # The comparison can fail: a different global batch gives different weights.
    assert _differs(models["1x16"], models["1x32"])


def _count_allreduces(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    """Train 3 optimizer steps of 4 micro-batches; record when gradients are all-reduced."""
    from user_components import blobs, tiny_mlp

    micro_batches = 0
    calls: list[int] = []

    def counting_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal micro_batches
        micro_batches += 1
        return torch.nn.functional.cross_entropy(outputs, targets)

    def counting_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        calls.append(micro_batches)  # the micro-batch whose backward triggered the reduce
        work = dist.all_reduce(bucket.buffer().div_(world_size), async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    config = load_config(None, ["train.grad_accum_steps=4", "train.max_steps=3", "data.batch_size=4",
                                "logging.progress=none", "eval.task=none",
                                "dist.bucket_cap_mb=100", f"run.output_dir={out_dir}/runs{rank}"])
    train, val = blobs(n_train=96)
    with Trainer(config, model=tiny_mlp(), train_dataset=train, val_dataset=None,
                 loss_fn=counting_loss) as trainer:
        assert isinstance(trainer.model, DistributedDataParallel)
        trainer.model.register_comm_hook(None, counting_hook)
        trainer.fit()
        steps = trainer.progress.global_step
    return {"calls": calls, "steps": steps, "micro_batches": micro_batches}


@pytest.mark.timeout(120)
def test_one_allreduce_per_optimizer_step(tmp_path: Path) -> None:
    for result in spawn_ranks(_count_allreduces, 2, tmp_path, str(tmp_path)):
        assert result["steps"] == 3 and result["micro_batches"] == 12
        # One bucket: exactly one all-reduce per optimizer step, on its last micro-batch.
        assert result["calls"] == [4, 8, 12]


def _validate_101(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    """Validation metrics of fixed classification and regression models on 101 samples."""
    # Two Trainers in one process: the caller owns the process group, the Trainers share it.
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    n, classes = 101, 5
    inputs = torch.randn(n, 6)
    problems = {"classification": (torch.randint(0, classes, (n,)), torch.nn.Linear(6, classes)),
                "regression": (inputs @ torch.randn(6, 2) + 0.3 * torch.randn(n, 2), torch.nn.Linear(6, 2))}
    results = {}
    for task, (targets, model) in problems.items():
        dataset = torch.utils.data.TensorDataset(inputs, targets)
        loss = "cross_entropy" if task == "classification" else "mse"
        config = load_config(None, [f"loss.name={loss}", "data.batch_size=8", "logging.progress=none",
                                    f"run.output_dir={out_dir}/runs{rank}", f"run.name={task}"])
        with Trainer(config, model=model, train_dataset=dataset, val_dataset=dataset) as trainer:
            metrics = trainer.evaluate()
        with torch.no_grad():
            results[task] = {"metrics": metrics, "outputs": model(inputs), "targets": targets}
    assert dist.is_initialized(), "a Trainer must not tear down a process group it did not create"
    dist.destroy_process_group()
    return results


def _direct_metrics(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """The same metrics computed directly over all samples (torch and scikit-learn)."""
    if task == "classification":
        predicted, y = outputs.argmax(1).numpy(), targets.numpy()
        return {"val/loss": torch.nn.functional.cross_entropy(outputs, targets).item(),
                "val/accuracy": skm.accuracy_score(y, predicted),
                "val/precision_macro": skm.precision_score(y, predicted, average="macro", zero_division=0),
                "val/recall_macro": skm.recall_score(y, predicted, average="macro", zero_division=0),
                "val/f1_macro": skm.f1_score(y, predicted, average="macro", zero_division=0),
                "val/confusion_matrix": skm.confusion_matrix(y, predicted, labels=range(5)).tolist()}
    y, y_hat = targets.numpy(), outputs.numpy()
    return {"val/loss": torch.nn.functional.mse_loss(outputs, targets).item(),
            "val/mse": skm.mean_squared_error(y, y_hat), "val/mae": skm.mean_absolute_error(y, y_hat),
            "val/r2": skm.r2_score(y, y_hat, multioutput="variance_weighted")}


@pytest.mark.timeout(240)
def test_validation_counts_every_sample_once(tmp_path: Path) -> None:
    """101 samples at world sizes 1, 2, 3 (uneven shards) ≡ a direct computation."""
    for world_size in (1, 2, 3):
        out_dir = tmp_path / str(world_size)
        for rank_result in spawn_ranks(_validate_101, world_size, out_dir, str(out_dir)):
            for task, result in rank_result.items():  # every rank holds the same reduced metrics
                got = result["metrics"]
                assert got["val/samples"] == 101
                for key, value in _direct_metrics(task, result["outputs"], result["targets"]).items():
                    if isinstance(value, list):
                        assert got[key] == value, (world_size, key)
                    else:
                        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (world_size, key)


class _RankOneWantsToStop:
    """Early stopping whose local verdict differs by rank (rank 1 says stop at once)."""

    def __init__(self, inner: Any, rank: int) -> None:
        self.inner, self.rank = inner, rank
        self.config = inner.config

    def update(self, metrics: dict[str, Any], step: int) -> bool:
        return self.inner.update(metrics, step) or self.rank == 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _early_stop_disagreeing(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    from user_components import blobs, tiny_mlp

    config = load_config(None, ["train.epochs=6", "data.batch_size=8", "logging.progress=none",
                                "train.early_stopping.enabled=true", f"run.output_dir={out_dir}/runs{rank}"])
    train, val = blobs()
    with Trainer(config, model=tiny_mlp(), train_dataset=train, val_dataset=val) as trainer:
        trainer.early_stopping = _RankOneWantsToStop(trainer.early_stopping, rank)  # type: ignore[assignment]
        summary = trainer.fit()
    return {"status": summary["status"], "step": summary["global_step"],
            "epochs": summary["epochs_completed"]}


@pytest.mark.timeout(120)
def test_early_stopping_decision_is_shared_by_all_ranks(tmp_path: Path) -> None:
    """Rank 1 alone wants to stop after the first epoch: both ranks stop there together."""
    rank0, rank1 = spawn_ranks(_early_stop_disagreeing, 2, tmp_path, str(tmp_path))
    assert rank0 == rank1 == {"status": "early_stopped", "step": 16, "epochs": 1}


@pytest.mark.timeout(120)
def test_early_stopping_two_ranks_cli(workdir: Path) -> None:
    """A diverging LR makes val/loss worsen: both ranks stop at the same epoch, exit 0."""
    result = run_cli(["model.name=user_components:tiny_mlp", "data.name=user_components:blobs",
                      "optim.name=sgd", "optim.lr=4.0", "train.epochs=30", "data.batch_size=8",
                      "train.early_stopping.enabled=true", "train.early_stopping.patience=2",
                      "logging.progress=none"], cwd=workdir, nproc=2)
    assert result.returncode == 0, result.stderr
    summary = read_summary(workdir / "runs" / "default")
    assert summary["status"] == "early_stopped"
    assert summary["epochs_completed"] < 30
    assert summary["best"]["step"] < summary["global_step"]


def _bucket_norms(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    """GradNorm and get_total_norm on the same DDP gradients held in different bucket layouts."""
    from torch.nn.parallel import DistributedDataParallel

    from ddp_train.distributed.grad_norm import GradNorm
    from ddp_train.components.models import gpt

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results: dict[str, Any] = {}
    for name, bucket_cap_mb, as_view in [("one_bucket", 100.0, True), ("many_buckets", 0.05, True),
                                         ("no_views", 25.0, False)]:
        torch.manual_seed(0)  # the same model, data and so gradients in every layout
        model = gpt(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
        ddp = DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=as_view)
        params = [p for p in model.parameters() if p.requires_grad]
        norm = GradNorm(params)
        for step in range(3):  # DDP rebuilds its buckets after the first step
            tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(rank * 10 + step))
            logits = ddp(tokens)
            torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tokens.reshape(-1)).backward()
            grads = [p.grad for p in params if p.grad is not None]
            results[f"{name}_{step}"] = (norm(grads).item(), torch.nn.utils.get_total_norm(grads).item())
            for p in params:
                p.grad = None
        del ddp
    dist.destroy_process_group()
    return results


@pytest.mark.timeout(120)
def test_gradient_norm_does_not_depend_on_ddp_buckets(tmp_path: Path) -> None:
    """The same gradients give the same norm, bit for bit, in one bucket, in many, before and
    after DDP regroups its buckets, and without bucket views: a restarted run (whose first step
    has DDP's initial layout) clips exactly as the uninterrupted one. It is get_total_norm's."""
    for result in spawn_ranks(_bucket_norms, 2, tmp_path, str(tmp_path)):
        for step in range(3):
            norms = {result[f"{name}_{step}"][0] for name in ("one_bucket", "many_buckets", "no_views")}
            assert len(norms) == 1, (step, norms)
        for key, (ours, reference) in result.items():
            assert ours == reference, key
