"""Options → validated config. ``load_config`` for the CLI, ``TrainerConfig.from_mapping`` in code."""

from .errors import MISSING, ConfigError, Problem
from .loader import ENV_OPTIONS, load_config, parse_command_line, read_config_file, read_env_file
from .trainer_config import EnvSettings, TrainerConfig, redact

__all__ = [
    "ENV_OPTIONS",
    "MISSING",
    "ConfigError",
    "EnvSettings",
    "Problem",
    "TrainerConfig",
    "load_config",
    "parse_command_line",
    "read_config_file",
    "read_env_file",
    "redact",
]
