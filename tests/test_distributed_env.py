"""Launch detection: torchrun, srun (no torchrun), or a plain single process."""

from __future__ import annotations

import pytest

from ddp_train.distributed.environment import LaunchInfo, expand_slurm_nodelist, read_launch_info
from ddp_train.errors import ConfigError


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, LaunchInfo(0, 1, 0, "none")),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, LaunchInfo(3, 8, 1, "torchrun")),
    # srun task: the step's task count is the world.
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
      "SLURM_STEP_ID": "0"}, LaunchInfo(5, 8, 1, "slurm")),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "2", "SLURM_STEP_ID": "0"},
     LaunchInfo(2, 4, 2, "slurm")),
    # The batch script's own shell (no srun step): a single process, not rank 0 of 4.
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, LaunchInfo(0, 1, 0, "none")),
    # torchrun inside an srun step (slurm/train.sbatch): torchrun's variables win.
    ({"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
      "SLURM_STEP_ID": "0"}, LaunchInfo(6, 8, 2, "torchrun")),
])
def test_read_launch_info(environ: dict[str, str], expected: LaunchInfo) -> None:
    assert read_launch_info(environ) == expected


def test_bad_launcher_variable_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        read_launch_info({"RANK": "0", "WORLD_SIZE": "two"})


@pytest.mark.parametrize(("nodelist", "hosts"), [
    ("node1", ["node1"]),
    ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
    ("gpu[08-10,12],login1", ["gpu08", "gpu09", "gpu10", "gpu12", "login1"]),
    ("a[1-2]-ib,b7", ["a1-ib", "a2-ib", "b7"]),
])
def test_expand_slurm_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_slurm_nodelist(nodelist) == hosts
