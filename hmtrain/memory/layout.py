"""Which rank stores which rows of a memory table.

Three layouts (docs/design.md, "The bank in a distributed job"):

- ``replicated``: every rank stores every row (small top levels, the generic row); their
  optimizer state is sharded in the ``chunk`` layout: gradients are reduce-scattered, each
  rank updates its own rows and all-gathers them (ZeRO-1, hmtrain/memory/zero.py).
- ``chunk``: the ``torch.chunk`` layout, ceil(N/W) consecutive rows per rank, the last
  rank short. This is the layout checkpoints use (a ``Shard(0)`` DTensor that DCP
  reshards to any world size) and the runtime layout of ``gather`` placement.
- ``subtree``: ``owner`` placement. Level-1 subtrees are assigned to groups of ranks
  (hmtrain/parallel/placement.py); a group stores every row of its subtrees at every sharded
  level, cut among its ranks, so the sequences the loader sends a group never need another
  group's rows. With groups of one rank (W <= k_1) a rank holds its subtrees' rows whole.
  Checkpoints convert it to ``chunk`` and back.
- ``group``: ``owner`` placement's replicated levels (`parallel.replicate_levels`). Every rank of a
  group stores every row of its group's subtrees, so its sequences read them locally, and no rank
  stores another group's: per-rank memory falls as the groups multiply, and gradients are reduced
  inside the group alone (ZeRO-1 on the group's ranks, hmtrain/memory/zero.py). `owner` names the
  rank of the group whose optimizer slice holds the row (the ``subtree`` layout's cut), which is
  where a checkpoint saves it from.

All of it is host-side numpy: layouts are fixed for a run, and every lookup happens
while planning a step, never on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def chunk_rows(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s rows in the torch.chunk layout (ceil(N/W) per rank, last short)."""
    per = -(-num_rows // world_size)
    start = min(num_rows, rank * per)
    return start, min(num_rows, start + per)


@dataclass(frozen=True)
class RowLayout:
    kind: str  # replicated | chunk | subtree | group
    num_rows: int
    world_size: int
    rank: int
    owner: np.ndarray | None = None  # [N] int64 rank storing each row (None when replicated; group: see above)
    local: np.ndarray | None = None  # [N] int64 index of each row in its owner's storage (group: its group's)
    group_size: int = 1  # subtree: ranks per owning group (rows are fetched only from the own group's ranks)

    @property
    def num_local(self) -> int:
        if self.kind == "replicated":
            return self.num_rows
        return int(self._stored.sum())

    @property
    def _stored(self) -> np.ndarray:
        """[N] bool: whether this rank stores each row."""
        if self.kind == "group":
            return self.owner // self.group_size == self.rank // self.group_size
        return self.owner == self.rank

    @property
    def local_rows(self) -> np.ndarray:
        """Global ids of the rows this rank stores, in storage order."""
        if self.kind == "replicated":
            return np.arange(self.num_rows)
        mine = np.flatnonzero(self._stored)
        return mine[np.argsort(self.local[mine], kind="stable")]

    @property
    def is_chunk_compatible(self) -> bool:
        """Whether local storage already is this rank's torch.chunk slice (no conversion to save)."""
        return self.kind == "chunk" or self.world_size == 1


def replicated(num_rows: int, world_size: int, rank: int) -> RowLayout:
    return RowLayout("replicated", num_rows, world_size, rank)


def chunked(num_rows: int, world_size: int, rank: int) -> RowLayout:
    per = -(-num_rows // world_size)
    rows = np.arange(num_rows, dtype=np.int64)
    owner = rows // per
    return RowLayout("chunk", num_rows, world_size, rank, owner=owner, local=rows - owner * per)


def by_subtree(num_rows: int, num_subtrees: int, owner_of_subtree: np.ndarray, world_size: int,
               rank: int, group_size: int = 1) -> RowLayout:
    """Rows of one level, each stored in the group of ranks that owns its level-1 subtree.

    `owner_of_subtree[s]` is subtree s's group; group g is ranks [g * R, (g + 1) * R) for R = `group_size`.
    A level with N rows has N / k_1 rows per level-1 subtree, consecutive in node order (node j's parent is
    j // k_l), so row r belongs to subtree r // (N / k_1). A group's rows of the level, in node order, are
    cut among its R ranks as torch.chunk cuts a table (ceil(n / R) consecutive rows each, the last short).
    R = 1: every row on its subtree's one owner.
    """
    if num_rows % num_subtrees:
        raise ValueError(f"a level of {num_rows} rows does not split into {num_subtrees} subtrees")
    if group_size < 1 or world_size % group_size:
        raise ValueError(f"group_size must divide world_size {world_size}, got {group_size}")
    groups = world_size // group_size
    owner_of_subtree = np.asarray(owner_of_subtree, dtype=np.int64)
    if owner_of_subtree.shape != (num_subtrees,) or owner_of_subtree.min() < 0 or \
            owner_of_subtree.max() >= groups:
        raise ValueError(f"owner_of_subtree must give a group in [0, {groups}) for each of "
                         f"{num_subtrees} subtrees, got {owner_of_subtree.tolist()}")
    rows = np.arange(num_rows, dtype=np.int64)
    group = owner_of_subtree[rows // (num_rows // num_subtrees)]
    owner = np.empty(num_rows, dtype=np.int64)
    local = np.empty(num_rows, dtype=np.int64)
    for g in range(groups):  # a group's rows keep node order; O(groups) host work, once per run
        mine = np.flatnonzero(group == g)
        per = max(1, -(-len(mine) // group_size))
        position = np.arange(len(mine))
        owner[mine] = g * group_size + position // per
        local[mine] = position % per
    return RowLayout("subtree", num_rows, world_size, rank, owner=owner, local=local, group_size=group_size)


def in_group(num_rows: int, num_subtrees: int, owner_of_subtree: np.ndarray, world_size: int, rank: int,
             group_size: int) -> RowLayout:
    """Rows of one level, each stored by every rank of the group that owns its level-1 subtree, in node
    order (`local`: the row's index in its group's storage); `owner`: `by_subtree`'s cut of the group's rows."""
    cut = by_subtree(num_rows, num_subtrees, owner_of_subtree, world_size, rank, group_size)
    group = cut.owner // group_size
    local = np.empty(num_rows, dtype=np.int64)
    for g in np.unique(group):  # O(groups) host work, once per run
        mine = np.flatnonzero(group == g)
        local[mine] = np.arange(len(mine))
    return RowLayout("group", num_rows, world_size, rank, owner=cut.owner, local=local, group_size=group_size)


def pieces_per_row(num_rows: int, row_numel: int, ranks: int) -> int:
    """S: how many equal pieces to cut each row of a replicated table into so that `ranks` ranks share its
    optimizer state evenly (num_rows * S >= ranks): the smallest divisor of the row's size that reaches it,
    1 while the rows alone suffice. With S = 1 the pieces are the rows."""
    need = -(-ranks // max(num_rows, 1))
    if need <= 1:
        return 1
    return next((s for s in range(need, row_numel + 1) if row_numel % s == 0), row_numel)


def pieces_of(layout: RowLayout, pieces: int) -> RowLayout:
    """`layout` over the table's rows cut into `pieces` pieces each (piece p of row r is id r * pieces + p),
    every piece where its row is."""
    if pieces == 1:
        return layout
    within = np.arange(pieces, dtype=np.int64)
    return RowLayout(layout.kind, layout.num_rows * pieces, layout.world_size, layout.rank,
                     owner=np.repeat(layout.owner, pieces), local=(layout.local[:, None] * pieces + within).reshape(-1),
                     group_size=layout.group_size)


def home_level(branching: tuple[int, ...] | list[int], replicate_levels: int, subtrees_per_group: list[int],
               group_size: int) -> int | None:
    """Owner placement's routing level inside a group (hmtrain/data/loading/route.py): the first sharded level
    (0-based, `replicate_levels` or deeper) where every group holds at least one node per rank, so that each
    rank's `by_subtree` chunk of it is some nodes and, the counts dividing, its chunks of the levels below are
    their children. None: no routing (groups of one rank, whose rows are all their own; or no such level)."""
    if group_size == 1:
        return None
    nodes = 1
    for level, k in enumerate(branching):
        nodes *= k
        if level >= replicate_levels and min(subtrees_per_group) * (nodes // branching[0]) >= group_size:
            return level
    return None


def group_routing(branching: tuple[int, ...] | list[int], replicate_levels: int, owner_of_subtree: np.ndarray,
                  subtrees_per_group: list[int], world_size: int, group_size: int) -> tuple[np.ndarray | None, int]:
    """(the rank storing each node of the routing level, that level) for owner groups, `home_level` and
    `home_of_node` together; (None, 0) where groups do not route."""
    level = home_level(branching, replicate_levels, subtrees_per_group, group_size)
    if level is None:
        return None, 0
    return home_of_node(branching, level, owner_of_subtree, world_size, group_size), level


def home_of_node(branching: tuple[int, ...] | list[int], level: int, owner_of_subtree: np.ndarray,
                 world_size: int, group_size: int) -> np.ndarray:
    """[N_level] the rank storing each node of `level` under owner placement (`by_subtree`'s cut)."""
    nodes = int(np.prod(branching[:level + 1]))
    return by_subtree(nodes, branching[0], owner_of_subtree, world_size, 0, group_size).owner
