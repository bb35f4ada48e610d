"""Structured configs (one dataclass per section, each validating itself) and their loading.

The public names: `Config`, `load_config` and friends, each section's dataclass, the choice Enums
code compares with, and the two shared checks library code calls (`check_branching`,
`split_global_batch`).
"""
from hmtrain.config.checks import Choice, ConfigError
from hmtrain.config.data import DataConfig, Tokenizer
from hmtrain.config.eval import EvalConfig
from hmtrain.config.load import flatten, load_config, to_yaml, validate
from hmtrain.config.memory import BankDtype, MemoryConfig, MemoryKind
from hmtrain.config.memory_model import (
    BlockType,
    Context,
    Expansion,
    MemoryModelConfig,
    ModelPart,
    Objective,
    StackConfig,
    StageConfig,
)
from hmtrain.config.model import Attention, Family, FfnImpl, ModelConfig
from hmtrain.config.optim import OptimConfig, Schedule
from hmtrain.config.parallel import Backend, Engine, ParallelConfig, Placement
from hmtrain.config.retention import AnchorPosition, RetentionConfig, RetentionExpansion
from hmtrain.config.root import Config
from hmtrain.config.tracking import LoggingConfig
from hmtrain.config.train import AnchorMode, Device, Mode, Precision, TrainConfig, split_global_batch
from hmtrain.config.tree import MIN_CHILDREN, TreeConfig, check_branching

__all__ = [
    "MIN_CHILDREN", "AnchorMode", "AnchorPosition", "Attention", "Backend", "BankDtype", "BlockType",
    "Choice", "Config", "ConfigError", "Context", "DataConfig", "Device", "Engine", "EvalConfig", "Expansion",
    "Family", "FfnImpl", "LoggingConfig", "MemoryConfig", "MemoryKind", "MemoryModelConfig", "Mode", "ModelConfig",
    "ModelPart", "Objective", "OptimConfig", "ParallelConfig", "Placement", "Precision", "RetentionConfig",
    "RetentionExpansion", "Schedule", "StackConfig", "StageConfig", "Tokenizer", "TrainConfig", "TreeConfig",
    "check_branching", "flatten", "load_config", "split_global_batch", "to_yaml", "validate",
]
