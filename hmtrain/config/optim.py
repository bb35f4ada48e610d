"""AdamW plus a learning-rate schedule: a part of `train` (three times), of each curriculum stage and of `retention`."""
from __future__ import annotations

from dataclasses import dataclass, field

from hmtrain.config.checks import Choice, require


class Schedule(Choice):
    cosine = "cosine"
    wsd = "wsd"  # warmup-stable-decay
    constant = "constant"


@dataclass
class OptimConfig:
    """Paper memory phase: cosine 1e-4 -> 1e-5."""

    # peak learning rate (after warmup)
    lr: float = 1e-3
    # learning rate at the end of the schedule
    min_lr: float = 1e-4
    # AdamW's (beta1, beta2)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    # AdamW's epsilon
    eps: float = 1e-8
    # AdamW's decoupled weight decay
    weight_decay: float = 0.1
    # linear warmup steps from 0 to lr
    warmup_steps: int = 100
    # the decay after warmup: cosine, constant or wsd (warmup-stable-decay)
    schedule: Schedule = Schedule.cosine
    # wsd only: fraction of the phase spent decaying
    decay_fraction: float = 0.2

    def validate(self, key: str) -> None:
        """`key`: where this optimizer sits, e.g. train.anchor_optim."""
        require(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"{key}.lr", "need 0 <= min_lr <= lr and lr > 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{key}.betas",
                f"need two values in [0, 1), got {self.betas}")
        require(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        require(0 < self.decay_fraction <= 1, f"{key}.decay_fraction", "must be in (0, 1]")
