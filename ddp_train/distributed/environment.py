"""The distributed environment: who am I, on which device, and the process group.

Three launch modes give the same :class:`DistEnv`:

* no launcher: world size 1, no process group unless one is asked for;
* torchrun (or any launcher that sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``);
* ``srun python -m ddp_train`` with no torchrun: ``SLURM_PROCID``/``SLURM_NTASKS``/
  ``SLURM_LOCALID``, the rendezvous host being the first host of the step's node list.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ddp_train.config import DistConfig
from ddp_train.errors import ConfigError

log = logging.getLogger("ddp_train")


@dataclass(frozen=True)
class LaunchInfo:
    """Rank layout read from the environment."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str
    """'none', 'torchrun' or 'slurm'."""


def _int_env(environ: dict[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ConfigError("", f"environment variable {name}={environ[name]!r} is not an integer") from None


def read_launch_info(environ: dict[str, str] | None = None) -> LaunchInfo:
    """Rank, world size and local rank from torchrun's or SLURM's variables, else world size 1."""
    env = dict(os.environ) if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(_int_env(env, "RANK"), _int_env(env, "WORLD_SIZE"),
                          _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0, "torchrun")
    # SLURM_PROCID alone is also set in a batch script's own shell; a task of an srun step
    # also has SLURM_STEP_ID, and the step's task count is what makes up the world.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        world_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        if world_var in env:
            return LaunchInfo(_int_env(env, "SLURM_PROCID"), _int_env(env, world_var),
                              _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                              "slurm")
    return LaunchInfo(0, 1, 0, "none")


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list such as ``gpu[01-03,07],login1`` (no scontrol needed)."""
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not match:
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            if not high:
                hosts.append(f"{prefix}{low}{suffix}")
                continue
            for number in range(int(low), int(high) + 1):
                hosts.append(f"{prefix}{number:0{len(low)}d}{suffix}")
    return hosts


def _slurm_rendezvous(env: dict[str, str]) -> None:
    """Fill MASTER_ADDR/MASTER_PORT for an srun step unless the user set them."""
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        os.environ["MASTER_ADDR"] = expand_slurm_nodelist(nodelist)[0]
    if "MASTER_PORT" not in env:
        # Derived from the job id so that jobs sharing a node do not collide.
        os.environ["MASTER_PORT"] = str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)


@dataclass
class DistEnv:
    """This process's place in the job, its device, and (when needed) its process group."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str
    device: torch.device
    backend: str
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes run files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is initialised."""
        return dist.is_available() and dist.is_initialized()

    @classmethod
    def setup(cls, config: DistConfig, device: str = "auto", force_process_group: bool = False
              ) -> DistEnv:
        """Read the launch environment, pick the device and backend, init the process group.

        A process group is created when world size > 1, or at world size 1 when
        ``force_process_group`` (e.g. DDP asked for explicitly). An existing group (a
        library user who initialised one) is used as is and not torn down by :meth:`close`.
        """
        info = read_launch_info()
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("run.device", "expected a device that exists: cuda was asked for "
                                            "but CUDA is not available")
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            visible = torch.cuda.device_count()
            # With one GPU per task (srun --gpus-per-task=1) each process sees only its
            # own GPU, numbered 0, whatever its local rank.
            index = info.local_rank if visible > 1 else 0
            if index >= visible:
                raise ConfigError("", f"local rank {info.local_rank} has no GPU: only "
                                      f"{visible} visible to this process")
            torch_device = torch.device("cuda", index)
            torch.cuda.set_device(torch_device)
        else:
            torch_device = torch.device("cpu")
        backend = config.backend
        if backend == "auto":
            backend = "nccl" if use_cuda else "gloo"
        if backend == "nccl" and not use_cuda:
            raise ConfigError("dist.backend", "expected gloo (or auto) on CPU: nccl needs CUDA")

        env = cls(info.rank, info.world_size, info.local_rank, info.launcher, torch_device, backend)
        if dist.is_initialized():
            env.rank, env.world_size = dist.get_rank(), dist.get_world_size()
        elif info.world_size > 1 or force_process_group:
            env._init_process_group(config.timeout_s)
        return env

    def _init_process_group(self, timeout_s: float) -> None:
        timeout = datetime.timedelta(seconds=timeout_s)
        # Binding the group to this rank's GPU lets NCCL connect eagerly and avoids the
        # "guessing device" barrier warnings.
        device_id = self.device if self.device.type == "cuda" else None
        if self.launcher == "none":
            # A single process needs no rendezvous: an in-memory store is enough.
            dist.init_process_group(self.backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout, device_id=device_id)
        else:
            if self.launcher == "slurm":
                _slurm_rendezvous(dict(os.environ))
            dist.init_process_group(self.backend, store=self._attempt_store(timeout), rank=self.rank,
                                    world_size=self.world_size, timeout=timeout,
                                    device_id=device_id)
        self.owns_process_group = True
        log.debug("rank %d/%d: process group %s on %s", self.rank, self.world_size,
                  self.backend, self.device)

    def _attempt_store(self, timeout: datetime.timedelta) -> dist.Store:
        """The rendezvous store (as ``env://`` would make it), namespaced per restart attempt.

        torchrun's agent keeps one TCPStore for the whole job; after ``--max-restarts``
        restarts the workers, a new worker can read the addresses a killed one published
        and fail to connect (pytorch/pytorch#135712). Each attempt gets its own keys.
        """
        try:
            host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        except (KeyError, ValueError):
            raise ConfigError("", "MASTER_ADDR and MASTER_PORT must be set (torchrun sets them)") from None
        agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(host, port, self.world_size,
                              is_master=not agent_hosts_store and self.rank == 0,
                              timeout=timeout, multi_tenant=not agent_hosts_store)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return dist.PrefixStore(f"ddp_train/attempt_{attempt}", store)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (no-op without a process group) and return it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is true on at least one rank, so every rank decides alike."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item() > 0)

    def broadcast_from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object; no-op without a process group)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0; None on the other ranks."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def close(self, barrier: bool = True) -> None:
        """Destroy the process group if this object created it.

        With ``barrier`` every rank first waits for the others, so that no rank tears its
        group down while a peer still has collectives in flight.
        """
        if self.owns_process_group and dist.is_initialized():
            if barrier:
                dist.barrier()
            dist.destroy_process_group()
        self.owns_process_group = False
