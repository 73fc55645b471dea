"""Run configuration (torch-free): schema dataclasses, YAML files and overrides."""

from ddp_train.config.schema import *  # noqa: F401,F403  (temporary during the move)
from ddp_train.config.schema import (_check, apply_override, config_from_dict, config_to_dict,  # noqa: F401
                                     config_to_yaml, field_help, load_config, parse_yaml, read_config_file)
