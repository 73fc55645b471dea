"""Helpers that run ddp_train for real: as a CLI process, under torchrun, or spawned ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# Launcher variables of an outer job must not leak into the runs the tests start.
_LAUNCH_PREFIXES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                    "MASTER_ADDR", "MASTER_PORT", "SLURM_", "TORCHELASTIC_")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child run: no launcher variables, tests/ importable, 1 thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCH_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)])
    # Two cores shared by several ranks: one intra-op thread each avoids oversubscription.
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, nproc: int = 1, timeout: float = 120,
            env: dict[str, str] | None = None, extra_launcher_args: tuple[str, ...] = ()
            ) -> subprocess.CompletedProcess[str]:
    """``python -m ddp_train ARGS`` (nproc 1) or ``torchrun --standalone`` with nproc ranks."""
    return subprocess.run(cli_command(args, nproc, extra_launcher_args), cwd=cwd,
                          env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def cli_command(args: list[str], nproc: int = 1, extra_launcher_args: tuple[str, ...] = ()
                ) -> list[str]:
    """The command line of :func:`run_cli`."""
    if nproc == 1 and not extra_launcher_args:
        return [sys.executable, "-m", "ddp_train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *extra_launcher_args, "-m", "ddp_train", *args]


def run_cli_concurrently(runs: list[tuple[list[str], int]], cwd: Path, timeout: float = 200
                         ) -> list[subprocess.CompletedProcess[str]]:
    """Independent ``(ARGS, nproc)`` runs started together, as :func:`run_cli` would run them.

    Runs that share nothing give the same results alone or side by side (CPU, no
    timing-dependent logic); together they overlap their start-up (imports, process
    groups), which dominates short runs.
    """
    procs = [subprocess.Popen(cli_command(args, nproc), cwd=cwd, env=clean_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL) for args, nproc in runs]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for (args, _), proc in zip(runs, procs):
            stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:  # a timeout or a failed assertion: no orphans
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def read_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json of a run directory."""
    return json.loads((run_dir / "summary.json").read_text())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl of a run directory, one dict per line."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load_model(run_dir: Path) -> dict[str, torch.Tensor]:
    """model.pt, loaded the safe way."""
    return torch.load(run_dir / "model.pt", weights_only=True)


def require_modules(*names: str) -> None:
    """Skip the calling test (module) when an optional package is missing, or fail under CI
    (CI=true), where the test extras are installed and every test must run."""
    import importlib.util

    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if not missing:
        return
    reason = f"needs {', '.join(missing)} (pip install -e \".[test]\")"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI runs every test: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn_entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], out_dir: str,
                 args: tuple[Any, ...]) -> None:
    # What torchrun would set: ddp_train reads these like any launcher's.
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    result = fn(rank, world_size, *args)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def spawn_ranks(fn: Callable[..., Any], world_size: int, out_dir: Path, *args: Any,
                timeout: float = 120) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes (gloo).

    ``fn`` must be a module-level function; it returns a picklable result per rank. A
    rank that fails or a job past ``timeout`` fails the test instead of hanging it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(_spawn_entry, args=(world_size, free_port(), fn, str(out_dir), args),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):  # raises if a rank raised
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"spawned ranks did not finish within {timeout} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh working directory for one test's runs."""
    return tmp_path
