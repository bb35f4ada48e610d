"""Every layer's per-sequence memory blocks from the fetched rows in one gather, with a backward that
adds all their gradients into the rows' gradient buffer in one index_add_.

The fetched rows of a micro-batch lie in one unit pool [n_layers, slots, P, width] per group of the
memory kind's slots of one width (hmtrain/memory/kind.py, fetched.py; SwiGLU units: one pool): every
table's rows unit by unit, then the generic row's M units, then one zero unit.
A sequence's block in every layer and slot is M units of that pool, so one index of
(B + padding) * M unit numbers (`unit_index`) names every block of the micro-batch: sequence b's
units [level0 block | level1 block | ...], or the generic row's, or, for a padding row, the zero unit
M times (a memory that adds nothing). Forward: one index_select along the unit dim (per pool) gives
[n_layers, slots, B + padding, M, width]; each layer's slot is a view of it. Backward: the block
gradients of all layers are stacked and index-added, in fp32 whatever the blocks' dtype, into the
fp32 gradient pool of the same layout, in place: sums over sequences sharing a row (and the generic
row's over all its sequences) run in fp32, and a padding row's gradient lands in the zero unit's
slot, which nothing reads. So the kernels a micro-batch launches for its blocks do not depend on the
number of layers, tables or sequences: one forward, two or three backward (stack, cast, add), per pool.
The price: autograd calls the backward once every layer's block gradient is in, so those gradients
(the size of the blocks, which the forward holds anyway) stay alive until the first layer's backward,
and the stack copies them once more there.
"""
from __future__ import annotations

import torch
from torch import Tensor


class GatherBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor: Tensor, pools: list[Tensor], grad_pools: list[Tensor] | None, unit_index: Tensor,
                sequences: int, units: int) -> tuple[Tensor, ...]:
        # `anchor` is a leaf requiring grad (the first pool itself): it only makes autograd call backward.
        # `pools`: one [n_layers, slots, P, width] per group of the kind's slots of one width.
        # Returns n_layers * slots blocks [sequences, units, width], layer-major, each layer's slots in
        # row order: views of one gather per group
        n_layers = pools[0].shape[0]
        gathered = [pool.index_select(2, unit_index).view(n_layers, pool.shape[1], sequences, units, pool.shape[3])
                    for pool in pools]
        ctx.grad_pools, ctx.unit_index = grad_pools, unit_index
        ctx.slots = [pool.shape[1] for pool in pools]
        return tuple(blocks[i, s] for i in range(n_layers) for blocks in gathered for s in range(blocks.shape[1]))

    @staticmethod
    def backward(ctx, *grad_out: Tensor):
        if ctx.grad_pools is not None:
            per_layer, first = sum(ctx.slots), 0
            n_layers = len(grad_out) // per_layer
            for grad_pool, slots in zip(ctx.grad_pools, ctx.slots):
                mine = [grad_out[i * per_layer + first + s] for i in range(n_layers) for s in range(slots)]
                grads = torch.stack(mine).view(n_layers, slots, -1, grad_pool.shape[3]).to(grad_pool.dtype)
                grad_pool.index_add_(2, ctx.unit_index, grads)
                first += slots
        return None, None, None, None, None, None
