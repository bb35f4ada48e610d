"""What one micro-batch fetched from the bank, as the model reads it: per-layer memory blocks.

The rows of a table are held layer-major, [n_layers, U, slots, m, width] (U unique rows: the set
a distributed bank receives from owners; slots and width are the memory kind's), in the bank's
dtype, beside one fp32 gradient buffer of the same shape: a row's gradient sums the blocks of every
sequence that uses it (the generic row: about 1/(k+1) of the batch), and a bf16 sum of that many
terms loses the small ones. `layer(i)` builds the sequences' blocks of layer i with `GatherBlocks`,
one per slot, and hands them over as the kind's layer tensors; its backward adds each block
gradient straight into that buffer's layer-i slice: the gradient of all fetched rows costs one
buffer of the fetched size, however many layers and sequences share them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hmtrain.memory.gather import GatherBlocks, Source
from hmtrain.memory.kind import MemoryKind

GENERIC = "generic"


@dataclass(frozen=True)
class Part:
    """One tree level's share of a sequence's memory: table name, units, first unit in [level0 | level1 | ...]."""

    table: str
    units: int
    offset: int


class FetchedMemory:
    def __init__(self, rows: dict[str, Tensor], index: dict[str, np.ndarray], parts: list[Part], kind: MemoryKind, *,
                 n_layers: int, batch_size: int, requires_grad: bool, micro_batch: int = -1, padding: int = 0):
        self.rows = rows  # table -> [n_layers, U, slots, m, width]; GENERIC -> [n_layers, 0 or 1, slots, M, width]
        self.parts = parts
        self.kind = kind
        self.n_layers = n_layers
        self.batch_size = batch_size  # sequences
        self.padding = padding  # padding rows after them (a micro-batch of fixed shape): zero blocks
        self.requires_grad = requires_grad
        self.micro_batch = micro_batch  # which micro-batch of the step plan this is (-1: not planned)
        self.returned = False
        self.grads: dict[str, Tensor] = ({name: torch.zeros_like(r, dtype=torch.float32) for name, r in rows.items()}
                                         if requires_grad else {})
        device = next(iter(rows.values())).device
        # the buffer itself is the autograd input that makes backward reach GatherBlocks
        self._autograd_input = next(iter(rows.values())).detach().requires_grad_(requires_grad)
        self._routes = {}
        for part in parts:
            idx = np.asarray(index[part.table], dtype=np.int64)
            num_rows = rows[part.table].shape[1]
            own = np.flatnonzero(idx < num_rows)
            self._routes[part.table] = tuple(torch.from_numpy(a).to(device, non_blocking=True) for a in
                                             (own, idx[own], np.flatnonzero(idx >= num_rows)))

    @property
    def units(self) -> int:
        return sum(p.units for p in self.parts)

    def layer(self, i: int) -> tuple[Tensor, ...]:
        """Blocks of transformer layer i, as the kind hands them to the model (SwiGLU units:
        u_gate [B, M, d], u_up [B, M, d], u_down [B, d, M], a view), B = sequences + padding rows.

        Sequence b's units are [level0 block | level1 block | ...], or the generic row's; a padding
        row's are zeros.
        """
        sources = []
        for part in self.parts:
            rows = self.rows[part.table][i]
            own_seq, own_row, generic_seq = self._routes[part.table]
            sources.append(Source(part.offset, part.units, rows if rows.shape[0] else None,
                                  self.grads[part.table][i] if self.requires_grad else None,
                                  own_seq, own_row, generic_seq))
        generic = self.rows.get(GENERIC)
        generic_rows = generic[i] if generic is not None and generic.shape[1] else None
        generic_grads = self.grads[GENERIC][i] if generic_rows is not None and self.requires_grad else None
        blocks = GatherBlocks.apply(self._autograd_input, sources, generic_rows, generic_grads, self.batch_size,
                                    self.padding, len(self.kind.slots))
        return self.kind.layer_tensors(blocks)
