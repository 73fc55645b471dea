"""Fault injection on checkpoints: truncated files, files carrying pickled code, failing saves.

Real files written by real runs (single-file and sharded, CPU, one process: FSDP runs at
world size 1 too), damaged the way disks, kills and hostile users damage them; each case
checks what a resume does with them.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from conftest import clean_env, cli_command, read_summary, run_cli, run_cli_concurrently
from ddp_train.checkpoint.sharded import ShardedCheckpointStore, TensorOnlyPlanner
from ddp_train.checkpoint.single_file import FileCheckpointStore, read_checkpoint
from ddp_train.checkpoint.store import CheckpointStore
from ddp_train.config import load_config

# Checkpoints at steps 10 and 20 of a short run; step 20 is the one each case damages.
TRAINED = ["train.max_steps=20", "checkpoint.every_steps=10", "checkpoint.every_epochs=0",
           "checkpoint.keep_last=3", "logging.progress=none"]
FSDP = ["train.strategy=fsdp"]
STORES: dict[str, Callable[[Path], CheckpointStore]] = {
    "file": lambda directory: FileCheckpointStore(directory, load_config().checkpoint),
    "sharded": lambda directory: ShardedCheckpointStore(directory, load_config().checkpoint),
}
# Where a cut lands: 0 bytes (a kill between create and write, a full disk), 1 byte, half,
# all but the last byte (the index at the end of a zip or a pickle's STOP is lost).
CUTS: dict[str, Callable[[int], int]] = {
    "0 bytes": lambda size: 0, "1 byte": lambda size: 1, "half": lambda size: size // 2,
    "all but the last byte": lambda size: size - 1,
}
# Each file a checkpoint is made of: the single file, and the three files of a sharded one.
DAMAGED_FILES = {"file": ("file", "step_00000020.pt"),
                 "sharded .metadata": ("sharded", "step_00000020/.metadata"),
                 "sharded trainer.pt": ("sharded", "step_00000020/trainer.pt"),
                 "sharded shard": ("sharded", "step_00000020/__0_0.distcp")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``runs/file`` (single-file checkpoints) and ``runs/sharded`` (FSDP at world size 1),
    each with checkpoints at steps 10 and 20."""
    workdir = tmp_path_factory.mktemp("trained")
    results = run_cli_concurrently([([*TRAINED, "run.name=file"], 1),
                                    ([*TRAINED, *FSDP, "run.name=sharded"], 1)], cwd=workdir)
    for result in results:
        assert result.returncode == 0, result.stderr
    return workdir / "runs"


def _copy_run(trained: Path, kind: str, workdir: Path) -> Path:
    """A private copy of one trained run as ``workdir/runs/default`` (what a bare CLI run resumes)."""
    run_dir = workdir / "runs" / "default"
    shutil.copytree(trained / kind, run_dir)
    return run_dir


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


class _Warnings(logging.Handler):
    """Keeps the messages of ddp_train's warnings (its logger does not propagate under the CLI)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _warnings() -> Iterator[_Warnings]:
    collected = _Warnings()
    logger = logging.getLogger("ddp_train")
    logger.addHandler(collected)
    try:
        yield collected
    finally:
        logger.removeHandler(collected)


class RunsCode:
    """What a hostile checkpoint holds: an object whose unpickling runs code (it creates ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'a').close()",)


# ---------------------------------------------------------------------------------------
# Truncated checkpoints.


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("damaged", DAMAGED_FILES)
def test_a_truncated_newest_checkpoint_is_skipped_for_the_previous(damaged: str, cut: str, trained: Path,
                                                                   tmp_path: Path) -> None:
    kind, name = DAMAGED_FILES[damaged]
    checkpoints = _copy_run(trained, kind, tmp_path) / "checkpoints"
    target = checkpoints / name
    _cut(target, CUTS[cut](target.stat().st_size))
    with _warnings() as warned:
        found = STORES[kind](checkpoints).load_newest()
    assert found is not None and found[1].name.startswith("step_00000010")
    assert found[0]["progress"]["global_step"] == 10
    newest = str(checkpoints / name.split("/")[0])
    assert any(message.startswith(f"skipping checkpoint {newest}: it ") for message in warned.messages), \
        warned.messages


