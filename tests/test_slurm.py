"""slurm/*.sbatch on a real one-node Slurm cluster: runs, preemption, requeue, exact resume.

The cluster is the one tests/slurm_cluster.sh started (CI's .ci/run does), or one this module
starts and stops itself where Slurm is installed and the tests run as root. Elsewhere the
tests skip, except in CI (CI=true), where they fail: there they must run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NoReturn

import pytest
import torch

from conftest import REPO, TESTS, clean_env, load_model, read_summary

CLUSTER_SCRIPT = TESTS / "slurm_cluster.sh"
MAX_STEPS = 200
# slow_loss makes a step take tens of milliseconds, so that a signal sent at step 20 lands
# well before the end; logging every step shows the progress in metrics.jsonl.
SLOW = ["model.name=user_components:tiny_mlp", "data.name=user_components:blobs",
        "loss.name=user_components:slow_loss", f"train.max_steps={MAX_STEPS}", "train.epochs=1000",
        "logging.every_steps=1", "checkpoint.every_epochs=0", "logging.progress=none"]
# A job in any other state may still run (PENDING, RUNNING, COMPLETING, REQUEUED, ...).
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@dataclass
class Job:
    """A submitted batch job and the directory it runs in."""

    job_id: int
    workdir: Path

    @property
    def log(self) -> str:
        """The job's output file: ``<job name>-<job id>.out``, appended to by every start."""
        path = self.workdir / f"ddp_train-{self.job_id}.out"
        return path.read_text() if path.exists() else "(no log yet)"

    @property
    def run_dir(self) -> Path:
        """The ddp_train run directory (the default run name)."""
        return self.workdir / "runs" / "default"


