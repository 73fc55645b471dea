"""The run directory's files, each written atomically by rank 0 alone.

``<run.output_dir>/<run.name>/`` holds ``config.yaml``, ``metrics.jsonl``,
``checkpoints/``, ``model.pt`` and ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ddp_train.checkpoint.atomic import atomic_write
from ddp_train.checkpoint.single_file import save_file


class RunDirectory:
    """``<output_dir>/<name>/``: config.yaml, metrics.jsonl, model.pt, summary.json."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def metrics_path(self) -> Path:
        """metrics.jsonl."""
        return self.path / "metrics.jsonl"

    @property
    def checkpoints_path(self) -> Path:
        """checkpoints/."""
        return self.path / "checkpoints"

    def create(self) -> None:
        """Create the directory (parents too)."""
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config_yaml: str) -> None:
        """config.yaml: the resolved config with the versions."""
        atomic_write(self.path / "config.yaml", config_yaml.encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        """summary.json."""
        atomic_write(self.path / "summary.json",
                     (json.dumps(summary, indent=2, allow_nan=False, default=str) + "\n").encode())

    def write_model(self, state_dict: dict[str, torch.Tensor]) -> None:
        """model.pt: a plain CPU state dict, loadable with ``torch.load(weights_only=True)``."""
        save_file(state_dict, self.path / "model.pt")