@pytest.mark.timeout(120)
def test_an_empty_newest_checkpoint_under_torchrun_restarts_resumes_once(trained: Path, tmp_path: Path) -> None:
    """The commonest corruption under a restarting launcher: the previous checkpoint is used,
    on the first attempt (no crash loop), and the empty file is moved out of the way."""
    run_dir = _copy_run(trained, "file", tmp_path)
    (run_dir / "checkpoints" / "step_00000020.pt").write_bytes(b"")
    result = run_cli([*TRAINED, "train.max_steps=25"], cwd=tmp_path, nproc=1,
                     extra_launcher_args=("--max-restarts=2",))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("skipping checkpoint") == 1, result.stderr
    assert "step_00000020.pt: it is empty (0 bytes)" in result.stderr
    assert result.stderr.count("resuming from") == 1 and "step_00000010.pt at step 10" in result.stderr
    assert read_summary(run_dir)["global_step"] == 25
    assert read_checkpoint(run_dir / "checkpoints" / "step_00000020.pt")["progress"]["global_step"] == 20
    assert (run_dir / "checkpoints" / "abandoned" / "after_step_00000010" / "step_00000020.pt").stat().st_size == 0


@pytest.mark.timeout(120)
def test_a_sharded_run_resumes_past_an_empty_shard(trained: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(trained, "sharded", tmp_path)
    _cut(run_dir / "checkpoints" / "step_00000020" / "__0_0.distcp", 0)
    result = run_cli([*TRAINED, *FSDP, "train.max_steps=25"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipping checkpoint" in result.stderr and "shard file __0_0.distcp is truncated" in result.stderr
    assert "step_00000010 at step 10" in result.stderr
    assert read_summary(run_dir)["status"] == "completed"


# ---------------------------------------------------------------------------------------
# Checkpoints carrying pickled objects: refused, and no code runs.


def _full_entries(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor entry of one of our sharded checkpoints, nested as it was saved."""
    reader = FileSystemReader(checkpoint)  # our own trusted checkpoint: the plain reader
    metadata = reader.read_metadata()
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, item in metadata.state_dict_metadata.items():
        *route, leaf = metadata.planner_data[key]
        node: dict = entries
        for part in route:
            node = node.setdefault(part, {})
        node[leaf] = torch.empty(item.size, dtype=item.properties.dtype)
    dcp.load(entries, storage_reader=reader, no_dist=True)
    return entries


def _craft_sharded(checkpoint: Path, crafted: Path, marker: Path) -> str:
    """Rewrite ``checkpoint`` as ``crafted``, a sharded checkpoint whose first model entry is a
    pickled object (DCP stores a non-tensor as bytes); returns that entry's name."""
    entries = _full_entries(checkpoint)
    key = next(iter(entries["model"]))
    entries["model"][key] = RunsCode(marker)  # type: ignore[assignment]
    dcp.save(entries, storage_writer=FileSystemWriter(crafted), no_dist=True)
    shutil.copy(checkpoint / "trainer.pt", crafted / "trainer.pt")
    return key


# DCP without a process group says it assumes one process: it is one.
_SINGLE_PROCESS_DCP = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@_SINGLE_PROCESS_DCP
@pytest.mark.timeout(120)
def test_a_sharded_checkpoint_with_a_pickled_model_entry_runs_no_code(trained: Path, tmp_path: Path) -> None:
    """The crafted entry sits under a model key, where an FSDP resume loads it: refused with a
    warning (auto: the previous checkpoint is used), or a one-line config error (a path)."""
    run_dir = _copy_run(trained, "sharded", tmp_path)
    marker = tmp_path / "code-ran"
    crafted = run_dir / "checkpoints" / "step_00000030"
    _craft_sharded(run_dir / "checkpoints" / "step_00000020", crafted, marker)
    elsewhere = shutil.copytree(crafted, tmp_path / "step_00000030")  # the auto run moves its own aside
    explicit, auto = run_cli_concurrently([
        ([*TRAINED, *FSDP, "run.name=other", f"checkpoint.resume={elsewhere}"], 1),
        ([*TRAINED, *FSDP, "train.max_steps=25"], 1)], cwd=tmp_path)
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert explicit.returncode == 2, explicit.stderr
    assert ": config error: checkpoint.resume: " in explicit.stderr.strip().splitlines()[-1]
    assert "BytesStorageMetadata" in explicit.stderr and "Traceback" not in explicit.stderr
    assert auto.returncode == 0, auto.stderr
    assert f"skipping checkpoint {Path('runs/default/checkpoints/step_00000030')}" in auto.stderr
    assert "step_00000020 at step 20" in auto.stderr
    assert read_summary(run_dir)["status"] == "completed"


@_SINGLE_PROCESS_DCP
def test_the_load_planner_alone_refuses_a_pickled_entry(trained: Path, tmp_path: Path) -> None:
    """Behind the metadata allowlist, the planner refuses the entry even to DCP's plain reader."""
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted"
    key = _craft_sharded(trained / "sharded" / "checkpoints" / "step_00000020", crafted, marker)
    target = {"model": {key: torch.empty(0)}}
    with pytest.raises(dcp.api.CheckpointException, match=f"refusing non-tensor entry 'model.{key}'"):
        dcp.load(target, storage_reader=FileSystemReader(crafted), planner=TensorOnlyPlanner(), no_dist=True)
    assert not marker.exists()


def _craft_file(run_dir: Path, marker: Path) -> Path:
    """A single-file checkpoint of step 30 whose model holds a pickled object among its tensors."""
    state = read_checkpoint(run_dir / "checkpoints" / "step_00000020.pt")
    state["model"][next(iter(state["model"]))] = RunsCode(marker)
    state["progress"]["global_step"] = 30
    crafted = run_dir / "checkpoints" / "step_00000030.pt"
    torch.save(state, crafted)
    return crafted


def _craft_trainer_state(run_dir: Path, marker: Path) -> Path:
    """A sharded checkpoint of step 30 whose trainer.pt holds a pickled object."""
    crafted = run_dir / "checkpoints" / "step_00000030"
    shutil.copytree(run_dir / "checkpoints" / "step_00000020", crafted)
    state = torch.load(crafted / "trainer.pt", weights_only=True)
    state["early_stopping"] = RunsCode(marker)
    torch.save(state, crafted / "trainer.pt")
    return crafted


def _craft_metadata(run_dir: Path, marker: Path) -> Path:
    """A sharded checkpoint of step 30 whose .metadata is a pickled object."""
    crafted = run_dir / "checkpoints" / "step_00000030"
    shutil.copytree(run_dir / "checkpoints" / "step_00000020", crafted)
    (crafted / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    return crafted


@pytest.mark.parametrize("craft, kind", [(_craft_file, "file"), (_craft_trainer_state, "sharded"),
                                         (_craft_metadata, "sharded")],
                         ids=["file", "sharded trainer.pt", "sharded .metadata"])
def test_other_checkpoint_files_with_pickled_objects_run_no_code(
        craft: Callable[[Path, Path], Path], kind: str, trained: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(trained, kind, tmp_path)
    marker = tmp_path / "code-ran"
    crafted = craft(run_dir, marker)
    with _warnings() as warned:
        found = STORES[kind](run_dir / "checkpoints").load_newest()
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert found is not None and found[0]["progress"]["global_step"] == 20
    assert any(message.startswith(f"skipping checkpoint {crafted}: it ") for message in warned.messages), \
        warned.messages


# ---------------------------------------------------------------------------------------
# A background (async) save that fails.


def slow_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy that takes 20 ms: steps slow enough that a background save finishes
    (or fails) well within the steps up to the next one."""
    time.sleep(0.02)
    return nn.functional.cross_entropy(outputs, targets)


def _limit_file_size() -> None:
    """No file beyond 64 KiB (writes past it fail with EFBIG): checkpoints cannot be written,
    the small files of a run can."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))


@pytest.mark.timeout(120)
def test_a_failed_async_save_is_reported_when_it_fails_and_fails_the_run(tmp_path: Path) -> None:
    args = ["checkpoint.async_save=true", "checkpoint.every_steps=5", "checkpoint.every_epochs=0",
            "train.max_steps=30", "eval.every_steps=0", "logging.every_steps=1", "logging.progress=lines",
            "loss.name=test_checkpoint_faults:slow_cross_entropy"]
    result = subprocess.run(cli_command(args), cwd=tmp_path, env=clean_env(), capture_output=True,
                            text=True, timeout=100, stdin=subprocess.DEVNULL, preexec_fn=_limit_file_size)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    # torch's zip writer words a failed write its own way ("unexpected pos ..."): the first line of it.
    assert ": training failed: writing checkpoint step_00000005.pt failed: " in lines[-1], result.stderr
    # Reported when it failed: before the steps up to the next save were over.
    reported = next(i for i, line in enumerate(lines) if line.startswith("writing checkpoint step_00000005.pt failed"))
    # ... and the run stopped then, at the step after the failure, not at its next save.
    assert not any(line.startswith(("step 9 |", "step 10 |")) for line in lines), result.stderr
    checkpoints = tmp_path / "runs" / "default" / "checkpoints"
    assert list(checkpoints.iterdir()) == [], "a temporary file was left behind"
