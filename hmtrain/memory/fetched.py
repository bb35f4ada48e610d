"""What one micro-batch fetched from the bank, as the model reads it: per-layer memory blocks.

The fetched rows are copied once into one unit pool [n_layers, slots, P, width] per group of the memory
kind's slots of one width (SwiGLU units: one) in the bank's dtype (hmtrain/memory/gather.py says its
layout), beside one fp32 gradient pool of the same shape: a row's
gradient sums the blocks of every sequence that uses it (the generic row: about 1/(k+1) of the
batch), and a bf16 sum of that many terms loses the small ones. `rows` and `grads` show each table
as [n_layers, U, *row shape[1:]] (U unique rows: the set a distributed bank receives from owners; the
row shape is the memory kind's), views of the pools for a kind of one group. The first `layer(i)` gathers every
layer's blocks at once with `GatherBlocks`; its backward adds every block gradient straight into
the gradient pool: the gradient of all fetched rows costs one buffer of the fetched size, however
many layers and sequences share them, and a fixed number of kernels, however many layers there are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hmtrain.memory.gather import GatherBlocks
from hmtrain.memory.kind import MemoryKind

GENERIC = "generic"


@dataclass(frozen=True)
class Part:
    """One tree level's share of a sequence's memory: table name, units, first unit in [level0 | level1 | ...]."""

    table: str
    units: int
    offset: int


def unit_index(parts: list[Part], index: dict[str, np.ndarray], rows_per_table: dict[str, int],
               batch: int) -> np.ndarray:
    """[batch * M] pool unit of every unit of every sequence's block (hmtrain/memory/gather.py), host numpy.
    `index[table]` is each sequence's row in the table's fetched rows, or that count for the generic row;
    the pool holds the tables' rows in `parts` order, then the generic row (if fetched), then a zero unit."""
    units = sum(p.units for p in parts)
    out = np.empty((batch, units), dtype=np.int64)
    start = 0
    for p in parts:
        out[:, p.offset:p.offset + p.units] = start + index[p.table][:, None] * p.units + np.arange(p.units)
        start += rows_per_table[p.table] * p.units
    generic = np.zeros(batch, dtype=bool)
    for p in parts:
        generic |= index[p.table] >= rows_per_table[p.table]
    out[generic] = start + np.arange(units)  # the generic row's units follow the tables'
    return out.reshape(-1)


class FetchedMemory:
    def __init__(self, rows: dict[str, Tensor], index: dict[str, np.ndarray], parts: list[Part], kind: MemoryKind, *,
                 n_layers: int, batch_size: int, requires_grad: bool, micro_batch: int = -1, padding: int = 0,
                 units_on_device: Tensor | None = None):
        # rows: table -> [n_layers, U, *kind.row_shape(n_layers, m)[1:]] (any strides, last dims contiguous);
        # GENERIC -> [n_layers, 0 or 1, ...] of M units
        self.parts = parts
        self.kind = kind
        self.n_layers = n_layers
        self.batch_size = batch_size  # sequences
        self.padding = padding  # padding rows after them (a micro-batch of fixed shape): zero blocks
        self.requires_grad = requires_grad
        self.micro_batch = micro_batch  # which micro-batch of the step plan this is (-1: not planned)
        self.returned = False
        first = next(iter(rows.values()))
        self._order = [p.table for p in parts] + ([GENERIC] if GENERIC in rows else [])
        per_unit = kind.params_per_unit
        self._shape = {name: (r.shape[1], math.prod(r.shape[2:]) // per_unit) for name, r in rows.items()}  # U, m
        self._start, start = {}, 0
        for name in self._order:
            self._start[name] = start
            start += self._shape[name][0] * self._shape[name][1]
        pool_units = start + 1  # + the zero unit
        self._pools = [first.new_empty((n_layers, slots, pool_units, width)) for _, slots, width in kind.groups]
        for pool in self._pools:
            pool[:, :, -1].zero_()
        self._grad_pools = [torch.zeros_like(pool, dtype=torch.float32) for pool in self._pools] \
            if requires_grad else None
        for name in self._order:
            for pool_view, row_view in zip(self._table_views(self._pools, name), self._row_views(rows[name], name)):
                pool_view.copy_(row_view)
        if units_on_device is None:  # read-only banks and lookups: computed here (the bank's fetch uploads it)
            host = unit_index(parts, index, {name: u for name, (u, _) in self._shape.items()}, batch_size)
            units_on_device = torch.from_numpy(host).to(first.device)
        if padding:
            units_on_device = torch.cat((units_on_device,
                                         units_on_device.new_full((padding * self.units,), pool_units - 1)))
        self._unit_index = units_on_device
        # the first pool itself is the autograd input that makes backward reach GatherBlocks
        self._autograd_input = self._pools[0].detach().requires_grad_(requires_grad)
        self._blocks: tuple[Tensor, ...] | None = None

    def _row_views(self, rows: Tensor, name: str) -> list[Tensor]:
        """Each slot group of a table's rows [n_layers, U, ...] as [n_layers, U, slots, m, width]."""
        units, start, views = self._shape[name][1], 0, []
        flat = rows.reshape(self.n_layers, self._shape[name][0], units * self.kind.params_per_unit)
        for _, slots, width in self.kind.groups:
            views.append(flat[:, :, start:start + slots * units * width].unflatten(2, (slots, units, width)))
            start += slots * units * width
        return views

    def _table_views(self, pools: list[Tensor], name: str) -> list[Tensor]:
        """Each pool's units of one table as [n_layers, U, slots, m, width] (views)."""
        (count, units), start = self._shape[name], self._start[name]
        return [pool[:, :, start:start + count * units].unflatten(2, (count, units)).permute(0, 2, 1, 3, 4)
                for pool in pools]

    def _as_rows(self, pools: list[Tensor]) -> dict[str, Tensor]:
        """Every table as [n_layers, U, *row shape[1:]]: views of one pool, or a copy for a kind of several."""
        out = {}
        for name in self._order:
            views = self._table_views(pools, name)
            out[name] = views[0] if len(views) == 1 else torch.cat([v.flatten(2) for v in views], dim=2)
        return out

    @property
    def rows(self) -> dict[str, Tensor]:
        """Each table's fetched rows, [n_layers, U, *row shape[1:]] (U unique rows, in the bank's dtype)."""
        return self._as_rows(self._pools)

    @property
    def grads(self) -> dict[str, Tensor]:
        """Each table's fp32 row gradients, the rows' layout; for a kind of one slot width views of the
        gradient pool that backward writes in place, for the others a copy made when asked (after backward)."""
        return self._as_rows(self._grad_pools) if self._grad_pools is not None else {}

    @property
    def units(self) -> int:
        return sum(p.units for p in self.parts)

    def layer(self, i: int):
        """Blocks of transformer layer i, as the kind hands them to the model (SwiGLU units:
        u_gate [B, M, d], u_up [B, M, d], u_down [B, d, M], a view), B = sequences + padding rows.

        Sequence b's units are [level0 block | level1 block | ...], or the generic row's; a padding
        row's are zeros. The first call gathers every layer's blocks (one kernel per slot group); later
        ones are views.
        """
        if self._blocks is None:
            self._blocks = GatherBlocks.apply(self._autograd_input, self._pools, self._grad_pools, self._unit_index,
                                              self.batch_size + self.padding, self.units)
        slots = len(self.kind.slots)
        return self.kind.layer_tensors(self._blocks[i * slots:(i + 1) * slots])
