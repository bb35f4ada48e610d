"""Per-sequence memory blocks of one layer from the fetched unique rows, with a backward that
adds straight into the rows' gradient buffer.

Forward: for every tree level (a `Part`) each sequence's block is its row (or the generic row's
slice) of that level; the blocks are written side by side into one [B, M, width] tensor per slot
of the memory kind (hmtrain/memory/kind.py; SwiGLU units: u_gate, u_up, u_down^T).
Padding rows after the sequences (a micro-batch of fixed shape) get zero blocks, a memory that adds
nothing. Backward: each sequence's block gradient is index-added into the preallocated fp32 gradient buffer
of the layer's rows (`grads[i]` of hmtrain/memory/fetched.py), in place; the sums over sequences
sharing a row (and the generic row's over all its sequences) run in fp32 whatever the blocks'
dtype. No zero-filled gradient of the fetched rows, no per-layer copy and no AccumulateGrad are
allocated: the only gradients the backward creates are the [B, M, d] block gradients that the
FFN's matmuls produce anyway (and their fp32 copies, one level and slot at a time).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Source:
    """Where one level's blocks come from in one layer."""

    offset: int  # first unit of this level in [level0 | level1 | ...]
    units: int
    rows: Tensor | None  # [U, slots, m, width] this layer's rows (None if no sequence uses its own)
    grads: Tensor | None  # [U, slots, m, width] slice of the gradient buffer for those rows
    own_seq: Tensor  # [B_own] sequences that use their own row
    own_row: Tensor  # [B_own] which row each of them uses
    generic_seq: Tensor  # [B_gen] sequences that use the generic row


class GatherBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor: Tensor, sources: list[Source], generic_rows: Tensor | None,
                generic_grads: Tensor | None, batch: int, padding: int, slots: int) -> tuple[Tensor, ...]:
        # `anchor` is the fetched buffer (a leaf requiring grad): it only makes autograd call backward.
        # `padding` rows follow the `batch` sequences: zero blocks, whose gradients are dropped
        units = sum(s.units for s in sources)
        width = anchor.shape[-1]
        out = [anchor.new_empty((batch + padding, units, width)) for _ in range(slots)]
        for block in out:
            block[batch:].zero_()
        for s in sources:
            for slot in range(slots):
                target = out[slot][:, s.offset:s.offset + s.units]
                if s.rows is not None and s.own_seq.numel():
                    target.index_copy_(0, s.own_seq, s.rows[:, slot].index_select(0, s.own_row))
                if s.generic_seq.numel():
                    g = generic_rows[0, slot, s.offset:s.offset + s.units]
                    target.index_copy_(0, s.generic_seq, g.expand(s.generic_seq.numel(), -1, -1))
        ctx.sources, ctx.generic_grads = sources, generic_grads
        return tuple(out)

    @staticmethod
    def backward(ctx, *grad_out: Tensor):
        for s in ctx.sources:
            for slot, grad in enumerate(grad_out):
                if grad is None:
                    continue
                block = grad[:, s.offset:s.offset + s.units]
                if s.grads is not None and s.own_seq.numel():
                    s.grads[:, slot].index_add_(0, s.own_row, block.index_select(0, s.own_seq).to(s.grads.dtype))
                if s.generic_seq.numel():
                    summed = block.index_select(0, s.generic_seq).sum(0, dtype=ctx.generic_grads.dtype)
                    ctx.generic_grads[0, slot, s.offset:s.offset + s.units] += summed
        return None, None, None, None, None, None, None
