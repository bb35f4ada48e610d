"""Owner placement inside a group: which of the group's ranks runs each of its sequences.

A group's R ranks are data-parallel replicas over its sequences, and they shard its rows of the levels below
`parallel.replicate_levels` (hmtrain/memory/layout.py, `by_subtree`): a row a rank stores reads locally, any
other comes from the group's other ranks and its gradient goes back. So a sequence is sent to the rank storing
its rows (its *home*: the rank storing its node of one sharded level, whose children the same rank stores too)
as far as that rank has room.

Room is fixed first: rank j of the group runs exactly as many sequences as an even cut gives it (the first
n mod R ranks one more), whatever their homes, so micro-batch counts, padding and shapes are those of an
even cut. Each rank takes its own sequences in stream order up to its quota; the rest (the overflow), in node
order (stream order within a node), fill the ranks with room, the lowest rank first. Node order keeps one
node's overflow, and one rank's, on as few receivers as can take it, so a row moves to as few ranks as it
can (a receiver fetches each row once however many of its sequences use it). A pure function of the homes
and nodes in stream order: every rank computes the same assignment. Which rank runs a sequence changes no
result: the loss and every gradient are sums over the global batch.
"""
from __future__ import annotations

import numpy as np


def quotas(count: int, size: int) -> np.ndarray:
    """[R] sequences each rank of a group of `size` runs out of `count`: np.array_split's cut."""
    quota = np.full(size, count // size, dtype=np.int64)
    quota[:count % size] += 1
    return quota


def route_in_group(home: np.ndarray, node: np.ndarray, size: int) -> np.ndarray:
    """[n] the rank (0..size-1, in the group) running each of a group's n sequences, given, in stream order,
    each one's home rank in the group and its node of the routing level (see the module docstring)."""
    home, node = np.asarray(home, dtype=np.int64), np.asarray(node, dtype=np.int64)
    if home.size and (home.min() < 0 or home.max() >= size):
        raise ValueError(f"home ranks must be in [0, {size}), got {home.min()}..{home.max()}")
    quota = quotas(len(home), size)
    order = np.argsort(home, kind="stable")  # by home, stream order within one
    by_home = home[order]
    place = np.empty(len(home), dtype=np.int64)  # each sequence's place among its home's, in stream order
    place[order] = np.arange(len(home)) - np.searchsorted(by_home, by_home, side="left")
    kept = place < quota[home]
    rank = np.where(kept, home, -1)
    room = quota - np.bincount(home[kept], minlength=size)
    overflow = np.flatnonzero(~kept)
    overflow = overflow[np.argsort(node[overflow], kind="stable")]  # node order, stream order within a node
    rank[overflow] = np.repeat(np.arange(size), room)  # sum(room) == the overflow: the quotas add up to n
    return rank


def share_in_group(n: int, rank: int, size: int, node: np.ndarray | None = None,
                   home: np.ndarray | None = None) -> np.ndarray:
    """Positions (stream order) among a group's n sequences of those world rank `rank` runs, its group being
    ranks [rank // size * size, +size): with `home` (the world rank storing each node of the routing level) and
    `node` (each sequence's node of that level) routed as `route_in_group` routes them; without, np.array_split's
    even cut of the stream."""
    if home is None:
        return np.array_split(np.arange(n), size)[rank % size]
    return np.flatnonzero(route_in_group(home[node] - rank // size * size, node, size) == rank % size)
