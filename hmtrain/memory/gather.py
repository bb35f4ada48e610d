"""Every layer's per-sequence memory blocks from the fetched rows in one gather, with a backward that
adds all their gradients into the rows' gradient buffer in one index_add_.

The fetched rows of a micro-batch lie in one unit pool [n_layers, slots, P, width]
(hmtrain/memory/fetched.py): every table's rows unit by unit, then the generic row's M units, then
one zero unit. A sequence's block in every layer and slot is M units of that pool, so one index of
(B + padding) * M unit numbers (`unit_index`) names every block of the micro-batch: sequence b's
units [level0 block | level1 block | ...], or the generic row's, or, for a padding row, the zero unit
M times (a memory that adds nothing). Forward: one index_select along the unit dim gives
[n_layers, slots, B + padding, M, width]; each layer's slot is a view of it. Backward: the block
gradients of all layers are stacked and index-added, in fp32 whatever the blocks' dtype, into the
fp32 gradient pool of the same layout, in place: sums over sequences sharing a row (and the generic
row's over all its sequences) run in fp32, and a padding row's gradient lands in the zero unit's
slot, which nothing reads. So the kernels a micro-batch launches for its blocks do not depend on the
number of layers, tables or sequences: one forward, two or three backward (stack, cast, add).
The price: autograd calls the backward once every layer's block gradient is in, so those gradients
(the size of the blocks, which the forward holds anyway) stay alive until the first layer's backward,
and the stack copies them once more there.
"""
from __future__ import annotations

import torch
from torch import Tensor


class GatherBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor: Tensor, pool: Tensor, grad_pool: Tensor | None, unit_index: Tensor,
                sequences: int, units: int) -> tuple[Tensor, ...]:
        # `anchor` is a leaf requiring grad (the pool itself): it only makes autograd call backward.
        # Returns n_layers * slots blocks [sequences, units, width], layer-major: views of one gather
        n_layers, slots, _, width = pool.shape
        blocks = pool.index_select(2, unit_index).view(n_layers * slots, sequences, units, width)
        ctx.grad_pool, ctx.unit_index = grad_pool, unit_index
        return tuple(blocks.unbind(0))

    @staticmethod
    def backward(ctx, *grad_out: Tensor):
        if ctx.grad_pool is not None:
            n_layers, slots, _, width = ctx.grad_pool.shape
            grads = torch.stack(grad_out).view(n_layers, slots, -1, width).to(ctx.grad_pool.dtype)
            ctx.grad_pool.index_add_(2, ctx.unit_index, grads)
        return None, None, None, None, None, None
