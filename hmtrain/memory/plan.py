"""The step plan: which rows every micro-batch of an optimizer step fetches, and from whom.

Made once per step on the host, from the paths of all of the step's micro-batches
(numpy; nothing here touches the device). It fixes, before the first forward:

- per micro-batch and table, the unique rows to fetch and each sequence's slot in them;
- per table, the rows this rank accumulates gradients for during the step, so one
  fp32 buffer per table is sized by distinct rows, not by micro-batches;
- for rows owned by other ranks (``remote`` tables, gather placement), every
  all-to-all split of the step, agreed with the owners by one exchange of row ids,
  so fetching and returning gradients need no further size exchange or host sync.
  With `per_step`, a remote table's rows are the union over the step's micro-batches,
  fetched in one all-to-all and returned in one (each micro-batch's rows are slots in
  that union); otherwise every micro-batch has an all-to-all of its own each way.

Transports: ``replicated`` (every rank holds the table; gradients reduce-scattered to the
rows' owners at the end of the step, hmtrain/memory/zero.py), ``local`` (owner placement with groups of one
rank: the loader sent this rank only sequences whose rows it stores), ``remote`` (gather placement, and owner
placement with groups of several ranks: rows come from their owners and gradients go back to them; under owner
placement every owner is a rank of the requester's own group, checked here).

Under owner placement with groups of several ranks, everything a group's tables need happens inside the
group (`group_comm`, a Comm over its ranks alone): the remote tables' id exchange and all-to-alls, and the
union of touched rows of the levels each group keeps whole (``group`` layout, `replicated` transport). Only
world-replicated tables (the generic row; every table when there is one group) agree their rows over the
world. A group's collectives then cost what they cost at its size, whatever the number of groups.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hmtrain.memory.exchange import Comm
from hmtrain.memory.layout import RowLayout
from hmtrain.memory.sizes import GRAD_BYTES


@dataclass(frozen=True)
class TableSpec:
    name: str
    level: int | None  # tree level (0-based) whose node ids index the table; None for the generic row
    row_shape: tuple[int, ...]
    layout: RowLayout
    transport: str  # replicated | local | remote

    @property
    def row_numel(self) -> int:
        return int(np.prod(self.row_shape))

    @property
    def in_group(self) -> bool:
        """Whether the table's collectives run inside the owner group (see the module docstring)."""
        return self.layout.kind in ("group", "subtree")

    def stored_index(self, ids: np.ndarray) -> np.ndarray:
        """Where rows `ids` sit in this rank's storage of a replicated or local table."""
        return ids if self.layout.kind == "replicated" else self.layout.local[ids]


@dataclass
class Fetch:
    """One table in one micro-batch, as the requester sees it."""

    ids: np.ndarray  # global row ids, in the order the rows arrive (grouped by owner for remote tables)
    index: np.ndarray  # [B] each sequence's row in `ids`; len(ids) = the generic row
    slots: np.ndarray | None  # replicated/local: step-buffer slot of every id; per_step remote: its step row
    per_owner: np.ndarray | None  # remote: how many of `ids` each rank of the all-to-all's group owns


@dataclass
class Serve:
    """One remote table in one micro-batch, as an owner sees it: what the requesters asked for."""

    local_ids: np.ndarray  # local row indices, requester by requester in rank order, each in the order it expects
    counts: np.ndarray  # [group or world] how many of local_ids each rank of the all-to-all's group asked for
    slots: np.ndarray  # step-buffer slot of every one of local_ids


@dataclass
class Wire:
    """One micro-batch's all-to-all of remote rows, and of their gradients back: one flat buffer of
    `chunk`-value chunks each way (chunk: the gcd of the remote tables' row sizes), rank-major and
    table-minor, so each table's rows go in and out with one index op, whatever the world size."""

    chunk: int
    serve_splits: list[int]  # chunks of rows this rank sends each requester (and of gradients it gets back)
    fetch_splits: list[int]  # chunks of rows this rank receives from each owner (and of gradients it returns)
    serve_at: dict[str, np.ndarray]  # table -> chunk positions of Serve.local_ids' rows in the serving buffer
    fetch_at: dict[str, np.ndarray]  # table -> chunk positions of Fetch.ids' rows in the fetched buffer


