"""ZeRO-1 for the replicated tables: every rank keeps every row, each updates only its own.

A replicated table (the top levels under `parallel.replicate_levels`, and the generic row) keeps its
stored rows on every rank, so each sequence reads its level-1 row locally. Its optimizer state does
not: fp32 moments, step counts and, for a bf16 bank, fp32 master rows live only on the rank whose
torch.chunk slice holds the row (hmtrain/memory/layout.py, `chunk_rows`), so per-rank state falls as
1/W until every rank holds at most one row of a table. A step (docs/design.md, "The bank in a
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


def owned_layout(num_rows: int, comm: Comm) -> RowLayout:
    """The rows of a replicated table whose optimizer state this rank holds: its torch.chunk slice, the
    layout checkpoints save, so moments and masters go to disk and back without a relayout."""
    return chunked(num_rows, comm.world_size, comm.rank)


def owned_rows(rows: Tensor, layout: RowLayout) -> Tensor:
    """The slice of a whole table (`rows`, every row) that `layout` says this rank owns: a view."""
    start, stop = chunk_rows(layout.num_rows, layout.world_size, layout.rank)
    return rows.narrow(0, start, stop - start)


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
    """Step 4: every rank's updated rows into every rank's `weight` (the whole stored table); `owned` is
    this rank's slice of it (`owned_rows`), whose rows `shares.mine` the update just wrote."""
    if comm.world_size == 1:
        return  # the update wrote the table itself
    mine = owned.index_select(0, torch.from_numpy(shares.mine).to(weight.device, non_blocking=True))
    rows = torch.from_numpy(shares.rows).to(weight.device, non_blocking=True)
    weight.index_copy_(0, rows, comm.all_gather(mine, shares.counts))
