"""The structured config: one dataclass per section, each in its own file with its own `validate()`,
composed here; `Config.validate` adds the checks that span sections.

Every field has a type and a default, so omegaconf rejects unknown keys, badly typed values and
choices outside their Enum at start-up; `validate` adds the checks types cannot express, first the one
every section shares: each float is finite (inf and nan mean nothing anywhere).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from hmtrain.config.checks import require, require_finite
from hmtrain.config.data import DataConfig
from hmtrain.config.eval import EvalConfig
from hmtrain.config.memory import MemoryConfig
from hmtrain.config.memory_model import MemoryModelConfig
from hmtrain.config.model import Family, ModelConfig
from hmtrain.config.parallel import Engine, ParallelConfig
from hmtrain.config.retention import RetentionConfig
from hmtrain.config.tracking import LoggingConfig
from hmtrain.config.train import Mode, TrainConfig
from hmtrain.config.tree import TreeConfig


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    memory_model: MemoryModelConfig = field(default_factory=MemoryModelConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)

    def validate(self) -> None:
        """Raises ConfigError naming the first bad key."""
        for section in fields(self):
            require_finite(getattr(self, section.name), section.name)
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.eval.validate()
        self.tree.validate()
        self.parallel.validate(levels=len(self.tree.branching))
        self.memory.validate(levels=len(self.tree.branching), n_layers=self.model.n_layers)
        if self.data.tokenizer == "hf":
            require(bool(self.model.hf_path), "data.tokenizer",
                    "hf reads tokenizer.json of model.hf_path, which is empty")
        if self.model.family == Family.hf:
            require(self.train.mode == Mode.hierarchical, "train.mode",
                    "a Hugging Face anchor (model.family=hf) trains hierarchical memories; a dense baseline is "
                    "model.family=lm")
        if (self.model.family in (Family.lm, Family.hf) and self.train.mode == Mode.hierarchical
                and self.train.memory_steps > 0):
            require(sum(self.memory.units) > 0, "memory.units",
                    f"{self.memory.units} gives the memory phase no memory to train; give a level units > 0, or "
                    "train.mode=dense for a dense baseline, or train.memory_steps=0 to pretrain the anchor alone")
        if self.train.eval_every and self.train.eval_probes:  # (no validation: nothing reads the probes)
            require(bool(self.data.probes), "train.eval_probes",
                    f"{self.train.eval_probes} asks for probes in validation, but data.probes names no probe file")
        if self.model.family == Family.memory_model:
            require(not self.train.eval_probes, "train.eval_probes",
                    "a memory model (model.family=memory_model) answers no probe questions; set train.eval_probes=0")
            self._validate_memory_model()
        self.retention.validate()

    def _validate_memory_model(self) -> None:
        """model.family=memory_model: the `memory_model` section and what it needs elsewhere."""
        mm = self.memory_model
        mm.validate()
        require(self.data.seq_len == mm.chunks * mm.n_ctx, "data.seq_len",
                f"a memory model reads sequences of memory_model.chunks x n_ctx = {mm.chunks} x {mm.n_ctx} = "
                f"{mm.chunks * mm.n_ctx} tokens, got {self.data.seq_len}")
        require(self.parallel.engine == Engine.fsdp, "parallel.engine",
                "memory models train with the fsdp engine (a plain module on one process); deepspeed is not supported")
