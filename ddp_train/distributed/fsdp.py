"""Fully sharded data parallel (``train.strategy=fsdp``) with FSDP2's ``fully_shard``.

Each rank keeps only its shard of every parameter, gradient and optimizer state; a unit
(a transformer block, by default) gathers its full parameters just before its forward and
backward and frees them after, and gradients are reduce-scattered so that each rank gets
the averaged gradient of its own shard. Parameters become DTensors sharded on dim 0.

:class:`FSDPStrategy` owns what differs from DDP: which modules become units, the
mixed-precision and offload policies, switching gradient reduction off on accumulation
micro-steps, the global gradient norm over shards, validation with uneven shards, state
dicts (full or sharded), sharded checkpoints, and the full state dict for ``model.pt``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Any, ContextManager, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, IterableDataset

from ddp_train.checkpoint.sharded import (ShardedCheckpointStore, load_sharded, optimizer_state_by_index,
                                          optimizer_state_by_name)
from ddp_train.checkpoint.store import CheckpointStore
from ddp_train.config import CheckpointConfig, FSDPConfig, TrainConfig
from ddp_train.distributed.environment import DistEnv
from ddp_train.distributed.precision import DTYPES, Precision
from ddp_train.distributed.strategy import Strategy
from ddp_train.errors import ConfigError


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
    unit would gather its parameters twice). Without, the units the model declares with an
    ``fsdp_units()`` method (the built-in GPT: its blocks) or, for other models, every
    direct child that has parameters of its own not tied to a module outside it. The root
    is not included: it is always a unit, holding the rest.
    """
    names = list(class_names)
    if names:
        present = {type(m).__name__ for m in model.modules()}
        missing = [n for n in names if n not in present]
        if missing:
            raise ConfigError("train.fsdp.shard_modules", f"expected module classes of the model, "
                                                          f"got {missing} (the model has: "
                                                          f"{', '.join(sorted(present))})")
        units: list[nn.Module] = []
        for module in model.modules():
            if module is not model and type(module).__name__ in names and not any(
                    module in set(u.modules()) for u in units):
                units.append(module)
    elif callable(getattr(model, "fsdp_units", None)):
        units = list(model.fsdp_units())
    else:
        return [c for c in model.children() if any(True for _ in c.parameters())
                and _shared_outside(model, c) is None]
    for unit in units:
        tied = _shared_outside(model, unit)
        if tied is not None:
            raise ConfigError("train.fsdp.shard_modules",
                              f"{type(unit).__name__} holds parameter {tied!r}, which is tied to a "
                              f"module outside it; leave that class out (tied weights must live "
                              f"in one unit)")
    return units


def mixed_precision_policy(precision: Precision, reduce_dtype: str) -> MixedPrecisionPolicy:
    """Under autocast (bf16): compute in its dtype, reduce gradients in ``reduce_dtype``; fp32: no casts."""
    if precision.dtype is not None:
        return MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=DTYPES[reduce_dtype])
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, config: FSDPConfig, precision: Precision, device: torch.device
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
    shards may differ in size by a sample, or be empty, and a stream's shards have no
    length. Before each batch the ranks agree whether any has one left (a collective of
    one number); ranks that have none repeat a batch with ``counts=False`` so that every
    forward has its partners; its outputs are discarded.
    """
    batches = iter(loader)
    last: Any = None
    while True:
        batch = next(batches, None)
        more = torch.tensor([batch is not None], dtype=torch.int64, device=env.device)
        if env.distributed:
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        if batch is not None:
            last = batch
            yield batch, True
            continue
        if last is None:  # an empty shard: any sample will do
            last = loader.collate_fn([_any_item(loader.dataset)])
        yield last, False


def _any_item(dataset: Any) -> Any:
    """One item of a map-style data set, or of the stream behind a rank's share of one."""
    source = getattr(dataset, "source", dataset)
    return next(iter(source)) if isinstance(source, IterableDataset) else source[0]


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU on rank 0 (empty elsewhere); every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state in ``optimizer.state_dict()``'s form on rank 0 (a collective)."""
    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))
    return optimizer_state_by_index(state) if state else {}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                    optimizer_state: dict[str, Any]) -> None:
    """Load a single-file checkpoint's full model and optimizer state into a sharded model.

    Every rank passes the full state; each keeps its own shards.
    """
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(optimizer_state, model, optimizer),
                             options=StateDictOptions(full_state_dict=True))


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


class FSDPStrategy(Strategy):
    """FSDP2's ``fully_shard``: every rank holds a shard of each parameter, gradient and
    optimizer state; checkpoints are sharded directories that every rank writes."""

    name = "fsdp"

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        """What FSDP cannot combine with, said before any process group exists."""
        # GradScaler's overflow check sees only this rank's gradient shards, so ranks
        # could disagree on skipping a step.
        if config.train.precision == "fp16":
            raise ConfigError("train.precision", "expected fp32 or bf16 with train.strategy=fsdp "
                                                 "(fp16's gradient scaler does not agree on overflows "
                                                 "across shards), got 'fp16'")
        # A parametrized weight is computed from its parts, which FSDP would shard apart.
        if config.model.norm != "none":
            raise ConfigError("model.norm", f"expected none with train.strategy=fsdp (weight/spectral "
                                            f"norm parametrizations cannot be sharded), got "
                                            f"{config.model.norm!r}")
        if config.checkpoint.async_save:
            raise ConfigError("checkpoint.async_save", "expected false with train.strategy=fsdp "
                                                       "(every rank already writes its own shard in "
                                                       "parallel), got True")

    def wrap(self, module: nn.Module) -> nn.Module:
        """Shard ``module`` in place (its parameters become this rank's DTensor shards)."""
        apply_fsdp(module, self.config.train.fsdp, self.precision, self.env.device)
        return super().wrap(module)

    def gradient_sync(self, enabled: bool) -> ContextManager[Any]:
        """Without reduction FSDP keeps this rank's unsharded gradients and reduce-scatters
        their sum on the next micro-batch that reduces, as DDP's ``no_sync`` does."""
        if isinstance(self.module, FSDPModule):
            self.module.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The norm over every rank's shards."""
        return global_grad_norm(grads)

    def validation_batches(self, loader: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
        """A sharded model's forward is a collective: every rank runs as many batches."""
        return even_batches(loader, self.env)  # type: ignore[arg-type]

    def state_dicts(self, module: nn.Module, optimizer: torch.optim.Optimizer
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The shards gathered into full tensors on rank 0's CPU."""
        return full_model_state_dict(module), full_optimizer_state_dict(module, optimizer)

    def checkpoint_state_dicts(self, module: nn.Module, optimizer: torch.optim.Optimizer
                               ) -> tuple[dict[str, Any], dict[str, Any]]:
        """This rank's shards, keyed by parameter name (what every rank writes)."""
        return get_state_dict(module, optimizer)

    def load_state_dicts(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
        """A sharded checkpoint (every rank reads its part of the files) or full tensors."""
        if "path" in state:
            load_sharded(Path(state["path"]), module, optimizer, state["optimizer_plain"])
        else:
            load_full_state(module, optimizer, state["model"], state["optimizer"])

    def final_model_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The shards gathered into full tensors on rank 0's CPU."""
        return full_model_state_dict(module)

    def checkpoint_store(self, directory: Path, config: CheckpointConfig) -> CheckpointStore:
        """Sharded checkpoint directories (single files are read too)."""
        return ShardedCheckpointStore(directory, config, self.env)

