"""Benchmark: bytes that the backward pass allocates for the fetched memory, per fetched byte.

    python -m hmtrain.bench.bank_backward [--layers 35 --d 512 --units 256 64 16 --batch 16]

Runs the memory part of the FFN (per-sequence blocks of every layer) forward and backward and counts,
with a dispatch mode, the bytes of every tensor the backward pass allocates (plus, for the bank, the
gradient buffer it allocates at fetch). Rows:

- `per-sequence leaves`: the blocks [B, M, d] of every layer are themselves leaves; what this row
  allocates (activation and block gradients of the FFN's matmuls) every variant pays, so it is the
  baseline subtracted from the others;
- `one leaf, sliced per layer` (the old bank): the fetched rows are one autograd leaf and each layer
  slices `rows[:, i]`, so every layer's backward materialises a gradient the size of all layers;
- `bank (GatherBlocks)` (hmtrain.memory.fetched): block gradients are index-added into one gradient
  buffer of the fetched size.

`beyond / fetched` = (backward bytes - baseline) / fetched bytes: the gradient memory that getting the
rows' gradients costs, per fetched byte (target: at most 2).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hmtrain.memory import MemoryBank
from hmtrain.memory.kind import SwiGLUUnits


class AllocationCounter(TorchDispatchMode):
    """Sums the storage bytes of op outputs that are new tensors (not views of an input)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes += t.untyped_storage().nbytes()
        return out


def memory_loss(layers, x: torch.Tensor) -> torch.Tensor:
    loss = x.new_zeros(())
    for gate, up, down in layers:
        h = F.silu(torch.bmm(x, gate.transpose(1, 2))) * torch.bmm(x, up.transpose(1, 2))
        loss = loss + torch.bmm(h, down.transpose(1, 2)).sum()
    return loss


def sliced_leaf_layers(fetched, plan, n_layers: int):
    """The old bank's layout: one leaf [U, n_layers, 3, m, d] per table, sliced per layer."""
    leaves = {name: rows.transpose(0, 1).contiguous().requires_grad_() for name, rows in fetched.rows.items()}
    index = {p.table: torch.from_numpy(plan.fetches[0][p.table].index) for p in fetched.parts}
    layers = []
    for i in range(n_layers):
        blocks = [leaves[p.table][:, i].index_select(0, index[p.table]) for p in fetched.parts]
        mem = torch.cat(blocks, dim=2)
        layers.append((mem[:, 0], mem[:, 1], mem[:, 2].transpose(1, 2)))
    return layers


def measure(args) -> list[tuple[str, float, float]]:
    branching = [16] * len(args.units)
    bank = MemoryBank(n_layers=args.layers, kind=SwiGLUUnits(d_model=args.d), branching=branching, units=args.units,
                      generic=False, init_std=0.02)
    rng = np.random.default_rng(0)
    leaves = rng.integers(0, int(np.prod(branching)), size=args.batch)
    paths = np.stack([leaves // 16 ** (len(branching) - 1 - lvl) for lvl in range(len(branching))], axis=1)
    x = torch.randn(args.batch, args.tokens, args.d)
    rows = []
    for name in ("per-sequence leaves", "one leaf, sliced per layer", "bank (GatherBlocks)"):
        plan = bank.plan_step([(paths, None)])
        fetched = bank.fetch(plan, 0)
        fetched_bytes = sum(r.numel() * r.element_size() for r in fetched.rows.values())
        extra = 0
        if name.startswith("per-sequence"):
            layers = [tuple(t.detach().clone().requires_grad_() for t in fetched.layer(i)) for i in range(args.layers)]
        elif name.startswith("one leaf"):
            layers = sliced_leaf_layers(fetched, plan, args.layers)
        else:
            layers = [fetched.layer(i) for i in range(args.layers)]
            extra = sum(g.numel() * g.element_size() for g in fetched.grads.values())
        loss = memory_loss(layers, x)
        counter = AllocationCounter()
        with counter:
            loss.backward()
        bank.abandon_step()
        rows.append((name, fetched_bytes, counter.bytes + extra))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hmtrain bench bank_backward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--units", type=int, nargs="+", default=[64, 16, 4])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args(argv)
    rows = measure(args)
    print(f"layers {args.layers}, d {args.d}, units {args.units}, batch {args.batch} sequences x {args.tokens} tokens")
    baseline = rows[0][2]
    print(f"| {'fetched rows as':<28} | fetched MiB | backward MiB | beyond baseline MiB | beyond / fetched |")
    print(f"|{'-' * 30}|-------------|--------------|---------------------|------------------|")
    for name, fetched, backward in rows:
        beyond = backward - baseline
        print(f"| {name:<28} | {fetched / 2**20:11.2f} | {backward / 2**20:12.2f} | {beyond / 2**20:19.2f} "
              f"| {beyond / fetched:16.2f} |")


if __name__ == "__main__":
    main()
