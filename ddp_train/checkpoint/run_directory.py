"""The run directory's files (DESIGN.md), each written atomically by rank 0 alone."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    Temporary name in the same directory, flush + fsync, rename, fsync the directory
    (so that the rename itself survives a power loss).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class RunDirectory:
    """``<output_dir>/<name>/``: config.yaml, metrics.jsonl, model.pt, summary.json."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def metrics_path(self) -> Path:
        """metrics.jsonl."""
        return self.path / "metrics.jsonl"

    def create(self) -> None:
        """Create the directory (parents too)."""
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config_yaml: str) -> None:
        """config.yaml: the resolved config with the versions."""
        atomic_write_bytes(self.path / "config.yaml", config_yaml.encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        """summary.json."""
        atomic_write_bytes(self.path / "summary.json",
                           (json.dumps(summary, indent=2, allow_nan=False, default=str) + "\n").encode())

    def write_model(self, state_dict: dict[str, torch.Tensor]) -> None:
        """model.pt: a plain CPU state dict, loadable with ``torch.load(weights_only=True)``."""
        tmp = self.path / f".model.pt.tmp-{os.getpid()}"
        torch.save(state_dict, tmp)
        with tmp.open("rb+") as file:
            os.fsync(file.fileno())
        os.replace(tmp, self.path / "model.pt")
