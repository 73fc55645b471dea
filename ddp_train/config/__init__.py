"""Run configuration, torch-free: the sections (:mod:`.sections`), loading YAML files and
overrides (:mod:`.loading`), and printing with descriptions (:mod:`.printing`)."""

from ddp_train.config.loading import (apply_override, config_from_dict, format_override, load_config,
                                      parse_yaml, read_config_file)
from ddp_train.config.printing import config_to_dict, config_to_yaml, field_help
from ddp_train.config.sections import (CheckpointConfig, DataConfig, DebugConfig, DistConfig,
                                       EarlyStoppingConfig, EvalConfig, FSDPConfig, LoggingConfig,
                                       LoopConfig, LossConfig, ModelConfig, OptimConfig, ProfileConfig,
                                       RunConfig, ScheduleConfig, TrainConfig)

__all__ = ["CheckpointConfig", "DataConfig", "DebugConfig", "DistConfig", "EarlyStoppingConfig",
           "EvalConfig", "FSDPConfig", "LoggingConfig", "LoopConfig", "LossConfig", "ModelConfig",
           "OptimConfig", "ProfileConfig", "RunConfig", "ScheduleConfig", "TrainConfig",
           "apply_override", "config_from_dict", "config_to_dict", "config_to_yaml", "field_help",
           "format_override", "load_config", "parse_yaml", "read_config_file"]
