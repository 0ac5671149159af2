"""Config layer: schemas, registration and validation. Imports no torch code."""

from kimi_lab.config.schema import Config, register_configs
from kimi_lab.config.validate import ConfigError, validate_config

__all__ = ["Config", "ConfigError", "register_configs", "validate_config"]
