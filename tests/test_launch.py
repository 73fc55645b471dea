"""The launch scripts: usage, how they choose workers and hosts, and real runs through them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, clean_env, free_port, load_model, read_summary

# The scripts users and tests run, each with a usage text (.ci/run, linted too, has none).
SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("slurm/*.sbatch"), *REPO.glob("tests/*.sh")])
TINY = ["model.name=user_components:tiny_mlp", "data.name=user_components:blobs",
        "train.max_steps=20", "logging.progress=none"]


def _script(relative: str, args: list[str], cwd: Path, timeout: float = 120, **env: str
            ) -> subprocess.CompletedProcess[str]:
    """Run one of the repository's scripts with a clean environment (plus ``env``)."""
    return subprocess.run([str(REPO / relative), *args], cwd=cwd, env=clean_env(PYTHON=sys.executable, **env),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _fake_command(bin_dir: Path, name: str, body: str) -> None:
    """An executable ``name`` in ``bin_dir`` running the shell code ``body``."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _dry_run(relative: str, args: list[str], tmp_path: Path, **env: str) -> str:
    """The command a script prints with DRY_RUN=1 (fake tools in tmp_path/bin come first on PATH)."""
    path = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    result = _script(relative, args, tmp_path, timeout=30, DRY_RUN="1", PATH=path, **env)
    assert result.returncode == 0, result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_every_script_explains_itself_on_h(script: Path, tmp_path: Path) -> None:
    """``-h`` prints a usage text and exits 0, without running anything."""
    result = _script(str(script.relative_to(REPO)), ["-h"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower() and len(result.stdout.splitlines()) >= 5


@pytest.mark.timeout(60)
def test_shellcheck_is_clean() -> None:
    """shellcheck finds nothing in any script (CI installs it; elsewhere it may be missing)."""
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is not installed, and CI must lint the scripts")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    # The launch scripts' sourced helper is checked with them (its paths are from the root).
    scripts = [*SCRIPTS, *REPO.glob("launch/*.bash"), REPO / ".ci" / "run"]
    result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True,
                            timeout=50, cwd=REPO)
    assert result.returncode == 0, result.stdout


@pytest.mark.timeout(60)
def test_single_node_worker_count(tmp_path: Path) -> None:
    """NPROC wins; else the GPUs that CUDA_VISIBLE_DEVICES or nvidia-smi shows; else 2."""
    def nproc(**env: str) -> str:
        command = _dry_run("launch/single_node.sh", ["a=1", "b=two words"], tmp_path, **env)
        assert command.endswith("-m ddp_train a=1 b=two\\ words"), command
        return command.split("--nproc-per-node=")[1].split()[0]

    _fake_command(tmp_path / "bin", "nvidia-smi", "exit 9")  # a driver that does not answer
    assert nproc() == "2"
    _fake_command(tmp_path / "bin", "nvidia-smi", "for i in 0 1 2; do echo \"GPU $i: H100 (UUID: x)\"; done")
    assert nproc() == "3"
    assert nproc(CUDA_VISIBLE_DEVICES="0,2") == "2"
    assert nproc(NPROC="5") == "5"


@pytest.mark.timeout(30)
def test_multi_node_rendezvous_settings(tmp_path: Path) -> None:
    """c10d on MASTER_ADDR:MASTER_PORT, hosted by node 0 only; restarts configurable."""
    common = {"NNODES": "2", "NPROC": "4", "MASTER_ADDR": "node0", "MASTER_PORT": "29999"}
    node0 = _dry_run("launch/multi_node.sh", ["x=1"], tmp_path, NODE_RANK="0", **common)
    node1 = _dry_run("launch/multi_node.sh", ["x=1"], tmp_path, NODE_RANK="1", MAX_RESTARTS="2",
                     RDZV_ID="job7", **common)
    for command in (node0, node1):
        for flag in ("--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
                     "--rdzv-endpoint=node0:29999"):
            assert flag in command.split(), command
    assert "--rdzv-conf=is_host=true" in node0 and "--max-restarts=0" in node0
    assert "--rdzv-conf=is_host=false" in node1 and "--max-restarts=2" in node1
    assert "--rdzv-id=job7" in node1
    missing = _script("launch/multi_node.sh", [], tmp_path, timeout=30)
    assert missing.returncode != 0 and "NNODES" in missing.stderr


@pytest.mark.timeout(30)
def test_train_sbatch_workers_and_rendezvous_host(tmp_path: Path) -> None:
    """Workers per node from the node's GPUs, else its CPUs; the rendezvous on the first
    host, parsed without scontrol when it does not work; the port from the job id; a YAML
    first argument is the --config file."""
    _fake_command(tmp_path / "bin", "scontrol", "exit 1")  # as inside a container
    job = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "3",
           "SLURM_JOB_NODELIST": "gpu[07-09,12]-ib,login1"}
    gpus = _dry_run("slurm/train.sbatch", ["my.yaml", "a=1"], tmp_path, SLURM_GPUS_ON_NODE="8",
                    SLURM_CPUS_PER_TASK="64", **job)
    assert "--nproc-per-node=8" in gpus and "--nnodes=3" in gpus and "--cpus-per-task=64" in gpus
    assert "--max-restarts=3" in gpus and "--rdzv-id=123456" in gpus
    assert "--rdzv-endpoint=gpu07-ib:18456" in gpus  # 15000 + 123456 % 20000
    assert gpus.endswith("-m ddp_train --config my.yaml a=1")
    cpus = _dry_run("slurm/train.sbatch", ["a=1"], tmp_path, SLURM_CPUS_PER_TASK="6", **job)
    assert "--nproc-per-node=6" in cpus and cpus.endswith("-m ddp_train a=1")
    # The real scontrol's answer is used when it works.
    _fake_command(tmp_path / "bin", "scontrol", "printf 'n5\\nn6\\n'")
    assert "--rdzv-endpoint=n5:" in _dry_run("slurm/train.sbatch", [], tmp_path, NPROC="1", **job)
    outside = _script("slurm/train.sbatch", [], tmp_path, timeout=30)
    assert outside.returncode != 0 and "submit this script with sbatch" in outside.stderr


@pytest.mark.timeout(30)
def test_train_srun_sbatch_runs_ddp_train_in_every_task(tmp_path: Path) -> None:
    """No torchrun: srun starts ddp_train itself, with the CPUs each task was given."""
    command = _dry_run("slurm/train_srun.sbatch", ["my.yml", "a=1"], tmp_path, SLURM_JOB_ID="9",
                       SLURM_CPUS_PER_TASK="4")
    assert command.startswith("+ srun ") and "--cpus-per-task=4" in command
    assert command.endswith("-m ddp_train --config my.yml a=1") and "torch.distributed" not in command


@pytest.fixture(scope="module")
def single_node_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``NPROC=2 launch/single_node.sh`` on the tiny model: the run directory."""
    workdir = tmp_path_factory.mktemp("single_node")
    result = _script("launch/single_node.sh", TINY, workdir, NPROC="2")
    assert result.returncode == 0, result.stderr
    assert "torch.distributed.run --standalone --nproc-per-node=2" in result.stderr  # the command
    return workdir / "runs" / "default"


@pytest.mark.timeout(150)
def test_single_node_script_trains_on_2_processes(single_node_run: Path) -> None:
    """The single-node script completes a run at world size 2."""
    summary = read_summary(single_node_run)
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["global_step"] == 20


@pytest.mark.timeout(150)
def test_two_multi_node_agents_match_one_node(single_node_run: Path, tmp_path: Path) -> None:
    """Two agents of 1 worker each on loopback: world size 2, the single-node run's weights."""
    port = str(free_port())
    agents = [subprocess.Popen([str(REPO / "launch/multi_node.sh"), *TINY], cwd=tmp_path,
                               env=clean_env(PYTHON=sys.executable, NNODES="2", NPROC="1",
                                             NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                                             MASTER_PORT=port, RDZV_ID="test"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for rank in (0, 1)]
    try:
        outputs = [agent.communicate(timeout=120)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(outputs)
    run_dir = tmp_path / "runs" / "default"
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["world_size"] == 2
    multi, single = load_model(run_dir), load_model(single_node_run)
    assert multi.keys() == single.keys()
    for key in multi:
        torch.testing.assert_close(multi[key], single[key], msg=key)
