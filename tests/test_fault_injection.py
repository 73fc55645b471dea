"""The fault-injection suite: ranks killed at random points (some mid-checkpoint-write) under
torchrun restarts, an elastic job losing a node mid-epoch, a disk filling up mid-save.

Real processes on CPU (gloo); each case's figure is in the README's reliability table.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import psutil
import pytest
import torch

from conftest import cli_command, clean_env, free_port, load_model, read_metrics, read_summary
from ddp_train.checkpoint.atomic import TEMPORARY_MARK, atomic_write
from ddp_train.checkpoint.single_file import read_checkpoint
from fault_components import read_attempt_ids


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a torchrun agent and its workers (torchrun starts each worker in a session of its own,
    so the agent's process group does not hold them)."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


# ---------------------------------------------------------------------------------------
# kill -9 of one rank at 10 random points of a 2-rank run, under torchrun --max-restarts=1.

MAX_STEPS, CHECKPOINT_EVERY = 60, 7
# Dropout, AdamW, a cosine schedule with warmup and norm clipping (by a norm that must not
# depend on DDP's bucket layout, which differs in a restarted run's first step): every kind
# of state a resume must restore.
# Hidden layers of 512 make a checkpoint of 3.6 MB, whose write takes 20-60 ms here: long
# enough for the test to catch rank 0 in the middle of it.
KILLABLE = ["model.args.hidden_sizes=[512,512]", "model.args.dropout=0.2", "optim.name=adamw",
            "optim.weight_decay=0.01", "schedule.name=cosine", "schedule.warmup_steps=5",
            "data.batch_size=16", f"train.max_steps={MAX_STEPS}", "train.clip_grad_norm=0.5",
            f"checkpoint.every_steps={CHECKPOINT_EVERY}", "logging.every_steps=5",
            "logging.progress=none", "logging.system_metrics=false",
            "loss.name=user_components:killer_loss"]
# Eleven 2-rank jobs: start-up (imports) dominates each, and overlaps well; more at once
# only queue for the 2 cores.
CONCURRENT_JOBS = 4


@dataclass(frozen=True)
class KillPoint:
    """Where one run is interrupted by SIGKILL.

    ``loss``: rank ``rank`` kills itself at its ``at``-th loss call (training or validation,
    ``user_components:killer_loss``). ``write``: the test kills rank 0, the writer, in the
    middle of writing the first checkpoint of a step at or after ``at``.
    """

    kind: str
    rank: int
    at: int

    def __str__(self) -> str:
        if self.kind == "write":
            return f"rank {self.rank} mid-write of a checkpoint of step >= {self.at}"
        return f"rank {self.rank} at its loss call {self.at}"


def kill_points(seed: int, count: int) -> list[KillPoint]:
    """``count`` kill points drawn from ``seed``: every third inside a checkpoint write, the
    others at a random loss call of a random rank (about 84 calls per rank in a run)."""
    chooser = random.Random(seed)
    points = []
    for index in range(count):
        if index % 3 == 0:
            points.append(KillPoint("write", 0, chooser.randrange(CHECKPOINT_EVERY, MAX_STEPS,
                                                                  CHECKPOINT_EVERY)))
        else:
            points.append(KillPoint("loss", chooser.randint(0, 1), chooser.randint(3, 80)))
    return points


KILL_POINTS = kill_points(seed=17, count=10)


class KillJob:
    """One torchrun job of the kill suite in its own working directory, output in files (a
    full pipe would block it)."""

    def __init__(self, workdir: Path, point: KillPoint | None) -> None:
        self.workdir, self.point = workdir, point
        self.run_dir = workdir / "runs" / "default"
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed_mid_write: str | None = None
        """The temporary checkpoint rank 0 was killed in the middle of writing."""
        self.finished_before_the_stop: list[str] = []
        """Temporary checkpoints seen, whose write was done when the writer stopped."""
        workdir.mkdir(parents=True)

    def start(self) -> None:
        """Start the job: the uninterrupted reference without a point, else with one restart."""
        env = clean_env()
        if self.point is None:
            command = cli_command(KILLABLE, nproc=2)
        else:
            command = cli_command(KILLABLE, nproc=2, extra_launcher_args=("--max-restarts=1",))
            if self.point.kind == "loss":
                env = clean_env(KILL_RANK=str(self.point.rank), KILL_AT=str(self.point.at))
        with (self.workdir / "stdout").open("wb") as stdout, (self.workdir / "stderr").open("wb") as stderr:
            self.proc = subprocess.Popen(command, cwd=self.workdir, env=env, stdout=stdout,
                                         stderr=stderr, stdin=subprocess.DEVNULL)

    @property
    def running(self) -> bool:
        """Started and not yet ended."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def stderr(self) -> str:
        """What the job wrote to stderr (every rank's log and error lines)."""
        return (self.workdir / "stderr").read_text(errors="replace")

    def watch(self) -> None:
        """For a ``write`` point not yet hit: kill rank 0 if it is writing a checkpoint of a
        step at or after the point's.

        The writer is stopped (SIGSTOP) first and killed only if its temporary file is still
        there: a stopped process renames nothing, so the kill is inside the write for sure.
        When the write finished just before the stop, the writer goes on, and the next
        checkpoint is the target.
        """
        point = self.point
        if point is None or point.kind != "write" or self.killed_mid_write or not self.running:
            return
        checkpoints = self.run_dir / "checkpoints"
        names = os.listdir(checkpoints) if checkpoints.is_dir() else []
        for name in names:
            match = re.fullmatch(rf"\.step_(\d{{8}})\.pt{re.escape(TEMPORARY_MARK)}(\d+)", name)
            if match is None or int(match.group(1)) < point.at:
                continue
            writer = self._own_process(int(match.group(2)))
            if writer is None:
                continue
            try:
                writer.suspend()
                deadline = time.monotonic() + 5
                while writer.status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
                    time.sleep(0.001)  # still in a system call (fsync): it stops on return
                if (checkpoints / name).exists():
                    writer.kill()
                    self.killed_mid_write = name
                    return
                self.finished_before_the_stop.append(name)
                writer.resume()
            except psutil.NoSuchProcess:
                continue

    def _own_process(self, pid: int) -> psutil.Process | None:
        """Process ``pid`` if it is one of this job's workers (never another process)."""
        assert self.proc is not None
        try:
            process = psutil.Process(pid)
            # Up the parent chain, not down the job's children: that scans every process.
            return process if self.proc.pid in {parent.pid for parent in process.parents()} else None
        except psutil.NoSuchProcess:
            return None

    def stop(self) -> None:
        """Kill the job and its workers if it is still running (a timeout or a failure)."""
        if self.running:
            assert self.proc is not None
            kill_tree(self.proc)


