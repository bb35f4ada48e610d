"""Structured configs (dataclasses + omegaconf) and their loading and validation."""
from hmtrain.config.load import ConfigError, flatten, load_config, to_yaml, validate
from hmtrain.config.schema import (
    Config,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    MemoryConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    TreeConfig,
)

__all__ = [
    "Config", "ConfigError", "DataConfig", "EvalConfig", "LoggingConfig", "MemoryConfig", "ModelConfig",
    "OptimConfig", "TrainConfig", "TreeConfig", "flatten", "load_config", "to_yaml", "validate",
]
