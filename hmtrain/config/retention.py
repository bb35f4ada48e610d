"""`retention`: the information-retention probe (`hmtrain eval retention`), a fresh decoder on a frozen vector."""
from __future__ import annotations

from dataclasses import dataclass, field

from hmtrain.config.checks import Choice, require, require_positive
from hmtrain.config.memory_model import BlockType, StackConfig
from hmtrain.config.optim import OptimConfig


class RetentionExpansion(Choice):
    repeat = "repeat"
    unrolled = "unrolled"
    both = "both"


class AnchorPosition(Choice):
    last = "last"
    mean = "mean"


@dataclass
class RetentionConfig:
    # tokens per window; each window becomes one vector
    n_ctx: int = 32
    # how the probe's decoder spreads one vector over its window: repeat, unrolled or both
    expansion: RetentionExpansion = RetentionExpansion.both
    # block type of the probe's decoder
    block: BlockType = BlockType.transformer
    decoder: StackConfig = field(default_factory=lambda: StackConfig(d_model=128, n_layers=2))
    # optimizer steps training each probe decoder
    steps: int = 300
    # windows per probe training batch
    batch_size: int = 32
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, min_lr=2e-4, weight_decay=0.0,
                                                                   warmup_steps=20))
    # windows used to train / evaluate the decoder (0 = all)
    train_windows: int = 4096
    # windows held out to measure what the decoder recovers (0 = all)
    heldout_windows: int = 512
    # anchor encoders: which layer's output (-1 = after the final norm) and which position
    anchor_layer: int = -1
    # which token's hidden state of a window an anchor encoder keeps: last or mean
    anchor_position: AnchorPosition = AnchorPosition.last
    # seed of the probe's initialisation and window draws (>= 0)
    seed: int = 0

    def validate(self) -> None:
        require_positive(self, "retention", "n_ctx", "steps", "batch_size")
        require(self.seed >= 0, "retention.seed", f"must be >= 0, got {self.seed}")
        self.decoder.validate("retention.decoder", self.block)
        for name in ("train_windows", "heldout_windows"):
            value = getattr(self, name)
            require(value >= 0, f"retention.{name}", f"must be >= 0 (0 = all), got {value}")