def run_kill_jobs(jobs: list[KillJob], concurrent: int, timeout: float) -> None:
    """Run ``jobs``, ``concurrent`` at a time, watching every running one for its kill point."""
    pending, deadline = list(jobs), time.monotonic() + timeout
    try:
        while pending or any(job.running for job in jobs):
            while pending and sum(job.running for job in jobs) < concurrent:
                pending.pop(0).start()
            for job in jobs:
                job.watch()
            if time.monotonic() > deadline:
                pytest.fail(f"the kill suite did not finish within {timeout} s")
            time.sleep(0.001)  # a checkpoint write takes 20 ms or more
    finally:
        for job in jobs:
            job.stop()


def _resumed_step(stderr: str) -> str:
    """The step the restarted job resumed from, as its log says ('fresh' when it had none)."""
    found = re.findall(r"resuming from \S+ at step (\d+)", stderr)
    return found[-1] if found else "fresh"


def _kill_point_failures(job: KillJob, reference: KillJob) -> list[str]:
    """What is wrong with a killed and restarted job, compared with the uninterrupted one."""
    assert job.point is not None and job.proc is not None
    stderr = job.stderr
    if job.proc.returncode != 0:
        return [f"exit {job.proc.returncode}: {stderr[-1500:]}"]
    failures = []
    if job.point.kind == "loss" and not (job.workdir / f"killed-rank{job.point.rank}").exists():
        failures.append("the kill did not happen")
    if job.point.kind == "write":
        if job.killed_mid_write is None:
            failures.append("never caught rank 0 writing a checkpoint")
        elif f"{job.killed_mid_write}, left by a save that did not finish" not in stderr:
            failures.append(f"the restart did not remove {job.killed_mid_write}")
    summary = read_summary(job.run_dir)
    if (summary["status"], summary["global_step"]) != ("completed", MAX_STEPS):
        failures.append(f"summary: {summary['status']} at step {summary['global_step']}")
    model, expected = load_model(job.run_dir), load_model(reference.run_dir)
    if model.keys() != expected.keys() or not all(torch.equal(model[k], expected[k]) for k in model):
        failures.append("model.pt differs from the uninterrupted run's")
    # Even the logged losses and validations match: metrics.jsonl reads as one run.
    difference = _metrics_difference(read_metrics(job.run_dir), read_metrics(reference.run_dir))
    if difference:
        failures.append(f"metrics.jsonl differs from the uninterrupted run's: {difference}")
    return failures


# Metrics of the machine rather than of training: no two runs share them.
_MACHINE_KEYS = ("train/samples_per_s", "train/tokens_per_s", "train/mfu", "train/peak_memory_gb")


