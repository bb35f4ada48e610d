"""`owner` placement: which rank owns each level-1 subtree, balanced by training tokens.

Longest-processing-time greedy: subtrees in decreasing token count, each to the rank with
the fewest tokens so far (ties to the lower rank), so the result is the same on every rank.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def assign_subtrees(tokens_per_subtree: Sequence[int], world_size: int) -> np.ndarray:
    """Level-1 node -> owning rank."""
    tokens = np.asarray(tokens_per_subtree, dtype=np.int64)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size > len(tokens):
        raise ValueError(f"owner placement needs at least one level-1 subtree per rank: {len(tokens)} subtrees "
                         f"for {world_size} ranks (use parallel.placement=gather, or a wider first tree level)")
    owner = np.empty(len(tokens), dtype=np.int64)
    load = np.zeros(world_size, dtype=np.int64)
    for subtree in np.argsort(-tokens, kind="stable"):
        rank = int(np.argmin(load))
        owner[subtree] = rank
        load[rank] += tokens[subtree]
    return owner


def imbalance(tokens_per_subtree: Sequence[int], owner: np.ndarray, world_size: int) -> float:
    """max / mean tokens per rank (1.0 is perfect balance)."""
    load = np.bincount(owner, weights=np.asarray(tokens_per_subtree, dtype=np.float64), minlength=world_size)
    return float(load.max() / max(load.mean(), 1e-12))