@dataclass
class StepPlan:
    fetches: list[dict[str, Fetch]]  # per micro-batch: table -> Fetch
    serves: list[dict[str, Serve]]  # per micro-batch: remote table -> Serve
    wires: list[Wire | None]  # per micro-batch: the all-to-all layout of its remote tables (None: none)
    step_rows: dict[str, np.ndarray]  # table -> local row indices this rank accumulates this step
    batch_sizes: list[int]
    stats: dict[str, float] = field(default_factory=dict)
    # per_step plans: remote table -> the step's rows of other ranks (serves[0] and wires[0] move them)
    step_fetch: dict[str, Fetch] | None = None
    rows: dict[str, object] | None = None  # the bank's fetched step rows (per_step), while the step runs


def validate_paths(paths: np.ndarray, branching: tuple[int, ...]) -> None:
    """Every row a tree path: node ids in range and each node a child of the one above."""
    if paths.ndim != 2 or paths.shape[1] != len(branching):
        raise ValueError(f"paths must have shape [B, {len(branching)}] (one node per level), got {paths.shape}")
    nodes = 1
    for level, k in enumerate(branching):
        nodes *= k
        col = paths[:, level]
        bad = np.flatnonzero((col < 0) | (col >= nodes))
        if bad.size:
            b = int(bad[0])
            raise ValueError(f"paths[{b}, {level}] = {int(col[b])} is out of range for level {level} "
                             f"with {nodes} nodes")
        if level:
            bad = np.flatnonzero(col // k != paths[:, level - 1])
            if bad.size:
                b = int(bad[0])
                raise ValueError(f"paths[{b}] is not a tree path: node {int(col[b])} at level {level} has parent "
                                 f"{int(col[b]) // k}, but paths[{b}, {level - 1}] = {int(paths[b, level - 1])}")


def _order_by_owner(ids: np.ndarray, layout: RowLayout) -> np.ndarray:
    if layout.owner is None:
        return ids
    return ids[np.lexsort((layout.local[ids], layout.owner[ids]))]


def _check_group(spec: TableSpec, ids: np.ndarray, rank: int) -> None:
    """Owner placement with groups of several ranks: a rank fetches rows from its own group's ranks only."""
    size = spec.layout.group_size
    stranger = spec.layout.owner[ids] // size != rank // size
    if stranger.any():
        node = int(ids[stranger][0])
        raise RuntimeError(f"owner placement: rank {rank} (group {rank // size}) got a sequence on node {node} of "
                           f"{spec.name}, which group {int(spec.layout.owner[node]) // size} stores; the loader's "
                           "subtree assignment and the bank's disagree")


def _requests(spec: TableSpec, paths: np.ndarray, use_generic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows one micro-batch needs from a table, and each sequence's index into them."""
    batch = len(use_generic)
    if spec.level is None:  # the generic row: fetched once if any sequence uses it
        ids = np.zeros(1 if use_generic.any() else 0, dtype=np.int64)
        return ids, np.zeros(batch, dtype=np.int64)
    own = ~use_generic
    unique, inverse = np.unique(paths[own, spec.level], return_inverse=True)
    ids = _order_by_owner(unique, spec.layout)
    position = np.empty(len(unique), dtype=np.int64)
    position[np.searchsorted(unique, ids)] = np.arange(len(ids))
    index = np.full(batch, len(ids), dtype=np.int64)  # generic sequences: one past the rows
    index[own] = position[inverse.reshape(-1)]
    return ids, index


def make_plan(specs: list[TableSpec], micro_batches: list[tuple[np.ndarray, np.ndarray]], comm: Comm,
              branching: tuple[int, ...], element_size: int = 4, group_comm: Comm | None = None,
              per_step: bool = False) -> StepPlan:
    """Plan a step from its micro-batches' (paths [B, L] int64, use_generic [B] bool), host arrays.
    `element_size`: bytes per stored (fetched) value, for the traffic figures in `stats`. `group_comm`: this
    rank's owner group (owner placement; None: the world), where in-group tables' collectives run. `per_step`:
    remote rows move once per step (see the module docstring)."""
    rank = comm.rank
    group_comm = group_comm or comm
    remote_comm = group_comm if any(s.in_group for s in specs if s.transport == "remote") else comm
    first = rank - remote_comm.rank  # the world rank of the all-to-all group's first rank
    fetches: list[dict[str, Fetch]] = []
    for paths, use_generic in micro_batches:
        if len(paths):
            validate_paths(paths, branching)
        per_table = {}
        for spec in specs:
            ids, index = _requests(spec, paths, use_generic)
            per_owner = None
            if spec.in_group and spec.transport != "local":  # a group's rows only, or they would be wrong ones
                _check_group(spec, ids, rank)
            if spec.transport == "remote":
                per_owner = np.bincount(spec.layout.owner[ids] - first, minlength=remote_comm.world_size)
            elif spec.transport == "local" and ids.size and (spec.layout.owner[ids] != rank).any():
                node = int(ids[spec.layout.owner[ids] != rank][0])
                raise RuntimeError(f"owner placement: rank {rank} got a sequence on node {node} of {spec.name}, "
                                   f"which rank {int(spec.layout.owner[node])} stores; the loader's subtree "
                                   "assignment and the bank's disagree")
            per_table[spec.name] = Fetch(ids, index, None, per_owner)
        fetches.append(per_table)

    step_rows: dict[str, np.ndarray] = {}
    # replicated tables: the union over the ranks that store them, so every one of them updates the same rows
    replicated = [s for s in specs if s.transport == "replicated"]
    step_rows.update(_union_of_touched([s for s in replicated if not s.in_group], fetches, comm))
    step_rows.update(_union_of_touched([s for s in replicated if s.in_group], fetches, group_comm))
    for spec in (s for s in specs if s.transport == "local"):
        step_rows[spec.name] = np.unique(np.concatenate([spec.layout.local[f[spec.name].ids] for f in fetches]))
    for spec in specs:
        if spec.transport in ("replicated", "local"):
            for f in fetches:
                f[spec.name].slots = np.searchsorted(step_rows[spec.name], spec.stored_index(f[spec.name].ids))

    remote = [s for s in specs if s.transport == "remote"]
    step_fetch = _union_of_remote(remote, fetches, first, remote_comm.world_size) if per_step and remote else None
    serves, wires = _plan_remote(remote, [step_fetch] if step_fetch else fetches, remote_comm, step_rows)
    plan = StepPlan(fetches, serves, wires, step_rows, [len(p) for p, _ in micro_batches], step_fetch=step_fetch)
    plan.stats = _stats(specs, plan, remote_comm.rank, element_size)
    return plan


def _union_of_touched(tables: list[TableSpec], fetches: list[dict[str, Fetch]], comm: Comm) -> dict[str, np.ndarray]:
    """Replicated tables' rows (storage indices) that any rank of `comm` fetched this step: one all-reduce."""
    if not tables:
        return {}
    counts = comm.all_reduce_ints(np.concatenate([
        np.bincount(np.concatenate([s.stored_index(f[s.name].ids) for f in fetches] + [np.zeros(0, np.int64)]),
                    minlength=s.layout.num_local) for s in tables]))
    rows, offset = {}, 0
    for spec in tables:
        rows[spec.name] = np.flatnonzero(counts[offset:offset + spec.layout.num_local])
        offset += spec.layout.num_local
    return rows


def _union_of_remote(remote: list[TableSpec], fetches: list[dict[str, Fetch]], first: int,
                     world: int) -> dict[str, Fetch]:
    """A step's remote rows, each once, grouped by owner; each micro-batch's slots are its rows' places in them."""
    union = {}
    for spec in remote:
        rows = np.unique(np.concatenate([f[spec.name].ids for f in fetches] + [np.zeros(0, np.int64)]))
        ids = _order_by_owner(rows, spec.layout)
        slot = np.empty(len(ids), dtype=np.int64)
        slot[np.searchsorted(rows, ids)] = np.arange(len(ids))  # sorted position -> place in `ids`
        for f in fetches:
            f[spec.name].slots = slot[np.searchsorted(rows, f[spec.name].ids)]
        union[spec.name] = Fetch(ids, np.zeros(0, np.int64), None,
                                 np.bincount(spec.layout.owner[ids] - first, minlength=world))
    return union


def _plan_remote(remote: list[TableSpec], fetches: list[dict[str, Fetch]], comm: Comm,
                 step_rows: dict[str, np.ndarray]) -> tuple[list[dict[str, Serve]], list[Wire | None]]:
    """Tell every owner which of its rows each micro-batch needs (one exchange of local row ids per step),
    and lay out every micro-batch's all-to-all, over `comm` (the owner group, or the world). Vectorised over
    ranks: no Python loop runs per peer."""
    if not remote or not fetches:
        step_rows.update({s.name: np.zeros(0, np.int64) for s in remote})
        return [{} for _ in fetches], [None for _ in fetches]
    world, kinds = comm.world_size, len(fetches) * len(remote)  # kind j = micro-batch * tables + table
    first = remote[0].layout.rank - comm.rank  # owners' world ranks -> ranks of `comm`
    local, dest, kind = [], [], []
    for k, f in enumerate(fetches):
        for t, spec in enumerate(remote):
            ids = f[spec.name].ids
            local.append(spec.layout.local[ids])
            dest.append(spec.layout.owner[ids] - first)
            kind.append(np.full(len(ids), k * len(remote) + t, dtype=np.int64))
    key = np.concatenate(dest) * kinds + np.concatenate(kind)
    order = np.argsort(key, kind="stable")  # by owner, then kind; a kind's ids keep their order
    counts = np.bincount(key, minlength=world * kinds).reshape(world, kinds)
    received, got = comm.exchange_ints(np.concatenate(local)[order], counts)  # got: [source, kind]
    # regroup what arrived (source-major) kind by kind, sources in rank order within a kind
    segment = np.repeat(np.arange(world * kinds), got.reshape(-1))
    wanted = received[np.argsort((segment % kinds) * world + segment // kinds, kind="stable")]
    per_kind = got.T  # [kind, source]
    bounds = np.concatenate([[0], np.cumsum(per_kind.sum(1))])
    asked = [wanted[bounds[j]:bounds[j + 1]] for j in range(kinds)]
    serves: list[dict[str, Serve]] = [{} for _ in fetches]
    for t, spec in enumerate(remote):
        rows = np.unique(np.concatenate(asked[t::len(remote)]))
        step_rows[spec.name] = rows
        for k in range(len(fetches)):
            j = k * len(remote) + t
            serves[k][spec.name] = Serve(asked[j], per_kind[j], np.searchsorted(rows, asked[j]))
    chunk = int(np.gcd.reduce([s.row_numel for s in remote]))
    sizes = np.array([s.row_numel // chunk for s in remote], dtype=np.int64)
    wires = []
    for k, f in enumerate(fetches):
        serve_at, serve_splits = _chunk_positions(per_kind[k * len(remote):(k + 1) * len(remote)], sizes)
        fetch_at, fetch_splits = _chunk_positions(np.stack([f[s.name].per_owner for s in remote]), sizes)
        wires.append(Wire(chunk, serve_splits, fetch_splits, dict(zip((s.name for s in remote), serve_at)),
                          dict(zip((s.name for s in remote), fetch_at))))
    return serves, wires


def _chunk_positions(counts: np.ndarray, sizes: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """A buffer of chunks, rank-major and table-minor: `counts[t, r]` rows of table t for rank r, each row
    `sizes[t]` chunks. Returns per table the positions of its rows' chunks (rank by rank, row by row), so
    one index_copy / index_select per table fills or reads the buffer, and the chunks per rank."""
    tables, world = counts.shape
    chunks = counts * sizes[:, None]
    by_rank = chunks.T.reshape(-1)  # [rank, table]
    starts = (np.cumsum(by_rank) - by_rank).reshape(world, tables).T  # [table, rank]
    positions = []
    for t in range(tables):
        n = counts[t]
        rank = np.repeat(np.arange(world), n)
        within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        first = starts[t][rank] + within * sizes[t]
        positions.append((first[:, None] + np.arange(sizes[t])).reshape(-1))
    return positions, chunks.sum(0).tolist()


def _stats(specs: list[TableSpec], plan: StepPlan, rank: int, element_size: int) -> dict[str, float]:
    """Rows and bytes per table for the step's metrics, as this rank (`rank`: in the all-to-all's group) sees
    them. Rows come from other ranks in the bank's dtype (`element_size` bytes a value) and their gradients go
    back in fp32, so for an fp32 bank the bytes returned equal those fetched, for a bf16 bank twice them."""
    stats: dict[str, float] = {}
    for spec in specs:
        fetched = sum(len(f[spec.name].ids) for f in plan.fetches)
        remote = 0
        if spec.transport == "remote":
            moved = [plan.step_fetch[spec.name]] if plan.step_fetch else [f[spec.name] for f in plan.fetches]
            remote = sum(int(f.per_owner.sum() - f.per_owner[rank]) for f in moved)
        stats[f"{spec.name}/rows_fetched"] = float(fetched)
        stats[f"{spec.name}/rows_remote"] = float(remote)
        stats[f"{spec.name}/bytes_fetched"] = float(remote * spec.row_numel * element_size)
        stats[f"{spec.name}/bytes_returned"] = float(remote * spec.row_numel * GRAD_BYTES)
        stats[f"{spec.name}/rows_updated"] = float(len(plan.step_rows.get(spec.name, ())))
    return stats
