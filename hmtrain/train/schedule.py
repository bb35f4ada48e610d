"""Learning-rate schedules: linear warmup, then cosine, warmup-stable-decay (WSD) or constant."""
from __future__ import annotations

import math

from hmtrain.config import OptimConfig


def learning_rate(optim: OptimConfig, step: int, total_steps: int) -> float:
    """The rate for `step` (0-based) of a phase lasting `total_steps` steps."""
    if total_steps <= 0:
        raise ValueError(f"a schedule needs total_steps > 0, got {total_steps}")
    warmup = min(optim.warmup_steps, total_steps)
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "cosine":
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))
    if optim.schedule == "wsd":
        decay_steps = max(1, int(round(optim.decay_fraction * total_steps)))
        decay_start = max(warmup, total_steps - decay_steps)
        if step < decay_start:
            return optim.lr
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return optim.lr + (optim.min_lr - optim.lr) * progress
    raise ValueError(f"unknown schedule {optim.schedule!r} (cosine, wsd or constant)")