@dataclass
class Cluster:
    """Client side of the test cluster: submit, inspect, signal and wait for jobs."""

    env: dict[str, str]

    def _run(self, *cmd: str) -> str:
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{' '.join(cmd)}: {result.stderr}"
        return result.stdout

    def submit(self, script: str, args: list[str], workdir: Path, *sbatch_options: str,
               **env: str) -> Job:
        """``sbatch`` a script of the repository from ``workdir``, with ``env`` added."""
        # A time limit so that a job that hangs goes away even if this test cannot cancel it.
        cmd = ["sbatch", "--parsable", "--time=5", *sbatch_options, str(REPO / script), *args]
        result = subprocess.run(cmd, cwd=workdir, env={**self.env, **env}, capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return Job(int(result.stdout.strip().split(";")[0]), workdir)

    def field(self, job: Job, name: str) -> str:
        """One field of ``scontrol show job`` (JobState, Restarts, ExitCode, ...)."""
        match = re.search(rf"\b{name}=(\S+)", self._run("scontrol", "show", "job", "-o", str(job.job_id)))
        assert match, name
        return match.group(1)

    def finished(self, job: Job) -> bool:
        """True once the job is over for good (a requeued job is not)."""
        return self.field(job, "JobState") in FINISHED

    def signal_batch_shell(self, job: Job) -> None:
        """USR2 to the batch shell only: what ``#SBATCH --signal=B:USR2@...`` does before the
        time limit."""
        self._run("scancel", "--batch", "--signal=USR2", str(job.job_id))

    def wait(self, job: Job, timeout: float = 120) -> str:
        """Wait for the job to finish for good; its final JobState."""
        deadline = time.monotonic() + timeout
        while not self.finished(job):
            if time.monotonic() > deadline:
                self.cancel(job)
                pytest.fail(f"job {job.job_id} still not finished after {timeout} s:\n{job.log}")
            time.sleep(0.25)
        return self.field(job, "JobState")

    def wait_for_step(self, job: Job, step: int, timeout: float = 90) -> None:
        """Wait until the job's metrics.jsonl shows optimizer step ``step``."""
        metrics = job.run_dir / "metrics.jsonl"
        deadline = time.monotonic() + timeout
        # A regular expression, not JSON: the last line may be half written.
        while not (metrics.exists() and any(int(done) >= step for done in
                                            re.findall(r'"step": (\d+)', metrics.read_text()))):
            if self.finished(job) or time.monotonic() > deadline:
                self.cancel(job)
                pytest.fail(f"job {job.job_id} did not reach step {step} while running:\n{job.log}")
            time.sleep(0.1)

    def cancel(self, job: Job) -> None:
        """Cancel the job, whatever its state (a failing test leaves nothing running)."""
        subprocess.run(["scancel", str(job.job_id)], env=self.env, capture_output=True, timeout=30)


def _unavailable(reason: str) -> NoReturn:
    """Skip, or fail under CI, where the Slurm tests must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI needs the Slurm test cluster: {reason}")
    pytest.skip(reason)


def _cluster_status() -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """The running test cluster; started here (and stopped at the end) when it is not up."""
    started = False
    status = _cluster_status()
    if status.returncode != 0:
        if os.geteuid() != 0:
            _unavailable("no Slurm test cluster is running, and starting one needs root")
        if shutil.which("slurmctld") is None or shutil.which("munged") is None:
            _unavailable("Slurm and munge are not installed: run tests/slurm_cluster.sh start as root "
                         "(it installs slurm-wlm and munge with apt-get)")
        start = subprocess.run([str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=120)
        status = _cluster_status()
        if status.returncode != 0:
            subprocess.run([str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=60)
            _unavailable(f"tests/slurm_cluster.sh start could not start the cluster: {start.stderr[-2000:]}")
        started = True
    slurm_conf = status.stdout.strip().splitlines()[-1].removeprefix("SLURM_CONF=")
    # sbatch hands this environment to the job: the test's Python, tests/ importable.
    yield Cluster(clean_env(SLURM_CONF=slurm_conf, PYTHON=sys.executable))
    if started:
        subprocess.run([str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=60)


def _assert_equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Job:
    """``sbatch slurm/train.sbatch SLOW``, never interrupted."""
    job = cluster.submit("slurm/train.sbatch", SLOW, tmp_path_factory.mktemp("reference"))
    cluster.wait(job)
    return job


@pytest.mark.timeout(180)
def test_train_sbatch_runs_torchrun_per_node_at_world_size_2(cluster: Cluster, reference: Job) -> None:
    """One node, torchrun with one worker per CPU of the task (2): completed, world size 2."""
    assert cluster.field(reference, "JobState") == "COMPLETED", reference.log
    assert cluster.field(reference, "Restarts") == "0"
    assert "--nproc-per-node=2" in reference.log and "--rdzv-backend=c10d" in reference.log
    summary = read_summary(reference.run_dir)
    assert summary["status"] == "completed", reference.log
    assert summary["world_size"] == 2 and summary["global_step"] == MAX_STEPS


@pytest.mark.timeout(180)
def test_train_srun_sbatch_runs_one_task_per_rank(cluster: Cluster, reference: Job, tmp_path: Path) -> None:
    """Two srun tasks without torchrun: world size 2, and the torchrun job's model."""
    job = cluster.submit("slurm/train_srun.sbatch", SLOW, tmp_path)
    assert cluster.wait(job) == "COMPLETED", job.log
    assert "torch.distributed.run" not in job.log
    summary = read_summary(job.run_dir)
    assert summary["status"] == "completed" and summary["world_size"] == 2, job.log
    srun_model, torchrun_model = load_model(job.run_dir), load_model(reference.run_dir)
    assert srun_model.keys() == torchrun_model.keys()
    for key in srun_model:
        torch.testing.assert_close(srun_model[key], torchrun_model[key], msg=key)


@pytest.mark.timeout(240)
def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(
        cluster: Cluster, reference: Job, tmp_path: Path) -> None:
    """USR2 to the batch shell mid-run: the workers checkpoint, the job requeues itself, and
    the requeued job resumes and ends with the uninterrupted job's weights, bit for bit."""
    job = cluster.submit("slurm/train.sbatch", SLOW, tmp_path)
    cluster.wait_for_step(job, 20)
    cluster.signal_batch_shell(job)
    assert cluster.wait(job) == "COMPLETED", job.log
    assert cluster.field(job, "Restarts") == "1", job.log
    log = job.log
    assert "preempted: requeuing" in log
    resumed = re.search(r"resuming from \S+step_(\d+)\.pt", log)
    assert resumed and 20 <= int(resumed.group(1)) < MAX_STEPS, log
    summary = read_summary(job.run_dir)
    assert summary["status"] == "completed" and summary["global_step"] == MAX_STEPS
    _assert_equal_weights(load_model(job.run_dir), load_model(reference.run_dir))


@pytest.mark.timeout(120)
def test_a_config_error_ends_the_job_before_any_node_starts(cluster: Cluster, tmp_path: Path) -> None:
    """A bad key fails the job with ddp_train's exit code 2 and its one-line message."""
    job = cluster.submit("slurm/train.sbatch", ["optim.lrr=0.1"], tmp_path)
    assert cluster.wait(job) == "FAILED", job.log
    assert cluster.field(job, "ExitCode") == "2:0" and cluster.field(job, "Restarts") == "0"
    assert "did you mean 'optim.lr'" in job.log and "world size" not in job.log


@pytest.mark.timeout(120)
def test_a_failed_run_is_not_requeued(cluster: Cluster, tmp_path: Path) -> None:
    """Training that fails (a NaN loss) ends the job FAILED with its exit code, once."""
    job = cluster.submit("slurm/train_srun.sbatch",
                         [*SLOW, "loss.name=user_components:nan_loss"], tmp_path, "--ntasks-per-node=1")
    assert cluster.wait(job) == "FAILED", job.log
    assert cluster.field(job, "Restarts") == "0" and cluster.field(job, "ExitCode") == "1:0"
    assert "training failed (exit 1): not requeuing" in job.log
    assert read_summary(job.run_dir)["status"] == "failed"


@pytest.mark.timeout(120)
def test_requeues_stop_at_max_requeues(cluster: Cluster, tmp_path: Path) -> None:
    """A preempted run beyond MAX_REQUEUES is not requeued: the job fails, the checkpoint stays."""
    job = cluster.submit("slurm/train_srun.sbatch", SLOW, tmp_path, "--ntasks-per-node=1",
                         MAX_REQUEUES="0")
    cluster.wait_for_step(job, 20)
    cluster.signal_batch_shell(job)
    assert cluster.wait(job) == "FAILED", job.log
    assert cluster.field(job, "Restarts") == "0"
    assert "MAX_REQUEUES" in job.log
    summary = read_summary(job.run_dir)
    assert summary["status"] == "preempted"
    assert (job.run_dir / "checkpoints" / f"step_{summary['global_step']:08d}.pt").exists()
