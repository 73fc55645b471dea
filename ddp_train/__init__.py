"""ddp_train: a small, exact, torchrun-compatible trainer for distributed PyTorch."""

from typing import Any

__version__ = "0.1.0"

from ddp_train.config import TrainConfig, load_config  # noqa: E402
from ddp_train.errors import ConfigError, TrainingFailed  # noqa: E402

__all__ = ["Trainer", "TrainConfig", "load_config", "ConfigError", "TrainingFailed", "__version__"]


def __getattr__(name: str) -> Any:
    # The Trainer imports torch: loaded on first use, so that the torch-free parts (the
    # config, the onnxruntime model server) start without it.
    if name == "Trainer":
        from ddp_train.training.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'ddp_train' has no attribute {name!r}")
