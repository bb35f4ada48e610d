"""`owner` placement: ranks in groups, each group owning level-1 subtrees, balanced by tokens and by rows.

W ranks form G groups of R = W / G consecutive ranks (group g: ranks g*R .. g*R + R - 1; consecutive, so on
a GPU cluster a group is a node or a few, as HSDP's replica groups are). G is the largest divisor of W that
is at most k_1, so W <= k_1 gives G = W groups of one rank each: today's one-owner-per-subtree placement.
Inside a group the R ranks are data-parallel replicas over its sequences and shard its subtrees' rows of
every level (hmtrain/memory/layout.py, `by_subtree`), so deep rows never leave their group.

Subtrees go to groups by longest-processing-time greedy: in decreasing token count (ties: lower node), each to
the group with the fewest tokens so far (ties: lower group) among those that may take one more without
breaking the row balance: every group ends with floor(k_1/G) or ceil(k_1/G) subtrees (each level-1 subtree
holds the same number of rows at every level, so subtrees counted are rows counted). Deterministic: the same
on every rank.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Groups:
    group_of_subtree: np.ndarray  # [k_1] int64: level-1 node -> the group that owns it
    group_size: int  # R: ranks per group; group g is ranks [g * R, (g + 1) * R)

    @property
    def num_groups(self) -> int:
        return int(self.group_of_subtree.max()) + 1 if self.group_of_subtree.size else 0

    @property
    def subtrees_per_group(self) -> list[int]:
        return np.bincount(self.group_of_subtree, minlength=self.num_groups).tolist()


def num_groups(num_subtrees: int, world_size: int) -> int:
    """G: the largest divisor of `world_size` that is at most `num_subtrees` (equal groups, none idle)."""
    if world_size < 1 or num_subtrees < 1:
        raise ValueError(f"need world_size >= 1 and at least one level-1 subtree, got {world_size}, {num_subtrees}")
    return max(g for g in range(1, min(world_size, num_subtrees) + 1) if world_size % g == 0)


def assign_groups(tokens_per_subtree: Sequence[int], world_size: int) -> Groups:
    """Level-1 node -> owning group, and the ranks per group, for `world_size` ranks."""
    tokens = np.asarray(tokens_per_subtree, dtype=np.int64).reshape(-1)
    groups = num_groups(len(tokens), world_size)
    base, extra = divmod(len(tokens), groups)  # `extra` groups hold base + 1 subtrees, the others base
    owner = np.empty(len(tokens), dtype=np.int64)
    load = np.zeros(groups, dtype=np.int64)
    count = np.zeros(groups, dtype=np.int64)
    for subtree in np.argsort(-tokens, kind="stable"):
        open_ = (count < base) | ((count == base) & (int((count > base).sum()) < extra))
        group = int(np.flatnonzero(open_)[np.argmin(load[open_])])
        owner[subtree] = group
        load[group] += tokens[subtree]
        count[group] += 1
    return Groups(owner, world_size // groups)