def _metrics_difference(records: list[dict[str, object]], expected: list[dict[str, object]]) -> str:
    """The first record that differs from the uninterrupted run's, or '' when none does."""
    if len(records) != len(expected):
        return f"{len(records)} records, expected {len(expected)}"
    for record, reference in zip(records, expected, strict=True):
        got, want = ({k: v for k, v in r.items() if not k.startswith(_MACHINE_KEYS)}
                     for r in (record, reference))
        if got != want:
            return f"{got}, expected {want}"
    return ""


@pytest.mark.timeout(420)
def test_kill9_at_ten_random_points_under_torchrun_restart_resumes_bitwise(tmp_path: Path) -> None:
    """10 of 10 runs killed once (4 of them mid-checkpoint-write) end bit-equal to an
    uninterrupted run: model.pt, and every logged loss, LR and validation value."""
    reference = KillJob(tmp_path / "reference", None)
    jobs = [KillJob(tmp_path / f"point{index}", point) for index, point in enumerate(KILL_POINTS)]
    run_kill_jobs([reference, *jobs], CONCURRENT_JOBS, timeout=390)
    assert reference.proc is not None and reference.proc.returncode == 0, reference.stderr[-3000:]

    report, failed = [], []
    for index, job in enumerate(jobs):
        failures = _kill_point_failures(job, reference)
        where = f" ({job.killed_mid_write})" if job.killed_mid_write else ""
        if job.finished_before_the_stop:
            where += f" (finished before the stop: {', '.join(job.finished_before_the_stop)})"
        report.append(f"point {index}: {job.point}{where}; resumed from step "
                      f"{_resumed_step(job.stderr)}: {'; '.join(failures) or 'bit-equal'}")
        failed += failures
    print("\n".join(report))
    assert not failed, "\n".join(report)


# ---------------------------------------------------------------------------------------
# Elastic restart: torchrun --nnodes=1:2, two agents, one killed mid-epoch.

TRAIN_SAMPLES, BATCH = 200, 4  # 25 steps at world size 2, 50 at 1: no partial global batch either way
ELASTIC = ["model.name=fault_components:attempt_logging_mlp", "model.args.seconds_per_forward=0.1",
           "data.name=batch_components:dict_blobs", f"data.args.n_train={TRAIN_SAMPLES}",
           "data.args.n_val=20", f"data.batch_size={BATCH}", "train.epochs=1",
           "checkpoint.every_steps=1", "logging.progress=none", "logging.system_metrics=false",
           "dist.timeout_s=30"]


def _elastic_agent(port: int, workdir: Path, name: str) -> subprocess.Popen[bytes]:
    """One node's torchrun agent of a 1-to-2-node c10d job on this machine."""
    # last_call_timeout: how long the first agent waits for the second to join (its start-up
    # under load is a few seconds), and how long the survivor waits for a replacement.
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=elastic-{port}",
               "--rdzv-conf=join_timeout=90,last_call_timeout=15", "--max-restarts=1",
               "-m", "ddp_train", *ELASTIC]
    env = clean_env(FAULT_ID_LOG=str(workdir / "ids"))
    with (workdir / f"{name}.stderr").open("wb") as stderr:
        return subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                                stderr=stderr, stdin=subprocess.DEVNULL)


def _wait_until(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.02)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _steps_logged(log: Path, attempt: int) -> list[int]:
    """Optimizer steps each rank of restart attempt ``attempt`` has trained (begun) so far."""
    return [len(path.read_text().splitlines())
            for path in sorted(log.parent.glob(f"{log.name}.attempt{attempt}.rank*"))]


def _both_ranks_trained(log: Path, steps: int) -> bool:
    """Whether both ranks of the first attempt have begun ``steps`` steps."""
    logged = _steps_logged(log, 0)
    return len(logged) == 2 and min(logged) >= steps


