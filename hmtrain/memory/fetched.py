"""What one micro-batch fetched from the bank, as the model reads it: per-layer memory blocks.

The fetched rows are copied once into one unit pool [n_layers, slots, P, width] in the bank's dtype
(hmtrain/memory/gather.py says its layout), beside one fp32 gradient pool of the same shape: a row's
gradient sums the blocks of every sequence that uses it (the generic row: about 1/(k+1) of the
batch), and a bf16 sum of that many terms loses the small ones. `rows` and `grads` show each table
as [n_layers, U, slots, m, width] (U unique rows: the set a distributed bank receives from owners;
slots and width are the memory kind's), views of the two pools. The first `layer(i)` gathers every
layer's blocks at once with `GatherBlocks`; its backward adds every block gradient straight into
the gradient pool: the gradient of all fetched rows costs one buffer of the fetched size, however
many layers and sequences share them, and a fixed number of kernels, however many layers there are.
"""
from __future__ import annotations

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
        # rows: table -> [n_layers, U, slots, m, width] (any strides); GENERIC -> [n_layers, 0 or 1, slots, M, width]
        self.parts = parts
        self.kind = kind
        self.n_layers = n_layers
        self.batch_size = batch_size  # sequences
        self.padding = padding  # padding rows after them (a micro-batch of fixed shape): zero blocks
        self.requires_grad = requires_grad
        self.micro_batch = micro_batch  # which micro-batch of the step plan this is (-1: not planned)
        self.returned = False
        first = next(iter(rows.values()))
        slots, width = first.shape[2], first.shape[4]
        sizes = {name: r.shape[1] * r.shape[3] for name, r in rows.items()}  # units each table brings
        pool_units = sum(sizes.values()) + 1  # + the zero unit
        self._pool = first.new_empty((n_layers, slots, pool_units, width))
        self._pool[:, :, -1].zero_()
        grad_pool = torch.zeros_like(self._pool, dtype=torch.float32) if requires_grad else None
        self.rows, self.grads = {}, {}
        start = 0
        for name in [p.table for p in parts] + ([GENERIC] if GENERIC in rows else []):
            shape = rows[name].shape
            as_rows = self._pool[:, :, start:start + sizes[name]].unflatten(2, (shape[1], shape[3]))
            as_rows.copy_(rows[name].permute(0, 2, 1, 3, 4))
            self.rows[name] = as_rows.permute(0, 2, 1, 3, 4)
            if requires_grad:
                self.grads[name] = grad_pool[:, :, start:start + sizes[name]].unflatten(
                    2, (shape[1], shape[3])).permute(0, 2, 1, 3, 4)
            start += sizes[name]
        self._grad_pool = grad_pool
        if units_on_device is None:  # read-only banks and lookups: computed here (the bank's fetch uploads it)
            host = unit_index(parts, index, {name: r.shape[1] for name, r in rows.items()}, batch_size)
            units_on_device = torch.from_numpy(host).to(first.device)
        if padding:
            units_on_device = torch.cat((units_on_device,
                                         units_on_device.new_full((padding * self.units,), pool_units - 1)))
        self._unit_index = units_on_device
        # the pool itself is the autograd input that makes backward reach GatherBlocks
        self._autograd_input = self._pool.detach().requires_grad_(requires_grad)
        self._blocks: tuple[Tensor, ...] | None = None

    @property
    def units(self) -> int:
        return sum(p.units for p in self.parts)

    def layer(self, i: int) -> tuple[Tensor, ...]:
        """Blocks of transformer layer i, as the kind hands them to the model (SwiGLU units:
        u_gate [B, M, d], u_up [B, M, d], u_down [B, d, M], a view), B = sequences + padding rows.

        Sequence b's units are [level0 block | level1 block | ...], or the generic row's; a padding
        row's are zeros. The first call gathers every layer's blocks (one kernel); later ones are views.
        """
        if self._blocks is None:
            self._blocks = GatherBlocks.apply(self._autograd_input, self._pool, self._grad_pool, self._unit_index,
                                              self.batch_size + self.padding, self.units)
        slots = len(self.kind.slots)
        return self.kind.layer_tensors(self._blocks[i * slots:(i + 1) * slots])
