"""Parameter counts without allocating, and the dense baseline sized from a target count.

`count_parameters` is the arithmetic of `Transformer`; a test pins the two together,
so `hmtrain info` can print the paper's presets without building them.
"""
from __future__ import annotations

import dataclasses

from hmtrain.config import ModelConfig


def count_parameters(cfg: ModelConfig) -> int:
    inner = cfg.n_heads * cfg.head_dim
    attention = 4 * cfg.d_model * inner + (2 * inner if cfg.qk_norm else 0)
    ffn = 3 * cfg.d_model * cfg.ffn_hidden
    per_layer = attention + ffn + 2 * cfg.d_model  # two gain-only norms
    embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.n_layers * per_layer + cfg.d_model  # final norm


def human(n: int) -> str:
    """A parameter count for people: 163.51M, 4.62B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def dense_config(anchor: ModelConfig, target_params: int) -> ModelConfig:
    """A wider model of the anchor's depth whose parameter count is closest to `target_params`.

    Width (d_model, heads, FFN) scales together by one factor, so the baseline keeps the
    anchor's shape ratios; the paper's comparison is against dense models of > 2x the anchor.
    """
    if target_params < count_parameters(anchor):
        raise ValueError(f"dense target {target_params:,} is below the anchor's "
                         f"{count_parameters(anchor):,} parameters")
    best, best_gap = anchor, abs(count_parameters(anchor) - target_params)
    scale = 1.0
    while scale <= 8.0:
        candidate = dataclasses.replace(
            anchor,
            d_model=_round_to(anchor.d_model * scale, 8),
            n_heads=max(1, int(round(anchor.n_heads * scale))),
            ffn_hidden=_round_to(anchor.ffn_hidden * scale, 8),
        )
        gap = abs(count_parameters(candidate) - target_params)
        if gap < best_gap:
            best, best_gap = candidate, gap
        scale += 0.01
    return best


def run_model_config(anchor: ModelConfig, mode: str, dense_multiplier: float) -> ModelConfig:
    """The model a run trains: the anchor itself, or (mode=dense) the baseline sized from it."""
    if mode == "dense":
        return dense_config(anchor, int(dense_multiplier * count_parameters(anchor)))
    return anchor
