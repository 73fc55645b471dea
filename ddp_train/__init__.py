"""ddp_train: a small, exact, torchrun-compatible trainer for distributed PyTorch."""

from typing import Any

from ddp_train.config import TrainConfig, load_config
from ddp_train.errors import ConfigError, TrainingFailed, UsageError
from ddp_train.version import __version__

__all__ = ["Trainer", "TrainConfig", "load_config", "ConfigError", "TrainingFailed", "UsageError",
           "__version__"]


def __getattr__(name: str) -> Any:
    # The Trainer imports torch: loaded on first use, so that the torch-free parts (the
    # config, the onnxruntime model server) start without it.
    if name == "Trainer":
        from ddp_train.training.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'ddp_train' has no attribute {name!r}")
