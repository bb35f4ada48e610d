"""`memory_model`: encoder-decoder memory models (Badger 2026), their stacks and their curriculum."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hmtrain.config.checks import Choice, require, require_positive
from hmtrain.config.optim import OptimConfig


class BlockType(Choice):
    transformer = "transformer"
    mixer = "mixer"  # masked mixer: a learned causal token-mixing matrix


class Objective(Choice):
    autoencode = "autoencode"
    clm = "clm"
    copy = "copy"
    blank_copy = "blank_copy"
    combined = "combined"  # clm + blank_copy


COPY_OBJECTIVES = (Objective.copy, Objective.blank_copy, Objective.combined)


class ModelPart(Choice):
    """A part of a memory model a curriculum stage may freeze or re-initialise."""

    encoder_embedding = "encoder_embedding"
    encoder_blocks = "encoder_blocks"
    encoder = "encoder"
    decoder = "decoder"
    autoencoder_decoder = "autoencoder_decoder"


class Context(Choice):
    memory = "memory"  # the vectors of chunks 0..c-1
    none = "none"  # fillers only: the same decoder without memory
    full = "full"  # no chunking: every earlier token


class Expansion(Choice):
    """How the autoencoder's decoder spreads one vector over n_ctx positions."""

    repeat = "repeat"
    unrolled = "unrolled"


@dataclass
class StackConfig:
    """One stack of blocks (an encoder or a decoder) of a memory model or a retention probe."""

    # the stack's hidden size
    d_model: int = 128
    # blocks in the stack
    n_layers: int = 2
    # transformer blocks only (a masked mixer has no heads)
    n_heads: int = 4
    # dimension of each attention head
    head_dim: int = 32
    # SwiGLU hidden units of each block
    ffn_hidden: int = 384

    def validate(self, key: str, block: BlockType) -> None:
        require_positive(self, key, "d_model", "n_layers", "ffn_hidden")
        if block == BlockType.transformer:
            require(self.n_heads > 0 and self.head_dim > 0 and self.head_dim % 2 == 0, f"{key}.head_dim",
                    f"transformer blocks need n_heads > 0 and an even head_dim > 0, "
                    f"got {self.n_heads} x {self.head_dim}")


@dataclass
class StageConfig:
    """One stage of a memory model's curriculum: its steps, objective, frozen parts and schedule."""

    name: str = "train"
    steps: int = 100
    # the training objective without stages: clm, autoencode, copy, blank_copy or combined
    objective: Objective = Objective.clm
    # parts whose parameters do not train in this stage
    freeze: list[ModelPart] = field(default_factory=list)
    # parts re-initialised when the stage begins (e.g. a fresh encoder_embedding in front of frozen blocks)
    reinit: list[ModelPart] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.1,
                                                                   warmup_steps=20))


@dataclass
class MemoryModelConfig:
    """Each chunk of n_ctx tokens becomes one vector."""

    # the blocks of both stacks: transformer, or mixer (a masked mixer: learned causal token mixing)
    block: BlockType = BlockType.transformer
    # s: chunks per sequence (data.seq_len must be chunks x n_ctx); paper: 4 x 256
    chunks: int = 4
    # tokens per chunk; each chunk is encoded into one vector
    n_ctx: int = 64
    encoder: StackConfig = field(default_factory=StackConfig)
    decoder: StackConfig = field(default_factory=StackConfig)
    # what the decoder of chunk c sees besides its own tokens
    context: Context = Context.memory
    # how the autoencoder's decoder spreads one vector over n_ctx positions: repeat or unrolled
    expansion: Expansion = Expansion.unrolled
    # the decoder's output head reuses its input embedding table
    tie_embeddings: bool = False
    # RoPE's base frequency in both stacks
    rope_base: float = 10_000.0
    # epsilon of every RMSNorm
    norm_eps: float = 1e-5
    # standard deviation of the normal initialisation
    init_std: float = 0.02
    # the curriculum; empty means one stage of `train.pretrain_steps + train.memory_steps` steps on
    # `objective` with `train.anchor_optim`
    stages: list[StageConfig] = field(default_factory=list)
    # the training objective without stages: clm, autoencode, copy, blank_copy or combined
    objective: Objective = Objective.clm
    # the tokenizer's padding id, filled in from the prepared data (null until then)
    pad_id: Optional[int] = None

    def validate(self) -> None:
        """This section alone; Config.validate adds what it needs elsewhere (data.seq_len, the engine, steps)."""
        require(self.chunks > 0 and self.n_ctx > 0, "memory_model.chunks",
                f"chunks and n_ctx must be positive, got {self.chunks} x {self.n_ctx}")
        self.encoder.validate("memory_model.encoder", self.block)
        self.decoder.validate("memory_model.decoder", self.block)
        stages = [("memory_model.objective", self.objective, [], [], 1)] if not self.stages else [
            (f"memory_model.stages[{i}]", s.objective, s.freeze, s.reinit, s.steps) for i, s in enumerate(self.stages)]
        for key, objective, freeze, reinit, steps in stages:
            require(steps > 0, f"{key}.steps", f"must be positive, got {steps}")  # (1 for the stage-less objective)
            if objective in COPY_OBJECTIVES:
                require(self.chunks >= 2 and self.chunks % 2 == 0, "memory_model.chunks",
                        f"the {objective} objective copies the first half of the chunks into the second: needs an "
                        f"even number >= 2, got {self.chunks}")
            if objective == Objective.autoencode or any(p.startswith("encoder") for p in (*freeze, *reinit)):
                require(self.context == Context.memory or objective == Objective.autoencode, "memory_model.context",
                        f"{key} uses the encoder, which a memory model with context={self.context} does not have")
            if objective == Objective.autoencode and self.expansion == Expansion.unrolled:
                require(self.encoder.d_model % 2 == 0, "memory_model.encoder.d_model",
                        f"the unrolled expansion needs an even encoder width, got {self.encoder.d_model}")
        for i, stage in enumerate(self.stages):
            stage.optim.validate(f"memory_model.stages[{i}].optim")
