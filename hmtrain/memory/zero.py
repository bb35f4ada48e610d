"""ZeRO-1 for the replicated tables: every rank keeps every row, each updates only its own.

A replicated table (the top levels under `parallel.replicate_levels`, and the generic row) keeps its
stored rows on every rank, so each sequence reads its level-1 row locally. Its optimizer state does
not: fp32 moments, step counts and, for a bf16 bank, fp32 master rows live only on the rank whose
torch.chunk slice holds the row (hmtrain/memory/layout.py, `chunk_rows`), so per-rank state falls as
1/W; a table with fewer rows than ranks (the one generic row, level 1 on many ranks) is cut into equal
pieces of rows first (`Sharding`), so that too falls as 1/W. A step (docs/design.md, "The bank in a
distributed job"):

1. every rank adds its micro-batches' gradients into one fp32 buffer of the step's touched rows (the
   union over ranks, agreed while planning, hmtrain/memory/plan.py), sorted by row id, so each
   owner's rows are consecutive in it;
2. after the last backward one reduce-scatter per table, issued async, leaves each rank the summed
   gradients of its own touched rows (`Comm.reduce_scatter`), waited on before the gradient norm;
3. each rank runs sparse AdamW on its own touched rows (its masters and moments, its rows' slice of
   the stored table);
4. one all-gather per table sends the updated rows, in the stored dtype, to every rank.

Only touched rows move, not whole tables: every rank knows them from the plan, they are already the
gradient buffer's rows, and at the paper's batch sizes the top level's rows are all touched anyway, so
the two cost the same there and touched rows are cheaper for a deeper replicated level.
Against an all-reduce of fp32 gradients, the same traffic for an fp32 bank and 3/4 of it for a bf16 one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hmtrain.memory.exchange import Comm
from hmtrain.memory.layout import RowLayout, chunk_rows, chunked


def piece_ids(rows: np.ndarray, pieces: int) -> np.ndarray:
    """The pieces of `rows` (sorted row ids), in order: row r's are r * pieces .. r * pieces + pieces - 1."""
    if pieces == 1:
        return rows
    return (rows[:, None] * pieces + np.arange(pieces, dtype=np.int64)).reshape(-1)


def owned_layout(num_rows: int, comm: Comm) -> RowLayout:
    """The rows (or pieces of rows, `Sharding`) of a replicated table whose optimizer state this rank holds
    among `comm`'s ranks: its torch.chunk slice of them. For a world-replicated table of whole rows that is
    the layout checkpoints save, so its state goes to disk and back without a relayout."""
    return chunked(num_rows, comm.world_size, comm.rank)


def owned_rows(rows: Tensor, layout: RowLayout) -> Tensor:
    """The slice of a whole table (`rows`, every row) that `layout` says this rank owns: a view."""
    start, stop = chunk_rows(layout.num_rows, layout.world_size, layout.rank)
    return rows.narrow(0, start, stop - start)


@dataclass(frozen=True)
class Sharding:
    """How one replicated table's optimizer state is cut over `comm`, the ranks that store the table (the
    world, or its owner group): its stored rows are cut into `pieces` equal pieces each (hmtrain/memory/
    layout.py, `pieces_per_row`: 1 while there are at least as many rows as ranks), and each rank holds the
    masters, moments and step counts of its torch.chunk slice of the pieces, so per-rank state falls as 1/R
    however few rows the table has. The weight is saved from row slices (`rows`), as a checkpoint holds it."""

    comm: Comm
    pieces: int  # S
    piece_shape: tuple[int, ...]  # the row's shape when S = 1, else (row_numel / S,)
    owned: RowLayout  # the stored pieces (ids r * S + p over the stored rows) whose state this rank holds
    rows: RowLayout  # the stored rows whose weight this rank saves and loads
    world_state: RowLayout  # `owned` over the world's ranks, in global piece ids (for checkpoint relayouts)
    world_rows: RowLayout  # `rows` over the world's ranks, in global row ids

    def owned_part(self, table: Tensor) -> Tensor:
        """This rank's pieces of `table` (a table as stored, or its masters when they are whole): a view."""
        return owned_rows(table.view(-1, *self.piece_shape), self.owned)

    def row_share(self, table: Tensor) -> Tensor:
        """The stored rows whose weight this rank saves: a view."""
        return owned_rows(table, self.rows)

    def shares(self, rows: np.ndarray) -> Shares:
        """A step's touched rows (sorted storage indices) as the pieces each rank updates."""
        return split_by_owner(piece_ids(rows, self.pieces), self.owned)


def sharding(layout: RowLayout, row_shape: tuple[int, ...], comm: Comm, world_state: RowLayout,
             world_rows: RowLayout, pieces: int) -> Sharding:
    """A replicated table's Sharding: `layout` its stored rows on this rank, `comm` the ranks storing them,
    `world_rows` its row cut over the world; `world_state` that cut of `pieces` pieces per row."""
    numel = int(np.prod(row_shape))
    piece_shape = tuple(row_shape) if pieces == 1 else (numel // pieces,)
    return Sharding(comm, pieces, piece_shape, owned_layout(layout.num_local * pieces, comm),
                    owned_layout(layout.num_local, comm), world_state, world_rows)


@dataclass(frozen=True)
class Shares:
    """One replicated table's touched rows in one step, split by the rank that updates them."""

    rows: np.ndarray  # global row ids, sorted: the gradient buffer's rows, the same on every rank
    counts: list[int]  # per rank, how many of `rows` it owns: consecutive runs of `rows`, in rank order
    mine: np.ndarray  # this rank's run of `rows`, as indices into its owned slice


def split_by_owner(rows: np.ndarray, layout: RowLayout) -> Shares:
    """`rows` (sorted global ids) cut into the runs each rank of chunk `layout` owns."""
    counts = np.bincount(layout.owner[rows], minlength=layout.world_size)
    start, _ = chunk_rows(layout.num_rows, layout.world_size, layout.rank)
    first = int(counts[:layout.rank].sum())
    return Shares(rows, counts.tolist(), rows[first:first + int(counts[layout.rank])] - start)


@torch.no_grad()
def gather_updated(comm: Comm, weight: Tensor, owned: Tensor, shares: Shares) -> None:
    """Step 4: every rank's updated rows (or pieces) into every rank's `weight` (the whole stored table, viewed
    as pieces); `owned` is this rank's slice of it (`owned_rows`), whose pieces `shares.mine` the update wrote."""
    if comm.world_size == 1:
        return  # the update wrote the table itself
    mine = owned.index_select(0, torch.from_numpy(shares.mine).to(weight.device, non_blocking=True))
    rows = torch.from_numpy(shares.rows).to(weight.device, non_blocking=True)
    weight.index_copy_(0, rows, comm.all_gather(mine, shares.counts))
