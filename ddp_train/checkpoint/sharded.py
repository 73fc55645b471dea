"""Sharded checkpoints (``train.strategy=fsdp``): one directory per checkpoint, written by every rank.

Layout of ``<run_dir>/checkpoints/step_00000120/`` (``best_00000080/`` for the best one)::

    .metadata        which file holds which slice of which tensor (torch.distributed.checkpoint)
    __0_0.distcp     rank 0's shards of the model and optimizer tensors
    __1_0.distcp     rank 1's shards, ...
    trainer.pt       everything else, written by rank 0 last: progress, schedule, sampler,
                     early stopping, the RNG streams of every rank, optimizer hyperparameters

Every rank writes its own shards in parallel into a hidden temporary directory; once all
have finished (DCP collects every rank's write results before writing ``.metadata``),
rank 0 adds ``trainer.pt``, fsyncs and renames the directory to its final name, so a
checkpoint is complete or invisible. Loading reshards: a checkpoint written by N ranks
loads into M ranks (M = 1 included), since ``.metadata`` maps each tensor's slices to
files. Only tensors live in the DCP files: ``.metadata`` is read with an allowlist of
types that admits tensor entries only, and the load planner refuses any other entry (DCP
would unpickle it with ``weights_only=False``), so, as for single-file checkpoints,
loading never runs code from the files.

Single-file checkpoints (``step_00000120.pt``, written by DDP or single-process runs, or
by ``ddp-train convert``) are listed and loaded alongside.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ddp_train.checkpoint.atomic import atomic_link, fsync_directory, publish, remove, temporary_path
from ddp_train.checkpoint.single_file import load_plain, read_checkpoint, save_file
from ddp_train.checkpoint.store import (FORMAT_VERSION, REQUIRED_KEYS, CheckpointFile, CheckpointStore,
                                        save_failure)
from ddp_train.errors import TrainingFailed, first_line

TRAINER_STATE = "trainer.pt"
"""The file of a sharded checkpoint that holds everything but the model and optimizer tensors."""
SHARDED_KEYS = tuple(k for k in REQUIRED_KEYS if k not in ("model", "optimizer")) + ("optimizer_plain",)
_DIR_NAME = re.compile(r"^(step|best)_(\d{8})$")


# ---------------------------------------------------------------------------------------
# Reading .metadata without running code from it.


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``, refusing every global but the types that describe tensors.

    ``BytesStorageMetadata`` is refused: it marks an entry that DCP stores as pickled bytes
    and unpickles with ``weights_only=False`` on load, and ddp_train never writes one.
    """

    _ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
            "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "collections": {"OrderedDict"},
        # StorageMeta records the directory written to as a path object.
        "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
        "pathlib._local": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    }

    def find_class(self, module: str, name: str) -> Any:
        if name in self._ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name == "BytesStorageMetadata":
            raise pickle.UnpicklingError("it lists a non-tensor entry (BytesStorageMetadata), refused: "
                                         "loading one unpickles it, which can run code")
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader with ``.metadata`` unpickled through an allowlist."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = Path(self.path) / ".metadata"
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise pickle.UnpicklingError("checkpoint metadata is not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner, refusing every entry that is not a tensor.

    DCP stores a non-tensor value as pickled bytes, and its default planner loads them with
    ``torch.load(weights_only=False)``, which runs whatever code they name. ddp_train writes
    only tensors, so such an entry is never one of ours: a second guard behind
    :class:`SafeReader`'s allowlist.
    """

    def create_local_plan(self) -> LoadPlan:
        """The default plan, once every read in it is checked to be a tensor's."""
        plan = super().create_local_plan()
        for item in plan.items:
            if item.type != LoadItemType.TENSOR:
                raise ValueError(f"refusing non-tensor entry {item.dest_index.fqn!r}: loading it "
                                 f"unpickles it, which can run code")
        return plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Never unpickle: the plan holds no such read."""
        raise ValueError(f"refusing non-tensor entry {read_item.dest_index.fqn!r}")


# ---------------------------------------------------------------------------------------
# Tensors go to DCP's files, everything else to trainer.pt.


def _split(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, rest)``: the nested dict's tensor leaves and its other leaves, same paths."""
    tensors: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            inner_tensors, inner_rest = _split(value)
            tensors[key], rest[key] = inner_tensors, inner_rest
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            rest[key] = value
    return tensors, rest


def _merge(tensors: dict[str, Any], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_split`."""
    merged = dict(rest)
    for key, value in tensors.items():
        merged[key] = _merge(value, rest.get(key, {})) if isinstance(value, dict) else value
    return merged


# ---------------------------------------------------------------------------------------
# Optimizer state: by parameter name (DCP, FSDP) or by position (optimizer.state_dict()).


def optimizer_state_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name turned into ``optimizer.state_dict()``'s form.

    Parameters are numbered in the order the param groups list them, as torch does.
    """
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        numbers = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": numbers})
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": groups}


def optimizer_state_by_name(state: dict[str, Any], model: nn.Module,
                            optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_by_index`, naming parameters as ``model`` does."""
    names = {id(param): name for name, param in model.named_parameters()}
    order = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    saved = sum(len(group["params"]) for group in state["param_groups"])
    if saved != len(order):
        raise ValueError(f"its optimizer state has {saved} parameters, this model {len(order)}")
    groups = [{**group, "params": [order[i] for i in group["params"]]}
              for group in state["param_groups"]]
    return {"state": {order[int(i)]: value for i, value in state["state"].items()},
            "param_groups": groups}


# ---------------------------------------------------------------------------------------
# One sharded checkpoint.


def _check_trainer_state(state: Any) -> dict[str, Any]:
    if not isinstance(state, dict) or any(key not in state for key in SHARDED_KEYS):
        raise ValueError(f"is not a ddp_train sharded checkpoint ({TRAINER_STATE} keys missing)")
    if state["format_version"] != FORMAT_VERSION:
        raise ValueError(f"has format version {state['format_version']}, expected {FORMAT_VERSION}")
    return state


def read_sharded(path: Path) -> dict[str, Any]:
    """Check a sharded checkpoint directory; its trainer state (plus ``path``) or ValueError.

    Every file ``.metadata`` names must exist and be long enough, so a checkpoint with a
    lost or truncated shard is refused before any rank starts loading it.
    """
    try:
        state = load_plain(path / TRAINER_STATE)
    except ValueError as exc:  # missing, empty, truncated, pickled objects...
        raise ValueError(f"has an unloadable {TRAINER_STATE}, which {exc}") from None
    state = _check_trainer_state(state)
    try:
        metadata = SafeReader(path).read_metadata()
    except Exception as exc:  # missing, empty, truncated, a refused type...
        raise ValueError(f"has an unloadable .metadata ({type(exc).__name__}: "
                         f"{first_line(exc, 200)})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        if isinstance(info, dcp_filesystem._StorageInfo):
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file() or file.stat().st_size < size:
            raise ValueError(f"is missing data: shard file {name} is "
                             f"{'absent' if not file.is_file() else 'truncated'}")
    return {**state, "path": str(path)}


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 optimizer_plain: dict[str, Any]) -> None:
    """Load the model and optimizer tensors of a sharded checkpoint (a collective).

    The current model's sharding (any world size, or none) decides what each rank reads.
    """
    model_state, optimizer_state = get_state_dict(model, optimizer)
    # The fresh optimizer's tensors say what to read; its hyperparameters give way to the saved.
    optimizer_tensors, _ = _split(optimizer_state)
    target = {"model": model_state, "optimizer": optimizer_tensors}
    try:
        dcp.load(target, storage_reader=SafeReader(path), planner=TensorOnlyPlanner())
    except CheckpointException as exc:  # a BaseException: it would escape every handler
        raise ValueError(_first_failure(exc)) from None
    set_state_dict(model, optimizer, model_state_dict=target["model"],
                   optim_state_dict=_merge(target["optimizer"], optimizer_plain))


def sharded_to_single_file(path: Path) -> dict[str, Any]:
    """A sharded checkpoint as one single-file checkpoint's state (full tensors, on CPU).

    Reads every shard in this process, without a process group.
    """
    state = read_sharded(path)
    state.pop("path")
    metadata = SafeReader(path).read_metadata()
    target: dict[str, Any] = {}
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, dcp_metadata.TensorStorageMetadata):
            continue  # only tensors are read: other entries could hold pickled code
        node = target
        route = metadata.planner_data[key]
        for part in route[:-1]:
            node = node.setdefault(part, {})
        node[route[-1]] = torch.empty(item.size, dtype=item.properties.dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(target, storage_reader=SafeReader(path), planner=TensorOnlyPlanner(), no_dist=True)
        except CheckpointException as exc:
            raise ValueError(f"cannot be read ({_first_failure(exc)})") from None
    optimizer = _merge(target.get("optimizer", {}), state.pop("optimizer_plain"))
    state["model"] = target.get("model", {})
    state["optimizer"] = optimizer_state_by_index(optimizer)
    return state


# ---------------------------------------------------------------------------------------
# The checkpoints of a run.


class ShardedCheckpointStore(CheckpointStore):
    """Saves (every rank), rotates, finds and loads the checkpoints of a sharded run.

    Lists sharded directories and single-file checkpoints together, by step; the same
    completeness, rotation and best rules as the single-file store.
    """

    def list(self) -> list[CheckpointFile]:
        """Complete checkpoints of both kinds, oldest first; temporaries are never listed."""
        found = super().list()
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                match = _DIR_NAME.match(path.name)
                if match and path.is_dir():
                    found.append(CheckpointFile(path, int(match.group(2)), match.group(1)))
        return sorted(found, key=lambda c: (c.step, c.kind == "step", c.path.is_dir()))

    def read(self, path: Path) -> dict[str, Any]:
        """A sharded directory's trainer state (plus its ``path``), or a single-file checkpoint."""
        return read_sharded(path) if path.is_dir() else read_checkpoint(path)

    def delete(self, path: Path) -> None:
        """Remove a checkpoint directory or file."""
        remove(path)

    def is_checkpoint_directory(self, path: Path) -> bool:
        """A checkpoint's own directory: by its name, its trainer state, or DCP's index."""
        return (_DIR_NAME.match(path.name) is not None or (path / TRAINER_STATE).exists()
                or super().is_checkpoint_directory(path))

    def save(self, state: dict[str, Any], step: int, *, periodic: bool, best: bool) -> Path:
        """Write the checkpoint of ``step`` as periodic and/or best, then rotate (a collective).

        Every rank writes the shards of ``state["model"]`` and of the optimizer state's
        tensors; rank 0 then writes the rest of ``state`` (complete on rank 0 only).
        """
        name = f"{'step' if periodic else 'best'}_{step:08d}"
        first = self.directory / name
        temporary: str | None = None
        if self.ranks.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            temporary = str(temporary_path(first))
            remove(Path(temporary))
        # Rank 0 names the directory every rank writes into (and has made sure it is fresh).
        tmp = Path(self.ranks.broadcast_from_main(temporary))
        optimizer_tensors, optimizer_plain = _split(state["optimizer"])
        try:
            dcp.save({"model": state["model"], "optimizer": optimizer_tensors},
                     storage_writer=FileSystemWriter(tmp, sync_files=True))
        except CheckpointException as exc:  # e.g. a full disk on some rank; every rank gets it
            if self.ranks.is_main:  # every rank has stopped writing into it
                remove(tmp)
            raise TrainingFailed(f"writing checkpoint {name} failed: {_first_failure(exc)}") from None
        # dcp.save returns after every rank's shards are written and .metadata is.
        if not self.ranks.is_main:
            return first
        rest = {key: value for key, value in state.items() if key not in ("model", "optimizer")}
        best_path = self.directory / f"best_{step:08d}"
        try:
            save_file({**rest, "optimizer_plain": optimizer_plain}, tmp / TRAINER_STATE)
            fsync_directory(tmp)
            publish(tmp, first)
            if periodic and best:
                atomic_link(first, best_path)
        except Exception as exc:
            remove(tmp)
            remove(temporary_path(best_path))
            raise save_failure(f"writing checkpoint {name}", exc) from None
        self._rotate(step, periodic, best)
        return first


def _first_failure(exc: CheckpointException) -> str:
    """One line on what went wrong on the first rank that failed."""
    rank, (error, _) = next(iter(exc.failures.items()))
    return f"rank {rank}: {type(error).__name__}: {first_line(error)}"
