"""`hmtrain bench bank_host`: the bank's host work per step as the world grows, on one process.

    hmtrain bench bank_host [--ranks 8 64 512] [--steps 5] [--layers 4 --d 64 --units 64 16 4 --batch 16]

Rank 0 of a world of W ranks runs the real bank code (plan_step, fetch, return_grads, finish_grads,
step; gather placement, every level sharded by row, the generic row replicated) over a fake
zero-latency communicator (`FakeComm`): collectives return at once, every other rank asking rank 0 for
what rank 0 asks of it. So the table shows only the host's own work, which is what must not grow with
W (docs/design.md: "Host work per micro-batch is O(tables), not O(world size)"). Per step and per
micro-batch it counts the tensor ops the bank dispatches (a dispatch mode, so load on the machine does
not change them) and the index uploads: host arrays handed to torch (`torch.from_numpy`), each one
host-to-device copy on a GPU. Host ms is the median over steps after the first, with min and max.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hmtrain.memory import MemoryBank
from hmtrain.memory.exchange import Comm
from hmtrain.memory.kind import SwiGLUUnits


class FakeComm(Comm):
    """Rank `rank` of `world` ranks with collectives that cost nothing: every peer is this rank's mirror."""

    def __init__(self, world: int, rank: int = 0):
        super().__init__()
        self.world_size, self.rank = world, rank

    def all_to_all(self, send, send_splits, recv_splits, async_op=False):
        recv = send.new_zeros((sum(recv_splits), *send.shape[1:]))
        return (recv, None) if async_op else recv

    def exchange_ints(self, send, counts):
        return np.asarray(send, dtype=np.int64), np.asarray(counts, dtype=np.int64)

    def all_reduce_(self, tensor, op=None):
        return tensor

    def all_reduce_ints(self, values, op=None):
        return np.asarray(values, dtype=np.int64)

    def reduce_scatter(self, send, splits, async_op=False):
        start = sum(splits[:self.rank])
        return send[start:start + splits[self.rank]].clone(), None

    def all_gather(self, send, splits):
        out = send.new_zeros((sum(splits), *send.shape[1:]))
        start = sum(splits[:self.rank])
        out[start:start + splits[self.rank]] = send
        return out


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is on, by name."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting_uploads():
    """Counts torch.from_numpy calls (each host index array the bank hands to torch) while on."""
    real, count = torch.from_numpy, [0]

    def counted(array):
        count[0] += 1
        return real(array)

    torch.from_numpy = counted
    try:
        yield count
    finally:
        torch.from_numpy = real


def make_bank(world: int, layers: int, d: int, units: list[int]) -> MemoryBank:
    return MemoryBank(n_layers=layers, kind=SwiGLUUnits(d_model=d), branching=[16] * len(units), units=units,
                      generic=True, comm=FakeComm(world), placement="gather")


def micro_batches(bank: MemoryBank, step: int, count: int, batch: int):
    rng = np.random.default_rng(step)
    levels = len(bank.branching)
    out = []
    for _ in range(count):
        leaves = rng.integers(0, bank.nodes[-1], size=batch)
        paths = np.stack([leaves // 16 ** (levels - 1 - lvl) for lvl in range(levels)], axis=1)
        out.append((paths, rng.random(batch) < 1 / 17))
    return out


def bank_step(bank: MemoryBank, batches) -> None:
    """One step of the bank's host work as the trainer drives it, without the model."""
    plan = bank.plan_step(batches)
    for k in range(len(batches)):
        fetched = bank.fetch(plan, k)
        bank.return_grads(fetched)
    bank.reduce_grads()
    bank.finish_grads()
    bank.step(1e-3)


def measure(world: int, steps: int, layers: int, d: int, units: list[int], batch: int,
            micro: int = 2) -> dict:
    bank = make_bank(world, layers, d, units)
    times = []
    for step in range(steps):
        batches = micro_batches(bank, step, micro, batch)
        start = time.perf_counter()
        bank_step(bank, batches)
        times.append(time.perf_counter() - start)
    counter = OpCounter()
    with counting_uploads() as uploads, counter:
        bank_step(bank, micro_batches(bank, steps, micro, batch))
    later = times[1:] or times
    return {"ranks": world, "tables": len(bank.specs), "ms": 1e3 * statistics.median(later),
            "ms_min": 1e3 * min(later), "ms_max": 1e3 * max(later), "ops": sum(counter.ops.values()),
            "uploads": uploads[0], "micro": micro, "op_names": counter.ops}


def render(results: list[dict]) -> str:
    lines = ["| ranks | tables | host ms/step (median [min, max]) | tensor ops/step | ops/micro-batch/table "
             "| index uploads/step |", "|---:|---:|---|---:|---:|---:|"]
    for r in results:
        per = r["ops"] / r["micro"] / r["tables"]
        lines.append(f"| {r['ranks']} | {r['tables']} | {r['ms']:.1f} [{r['ms_min']:.1f}, {r['ms_max']:.1f}] "
                     f"| {r['ops']:,} | {per:.1f} | {r['uploads']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hmtrain bench bank_host", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--units", type=int, nargs="+", default=[64, 16, 4])
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    results = [measure(w, args.steps, args.layers, args.d, args.units, args.batch) for w in args.ranks]
    print(f"layers {args.layers}, d {args.d}, units {args.units}, tree 16^{len(args.units)}, "
          f"2 micro-batches x {args.batch} sequences, rank 0 of W, fake zero-latency collectives")
    print(render(results))


if __name__ == "__main__":
    main()
