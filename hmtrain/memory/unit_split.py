"""Tensor parallelism's cut of a bank: every row's units split N ways, as the FFN's hidden units are.

A memory unit is an extra FFN hidden unit (docs/design.md, "The memory, exactly"), so under
`parallel.tensor_parallel` = N each tensor-parallel rank holds, fetches, updates and checkpoints units
[r*m/N, (r+1)*m/N) of every row's m (the generic row's M too), beside its slice of the anchor's gate/up/down.
The rank's bank is a bank over m/N units whose rows are sharded over its data-parallel group as without
tensor parallelism (`MemoryBank.comm` is that group's); the ranks of a tensor-parallel group plan the same
rows (they read the same batch), so their fetches and updates line up without talking to each other. Two
things cross the tensor-parallel group: the gradient norm's sum (each rank holds a disjoint slice), and
nothing else; the memory FFN's partial output rides the anchor FFN's row-parallel all-reduce
(hmtrain/parallel/tensor_parallel.py).

A row [n_layers, slots, m, width] (a kind of one slot width: `ffn`) is split along its unit axis; a row
starts as the one-process row's slice (drawn whole from its seed, then cut), so the split bank is exactly
the one-process bank cut N ways. Checkpoints save each table as a DTensor on the (dp, tp) mesh, rows
`Shard(0)` over dp and units `Shard(3)` over tp: the global tensor is the one-process table, so DCP
reshards it to any degree, and checkpoints saved without tensor parallelism load as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

from hmtrain.memory.exchange import Comm

UNIT_AXIS = 2  # of a row [n_layers, slots, units, width]; a table [rows, *row] has it at 3


@dataclass(frozen=True)
class UnitSplit:
    rank: int  # this rank's place in its tensor-parallel group
    size: int  # N, the tensor-parallel degree
    comm: Comm  # the tensor-parallel group: the bank's gradient norm is summed over it
    mesh: DeviceMesh  # (dp, tp): what checkpoints' 2-D DTensors live on (dp: the bank's own ranks)

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"a unit split needs 0 <= rank < size, got rank {self.rank} of {self.size}")

    def units(self, units: int) -> int:
        """This rank's units of a row of `units`."""
        if units % self.size:
            raise ValueError(f"{units} units do not split over {self.size} tensor-parallel ranks")
        return units // self.size

    def local(self, row: Tensor) -> Tensor:
        """This rank's slice of a whole row [n_layers, slots, units, width] (a view)."""
        share = self.units(row.shape[UNIT_AXIS])
        return row.narrow(UNIT_AXIS, self.rank * share, share)
