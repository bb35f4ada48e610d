"""The step loader: one rank's micro-batches for each optimizer step, cut from one global stream.

The stream is fixed by (split, seed, subtrees): stream position P holds the sequence
`StreamOrder.ids(P, P + 1)`, a uniform shuffle of the split per epoch (order.py), so a batch is a
sample of the whole split and level-1 nodes appear in proportion to their sequence counts (every
sequence holds seq_len tokens but each leaf's last: token-weighted). A step takes the next
`global_batch` positions; the loader's state is the position after the step, {epoch, position}.
It names no rank, world size, micro-batch or worker count, so a run resumes on any of those at
exactly the same place, and the ranks' parts of a step always add up to the same global batch.

Placement of a step's ids on ranks:
  gather (owner_of_subtree None): the ids, in stream order, are cut into world_size * micro_batches
      equal chunks; micro-batch k of rank r is chunk k * world_size + r.
  owner (owner_of_subtree[level-1 node] = group; group g is ranks g*R .. g*R + R - 1, R = group_size,
      hmtrain/parallel/placement.py): a group keeps the ids of the subtrees it owns, in stream order, in R
      near-equal parts, one per rank of the group (data-parallel replicas; R = 1: the rank owning the subtree
      takes them all). With `home_of_node` (the rank storing each node of level `home_level`, the bank's
      layout) each rank's part holds the sequences whose rows it stores as far as its even share allows, the
      rest going to ranks with room (route.py); without, the parts are consecutive runs of the stream. Either
      way a rank's part keeps stream order and its size is the even cut's. Each rank splits its part into
      near-equal chunks, each padded to the micro-batch size
      global_batch / (world_size * micro_batches) with padding rows (batch.py `pad_batch`: they train
      nothing and fetch no memory). The number of chunks is what the busiest rank of the step needs,
      ceil(max over ranks of its ids / micro-batch size), the same on every rank (every rank sees the
      whole step's ids), and at least micro_batches in a full step. So every micro-batch of a run has
      one shape, which compiled code (FlexAttention, `dynamic=False`) needs to compile once, and the
      ranks run the same number of micro-batches, in lockstep.

Every step is a pure function of its number (`_Steps`), so with num_workers > 0 DataLoader worker
processes build the micro-batches, each reading only this rank's sequences of its own steps, and
the result is identical to num_workers = 0.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from hmtrain.config import split_global_batch
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.format.sequences import Sequences
from hmtrain.data.loading.batch import pad_batch
from hmtrain.data.loading.order import StreamOrder
from hmtrain.data.loading.route import share_in_group

_IDENTITY = ("split", "seed", "shuffle", "subtrees", "fingerprint", "sequences")


def _identity(item):
    return item


class _Steps(Dataset):
    """Item k: (this rank's micro-batches of the k-th step after stream position `start`, state after it)."""

    def __init__(self, sequences: Sequences, order: StreamOrder, *, start: int, stop: int | None, global_batch: int,
                 micro_batches: int, rank: int, world_size: int, owner: np.ndarray | None, group_size: int,
                 identity: dict, home: np.ndarray | None = None, home_level: int = 0):
        self.sequences, self.order = sequences, order
        self.start, self.stop = start, stop
        self.global_batch, self.micro_batches = global_batch, micro_batches
        self.micro_batch_size = global_batch // (world_size * micro_batches)
        self.rank, self.world_size, self.owner, self.group_size = rank, world_size, owner, group_size
        self.identity = identity
        self.home, self.home_level = home, home_level  # owner placement: the rank storing each level's node

    def num_steps(self) -> int:
        assert self.stop is not None
        return -(-(self.stop - self.start) // self.global_batch)

    def _mine(self, ids: np.ndarray) -> list[np.ndarray]:
        if self.owner is None:
            chunks = np.array_split(ids, self.world_size * self.micro_batches)
            return [chunks[k * self.world_size + self.rank] for k in range(self.micro_batches)]
        size = self.group_size
        groups = self.owner[self.sequences.level1(ids)]
        busiest = -(-int(np.bincount(groups, minlength=self.world_size // size).max()) // size)  # ids, one rank
        group = ids[groups == self.rank // size]
        # routed: each rank first its own rows' sequences (route.py), in stream order
        node = None if self.home is None else self.sequences.paths(group)[:, self.home_level]
        mine = group[share_in_group(len(group), self.rank, size, node, self.home)]
        return np.array_split(mine, -(-busiest // self.micro_batch_size))

    def __getitem__(self, k: int) -> tuple[list[dict[str, Tensor]], dict]:
        lo = self.start + k * self.global_batch
        hi = lo + self.global_batch if self.stop is None else min(lo + self.global_batch, self.stop)
        micro = [self.sequences.batch(chunk) for chunk in self._mine(self.order.ids(lo, hi))]
        if self.owner is not None:
            micro = [pad_batch(batch, self.micro_batch_size, self.sequences.pad_id) for batch in micro]
        epoch, position = divmod(hi, self.order.size)
        return micro, {"epoch": epoch, "position": position, **self.identity}


class StepLoader:
    """Yields (this rank's micro-batches for one optimizer step, loader state right after that step).

    The loader holds its position: `__iter__` continues from it and advances it as steps are
    yielded; `state_dict` / `load_state_dict` save and restore it. Iterate one iterator at a time.
    shuffle=False visits ids in order; infinite=False stops at the end of the current epoch (its
    last step may be short).
    """

    def __init__(self, data: PreparedData, split: str, *, global_batch: int, micro_batches: int, seed: int,
                 rank: int = 0, world_size: int = 1, subtrees: Sequence[int] | None = None,
                 owner_of_subtree: Sequence[int] | None = None, group_size: int = 1,
                 home_of_node: Sequence[int] | None = None, home_level: int = 0, num_workers: int = 0,
                 shuffle: bool = True, infinite: bool = True):
        self.sequences = data.sequences(split)
        k1 = self.sequences.num_level1
        if global_batch < 1 or micro_batches < 1:
            raise ValueError(f"global_batch ({global_batch}) and micro_batches ({micro_batches}) must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.owner = None
        split_global_batch(global_batch, world_size, micro_batches=micro_batches, name="global_batch")
        if not isinstance(group_size, int) or group_size < 1 or world_size % group_size:
            raise ValueError(f"group_size must be an int dividing world_size {world_size}, got {group_size!r}")
        if owner_of_subtree is not None:
            self.owner = np.asarray(owner_of_subtree, dtype=np.int64).reshape(-1)
            groups = world_size // group_size
            if self.owner.size != k1 or self.owner.min() < 0 or self.owner.max() >= groups:
                raise ValueError(f"owner_of_subtree must give each of the {k1} level-1 nodes a group in "
                                 f"[0, {groups}), got {list(owner_of_subtree)}")
        self.home = None if home_of_node is None else self._check_home(home_of_node, home_level, group_size)
        self.home_level = home_level
        if subtrees is not None:
            subtrees = [int(s) for s in subtrees]
            if not subtrees or len(set(subtrees)) != len(subtrees) or min(subtrees) < 0 or max(subtrees) >= k1:
                raise ValueError(f"subtrees must be distinct level-1 nodes in [0, {k1}), got {subtrees}")
        ranges = self.sequences.subtree_ranges(subtrees) if subtrees is not None else [(0, len(self.sequences))]
        if sum(stop - start for start, stop in ranges) == 0:
            where = f"level-1 subtrees {subtrees}" if subtrees is not None else f"split {split!r}"
            raise ValueError(f"{data.root}: {where} holds no sequences")
        self.order = StreamOrder(ranges, seed=seed, shuffle=shuffle)
        self.split, self.seed, self.shuffle, self.infinite = split, seed, shuffle, infinite
        self.global_batch, self.micro_batches = global_batch, micro_batches
        self.rank, self.world_size, self.num_workers, self.group_size = rank, world_size, num_workers, group_size
        self.identity = {"split": split, "seed": seed, "shuffle": shuffle, "sequences": self.order.size,
                         "subtrees": subtrees, "fingerprint": self.sequences.fingerprint}
        self._position = 0  # global stream position of the next step

    def _check_home(self, home_of_node: Sequence[int], level: int, group_size: int) -> np.ndarray:
        """The rank storing each node of level `level`: one of its level-1 ancestor's group's ranks."""
        if self.owner is None:
            raise ValueError("home_of_node needs owner_of_subtree (owner placement)")
        home = np.asarray(home_of_node, dtype=np.int64).reshape(-1)
        k1 = self.sequences.num_level1
        levels = self.sequences.levels
        if not 0 <= level < levels or home.size % k1 or home.size < k1:
            raise ValueError(f"home_of_node must give a rank for each node of level home_level {level} (of "
                             f"{levels}): a multiple of {k1} nodes, got {home.size}")
        deepest = int(self.sequences.arrays["paths"][:, level].max(initial=-1))  # one pass, at start
        if deepest >= home.size:
            raise ValueError(f"home_of_node has {home.size} nodes of level {level}, but a sequence is on node "
                             f"{deepest}")
        ancestor = np.arange(home.size) // (home.size // k1)
        if (home // group_size != self.owner[ancestor]).any():
            node = int(np.flatnonzero(home // group_size != self.owner[ancestor])[0])
            raise ValueError(f"home_of_node[{node}] = {int(home[node])} is not a rank of the group owning its "
                             f"level-1 node {int(ancestor[node])} (group {int(self.owner[ancestor[node]])})")
        return home

    @property
    def sequences_per_epoch(self) -> int:
        return self.order.size

    def _steps(self, start: int) -> _Steps:
        stop = None if self.infinite else (start // self.order.size + 1) * self.order.size
        return _Steps(self.sequences, self.order, start=start, stop=stop, global_batch=self.global_batch,
                      micro_batches=self.micro_batches, rank=self.rank, world_size=self.world_size,
                      owner=self.owner, group_size=self.group_size, identity=self.identity, home=self.home,
                      home_level=self.home_level)

    def __iter__(self) -> Iterator[tuple[list[dict[str, Tensor]], dict]]:
        steps = self._steps(self._position)
        indices = itertools.count() if self.infinite else range(steps.num_steps())
        if self.num_workers == 0:
            items = (steps[k] for k in indices)
        else:
            items = iter(DataLoader(steps, batch_size=None, sampler=indices, num_workers=self.num_workers,
                                    collate_fn=_identity))
        for micro, state in items:
            self._position = state["epoch"] * self.order.size + state["position"]
            yield micro, state

    def state_dict(self) -> dict:
        epoch, position = divmod(self._position, self.order.size)
        return {"epoch": epoch, "position": position, **self.identity}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"loader state must be a dict, got {type(state).__name__}")
        missing = [key for key in ("epoch", "position", *_IDENTITY) if key not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing}: not a StepLoader state? keys: {sorted(state)}")
        for key in _IDENTITY:
            if state[key] != self.identity[key]:
                what = {"fingerprint": "shard list fingerprint", "sequences": "sequence count"}.get(key, key)
                raise ValueError(f"loader state is from a different stream: {what} was {state[key]!r}, "
                                 f"this loader has {self.identity[key]!r}")
        epoch, position = state["epoch"], state["position"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, position)) or epoch < 0 \
                or not 0 <= position < self.order.size:
            raise ValueError(f"loader state position out of range: epoch {epoch!r}, position {position!r} "
                             f"(an epoch has {self.order.size} sequences)")
        self._position = epoch * self.order.size + position


def sequential_batches(data: PreparedData, split: str, batch_size: int) -> Iterator[dict[str, Tensor]]:
    """The split's sequences once, in id order, `batch_size` at a time (the last batch may be short)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sequences = data.sequences(split)
    if len(sequences) == 0:
        raise ValueError(f"{data.root}: split {split!r} holds no sequences")
    for start in range(0, len(sequences), batch_size):
        yield sequences.batch(np.arange(start, min(start + batch_size, len(sequences))))
