"""Fully sharded data parallel (``train.strategy=fsdp``) with FSDP2's ``fully_shard``.

Each rank keeps only its shard of every parameter, gradient and optimizer state; a unit
(a transformer block, by default) gathers its full parameters just before its forward and
backward and frees them after, and gradients are reduce-scattered so that each rank gets
the averaged gradient of its own shard. Parameters become DTensors sharded on dim 0.

This module owns what differs from DDP: which modules become units, the mixed-precision
and offload policies, switching gradient reduction off on accumulation micro-steps, the
global gradient norm over shards, validation with uneven shards, the full state dict for
``model.pt``, and the bytes each rank holds.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Iterable, Iterator, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, default_collate

from ddp_train.config import FSDPConfig
from ddp_train.distributed.environment import DistEnv
from ddp_train.errors import ConfigError
from ddp_train.components.models import GPTBlock

Strategy = Literal["none", "ddp", "fsdp"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_strategy(strategy: str, world_size: int) -> Strategy:
    """``train.strategy`` as run: auto is ddp with more than one rank, else none."""
    if strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    return strategy  # type: ignore[return-value]


def _shared_outside(model: nn.Module, unit: nn.Module) -> str | None:
    """The name of a parameter of ``unit`` that a module outside it also holds (tied weights)."""
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    within = Counter(id(p) for m in unit.modules() for p in m.parameters(recurse=False))
    for name, param in unit.named_parameters():
        if owners[id(param)] > within[id(param)]:
            return name
    return None


def shard_units(model: nn.Module, class_names: Iterable[str]) -> list[nn.Module]:
    """The modules that become FSDP units (each gathers its parameters on its own).

    With ``class_names``, every module of those classes (outermost only: a unit inside a
    unit would gather its parameters twice). Without, the built-in GPT's blocks or, for
    other models, every direct child that has parameters of its own not tied to a module
    outside it. The root is not included: it is always a unit, holding the rest.
    """
    names = list(class_names)
    if names:
        present = {type(m).__name__ for m in model.modules()}
        missing = [n for n in names if n not in present]
        if missing:
            raise ConfigError("train.fsdp.shard_modules", f"expected module classes of the model, "
                                                          f"got {missing} (the model has: "
                                                          f"{', '.join(sorted(present))})")
        wanted = lambda m: type(m).__name__ in names  # noqa: E731
    elif any(isinstance(m, GPTBlock) for m in model.modules()):
        wanted = lambda m: isinstance(m, GPTBlock)  # noqa: E731
    else:
        children = [c for c in model.children() if any(True for _ in c.parameters())
                    and _shared_outside(model, c) is None]
        return children
    units: list[nn.Module] = []
    for module in model.modules():
        if module is not model and wanted(module) and not any(
                module in set(u.modules()) for u in units):
            units.append(module)
    for unit in units:
        tied = _shared_outside(model, unit)
        if tied is not None:
            raise ConfigError("train.fsdp.shard_modules",
                              f"{type(unit).__name__} holds parameter {tied!r}, which is tied to a "
                              f"module outside it; leave that class out (tied weights must live "
                              f"in one unit)")
    return units


def mixed_precision_policy(precision: str, reduce_dtype: str) -> MixedPrecisionPolicy:
    """bf16: compute in bf16, reduce gradients in ``reduce_dtype``; fp32: no casts."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=_DTYPES[reduce_dtype])
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, config: FSDPConfig, precision: str, device: torch.device
               ) -> FSDPModule:
    """Shard ``model`` in place over the default process group: each unit, then the root.

    Ranks must hold identical weights before this (same seed); each keeps its dim-0 shard.
    """
    kwargs: dict[str, Any] = {
        "reshard_after_forward": config.reshard_after_forward,
        "mp_policy": mixed_precision_policy(precision, config.reduce_dtype)}
    if config.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for unit in shard_units(model, config.shard_modules):
        fully_shard(unit, **kwargs)
    # The root holds what no unit does (embeddings, heads); the backward starts with them,
    # so they stay gathered after the forward (as FSDP's own default does for the root).
    return fully_shard(model, **{**kwargs, "reshard_after_forward": False})


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """A context for one micro-batch's forward and backward that reduces gradients or not.

    Without reduction FSDP keeps this rank's unsharded gradients and reduce-scatters their
    sum on the next micro-batch that reduces, as DDP's ``no_sync`` does.
    """
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together, as a plain tensor identical on every rank.

    For sharded (DTensor) gradients ``get_total_norm`` reduces the shards' partial norms
    across ranks; the result is replicated, so taking the local value needs no collective.
    """
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def even_batches(loader: DataLoader, env: DistEnv) -> Iterator[tuple[Any, bool]]:
    """``(batch, counts)`` pairs with as many batches on every rank.

    A sharded model's forward is a collective (it gathers parameters), but validation
    shards may differ in size by a sample, or be empty. Ranks with fewer batches repeat
    a batch with ``counts=False`` so that every forward has its partners; its outputs
    are discarded.
    """
    count = torch.tensor([len(loader)], dtype=torch.int64, device=env.device)
    if env.distributed:
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    total = int(count.item())
    last: Any = None
    done = 0
    for batch in loader:
        last = batch
        done += 1
        yield batch, True
    if done < total and last is None:
        last = default_collate([loader.dataset[0]])  # an empty shard: any sample will do
    for _ in range(total - done):
        yield last, False


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU on rank 0 (empty elsewhere); every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (its shard for a DTensor, else the tensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters and optimizer state this rank holds (shards, not full tensors)."""
    params = sum(local_tensor(p).numel() * p.element_size() for p in model.parameters())
    state = 0
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                state += local_tensor(value).numel() * value.element_size()
    return {"parameters": params, "optimizer_state": state}
