"""What one micro-batch fetched from the bank, as the model reads it: per-layer memory blocks.

The rows of a table are held layer-major, [n_layers, U, 3, m, d] (U unique rows: the set a
distributed bank receives from owners). Every layer gets its own autograd leaf, the
contiguous slice `rows[i]`, whose `.grad` is preset to the matching slice of one gradient
buffer of the same shape: backward accumulates each layer's gradient in place into its own
slice, so the gradient of all fetched rows costs one buffer of the fetched size, not one
per layer (slicing one leaf per layer would give every layer a gradient the size of all).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

GENERIC = "generic"


@dataclass(frozen=True)
class Part:
    """One tree level's share of a sequence's memory: table name, units, first unit in [level0 | level1 | ...]."""

    table: str
    units: int
    offset: int


class FetchedMemory:
    def __init__(self, rows: dict[str, Tensor], index: dict[str, Tensor], parts: list[Part], *, n_layers: int,
                 batch_size: int, requires_grad: bool, micro_batch: int = -1):
        self.rows = rows  # table -> [n_layers, U, 3, m, d]; GENERIC -> [n_layers, 0 or 1, 3, M, d]
        self.index = index  # table -> [B] row of each sequence; == U selects the generic row
        self.parts = parts
        self.n_layers = n_layers
        self.batch_size = batch_size
        self.requires_grad = requires_grad
        self.micro_batch = micro_batch  # which micro-batch of the step plan this is (-1: not planned)
        self.returned = False
        self.grads: dict[str, Tensor] = {}
        self._leaves: dict[str, list[Tensor]] = {}
        for name, buffer in rows.items():
            if requires_grad:
                self.grads[name] = torch.zeros_like(buffer)
            leaves = []
            for i in range(n_layers):
                leaf = buffer[i].detach().requires_grad_(requires_grad)
                if requires_grad:
                    leaf.grad = self.grads[name][i]  # backward adds into this slice in place
                leaves.append(leaf)
            self._leaves[name] = leaves

    @property
    def units(self) -> int:
        return sum(p.units for p in self.parts)

    def layer(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Blocks of transformer layer i: u_gate [B, M, d], u_up [B, M, d], u_down [B, d, M] (a view).

        Sequence b's units are [level0 block | level1 block | ...], or the generic row's.
        """
        generic = self._leaves.get(GENERIC)
        use_generic_row = generic is not None and generic[i].shape[0] > 0
        blocks = []
        for part in self.parts:
            sources = []
            own = self._leaves.get(part.table)
            if own is not None and own[i].shape[0] > 0:
                sources.append(own[i])  # [U, 3, m, d]
            if use_generic_row:
                sources.append(generic[i][:, :, part.offset:part.offset + part.units])
            if not sources:  # an empty micro-batch (owner placement can give a rank none)
                d = next(iter(self.rows.values())).shape[-1]
                sources.append(next(iter(self.rows.values())).new_zeros((0, 3, part.units, d)))
            src = sources[0] if len(sources) == 1 else torch.cat(sources, dim=0)
            blocks.append(src.index_select(0, self.index[part.table]))  # [B, 3, m, d]
        mem = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)  # [B, 3, M, d]
        return mem[:, 0], mem[:, 1], mem[:, 2].transpose(1, 2)
