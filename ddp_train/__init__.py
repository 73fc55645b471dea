"""ddp_train: a small, exact, torchrun-compatible trainer for distributed PyTorch."""

__version__ = "0.1.0"

from ddp_train.config import TrainConfig, load_config  # noqa: E402
from ddp_train.errors import ConfigError, TrainingFailed  # noqa: E402
from ddp_train.trainer import Trainer  # noqa: E402

__all__ = ["Trainer", "TrainConfig", "load_config", "ConfigError", "TrainingFailed", "__version__"]