@pytest.mark.timeout(240)
def test_an_elastic_job_that_loses_a_node_mid_epoch_finishes_every_sample_once(tmp_path: Path) -> None:
    """Two agents (world size 2); the one not hosting the c10d store is killed with its worker
    mid-epoch. The survivor restarts at world size 1 from the newest checkpoint and completes;
    what the final model trained on is every sample of the epoch exactly once."""
    port, log = free_port(), tmp_path / "ids"
    survivor = _elastic_agent(port, tmp_path, "survivor")
    victim: subprocess.Popen[bytes] | None = None
    try:
        # The first agent hosts the c10d store; the second, started once it listens, does not.
        _wait_until(lambda: _listening(port) or survivor.poll() is not None, "c10d store", 60)
        assert survivor.poll() is None, (tmp_path / "survivor.stderr").read_text()
        victim = _elastic_agent(port, tmp_path, "victim")
        _wait_until(lambda: _both_ranks_trained(log, 5) or survivor.poll() is not None,
                    "5 steps at world size 2", 120)
        assert survivor.poll() is None, (tmp_path / "survivor.stderr").read_text()
        store_hosts = {c.laddr.port for c in psutil.Process(survivor.pid).net_connections("tcp")
                       if c.status == psutil.CONN_LISTEN}
        assert port in store_hosts, "the surviving agent does not host the c10d store"
        kill_tree(victim)  # mid-epoch: 25 steps make it at world size 2
        killed_after = max(_steps_logged(log, 0))
        survivor.wait(timeout=150)
    finally:
        for agent in (survivor, victim):
            if agent is not None and agent.poll() is None:
                kill_tree(agent)
    stderr = (tmp_path / "survivor.stderr").read_text(errors="replace")
    assert survivor.returncode == 0, stderr[-3000:]
    assert killed_after < TRAIN_SAMPLES // (2 * BATCH), "the job was not interrupted mid-epoch"
    summary = read_summary(tmp_path / "runs" / "default")
    assert summary["status"] == "completed" and summary["world_size"] == 1, summary
    assert "the checkpoint comes from world size 2, this job has 1" in stderr
    resumed = int(re.findall(r"resuming from \S+ at step (\d+)", stderr)[-1])
    assert 0 < resumed <= killed_after  # mid-epoch
    assert len(_steps_logged(log, 1)) == 1, "the second attempt did not run at world size 1"

    # What the final model trained on: the first attempt up to the checkpoint it resumed from
    # (later steps were rolled back), then all of the second attempt.
    trained = read_attempt_ids(log, 0, steps=resumed) + read_attempt_ids(log, 1)
    counts = Counter(trained)
    assert set(counts) == set(range(TRAIN_SAMPLES)), sorted(set(range(TRAIN_SAMPLES)) ^ set(counts))
    assert max(counts.values()) == 1, sorted(i for i, n in counts.items() if n > 1)
    print(f"killed after {killed_after} steps at world size 2, resumed from step {resumed} at world "
          f"size 1: {len(trained)} samples trained, each once")


# ---------------------------------------------------------------------------------------
# Disk full in the middle of a save.

# A single-file checkpoint of the default MLP on digits is about 340 kB: a 600 kB disk holds
# the run's small files and the first checkpoint, and fills up in the middle of the second.
DISK = "600k"


def _mount_namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("async_save", [False, True])
def test_a_disk_full_mid_save_fails_in_one_line_and_keeps_the_previous_checkpoint(
        async_save: bool, tmp_path: Path) -> None:
    """The second checkpoint fills the disk part-way: exit 1 with one line that says so, the
    first checkpoint complete and loadable, no temporary file left."""
    if not _mount_namespaces_work():
        pytest.skip("needs unshare -m and tmpfs mounts (root or user namespaces)")
    disk, copy = tmp_path / "disk", tmp_path / "after"
    disk.mkdir()
    args = ["train.max_steps=10", "checkpoint.every_steps=2", "checkpoint.every_epochs=0",
            f"checkpoint.async_save={str(async_save).lower()}", "logging.progress=none",
            "logging.system_metrics=false", f"run.output_dir={disk}/runs"]
    # A private mount namespace: the small disk exists for this shell only, so its files are
    # copied out before it goes away.
    script = (f'mount -t tmpfs -o size={DISK} tmpfs "$0" && {{ "$@"; status=$?; '
              f'cp -a "$0/runs/default" {copy}; exit $status; }}')
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, str(disk),
                             *cli_command(args)], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=100, stdin=subprocess.DEVNULL,
                            check=False)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("python -m ddp_train:")]
    assert len(errors) == 1, result.stderr
    assert "writing checkpoint step_00000004.pt failed" in errors[0], errors[0]
    assert "No space left on device" in errors[0], errors[0]
    assert read_summary(copy)["status"] == "failed"
    checkpoints = copy / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002.pt"]  # no temporary left
    state = torch.load(checkpoints / "step_00000002.pt", weights_only=True)
    assert state["progress"]["global_step"] == 2
    read_checkpoint(checkpoints / "step_00000002.pt")  # complete: every entry a resume needs
    assert not [p for p in copy.rglob(f"*{TEMPORARY_MARK}*")], "a temporary file was left"


class _DiskWithRoom:
    """A file on a disk with room for ``room`` more bytes: writing past it is ENOSPC."""

    def __init__(self, file: BinaryIO, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def test_a_full_disk_is_reported_as_such_not_as_what_torch_save_made_of_it(tmp_path: Path) -> None:
    """torch.save's archive, closed after a failed write, raises its own RuntimeError ('unexpected
    pos'); atomic_write reports the OSError underneath, keeps the old file and leaves no temporary."""
    path = tmp_path / "state.pt"
    atomic_write(path, b"old")
    state = {"weights": torch.zeros(10_000)}
    with pytest.raises(OSError) as raised:
        atomic_write(path, lambda file: torch.save(state, _DiskWithRoom(file, 20_000)))
    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
