"""`hmtrain bench bank_traffic`: the bank's all-to-all bytes per step, measured on gloo ranks, against the
figure `hmtrain info` predicts for them (hmtrain/memory/sizes.py, `rank_footprint`).

    hmtrain bench bank_traffic [--ranks 4 8] [--steps 40] [--placements gather owner] [--fetch step micro_batch]

Each row runs the real bank (`MemoryBank`: plan, fetch, gradient return, sparse AdamW) under torchrun on
every rank of a job, bank alone (the gradients are those of a fixed linear loss: the bytes do not depend
on them), with leaves drawn uniformly per step as `info` assumes. Measured: what each rank's all-to-alls
send and receive (rows in the bank's dtype, their gradients in fp32; a rank's part for itself crosses no
network and is left out), averaged over ranks and steps. The tree has more level-1 nodes than the smallest
world and fewer than the largest, so owner placement runs both in groups of one rank and in groups of
several. No level is replicated and there is no generic row: those move by ZeRO-1's collectives, which
`info` counts in closed form. Bytes, not times: the result does not depend on the machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BRANCHING, UNITS, LAYERS, D = (6, 4, 4), (8, 4, 2), 2, 16
GLOBAL_BATCH, MICRO_BATCH = 96, 4


def _groups(world: int, placement: str):
    from hmtrain.parallel.placement import assign_groups

    return assign_groups([1] * BRANCHING[0], world) if placement == "owner" else None


def _my_paths(step: int, rank: int, world: int, groups) -> np.ndarray:
    """This rank's share of step `step`'s uniformly drawn leaves, as the loader routes them."""
    leaves = np.random.default_rng(step).integers(0, int(np.prod(BRANCHING)), size=GLOBAL_BATCH)
    paths = np.stack([leaves // (BRANCHING[1] * BRANCHING[2]), leaves // BRANCHING[2], leaves], axis=1)
    if groups is None:
        per = GLOBAL_BATCH // world
        return paths[rank * per:(rank + 1) * per]
    from hmtrain.data.loading.route import share_in_group
    from hmtrain.memory.layout import group_routing

    size = groups.group_size
    mine = np.flatnonzero(groups.group_of_subtree[paths[:, 0]] == rank // size)
    # the loader's routing inside the group (trainer: hmtrain/train/build.py)
    home, level = group_routing(BRANCHING, 0, groups.group_of_subtree, groups.subtrees_per_group, world, size)
    return paths[mine[share_in_group(len(mine), rank, size, paths[mine, level], home)]]


def _wire_bytes(plan, first: int, rank: int, value_bytes: int) -> int:
    """Bytes this rank's all-to-alls of a planned step send and receive across the network."""
    total = 0
    for wire in plan.wires:
        if wire is None:
            continue
        for peer, (served, fetched) in enumerate(zip(wire.serve_splits, wire.fetch_splits)):
            if first + peer != rank:  # rows (bank dtype) one way, their fp32 gradients the other, both directions
                total += (served + fetched) * wire.chunk * (value_bytes + 4)
    return total


def worker(placement: str, fetch: str, steps: int, out: str) -> None:
    import torch.distributed as dist

    from hmtrain.memory import Comm, MemoryBank, SparseAdamW
    from hmtrain.memory.kind import SwiGLUUnits

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = _groups(world, placement)
    bank = MemoryBank(n_layers=LAYERS, kind=SwiGLUUnits(d_model=D), branching=BRANCHING, units=UNITS, generic=False,
                      optimizer=SparseAdamW(lr=1e-3), comm=Comm(), placement=placement,
                      owner_of_subtree=None if groups is None else groups.group_of_subtree,
                      group_size=1 if groups is None else groups.group_size, fetch_per_step=fetch == "step")
    first = rank - bank.group_comm.rank
    moved = []
    for step in range(steps):
        paths = _my_paths(step, rank, world, groups)
        # as many micro-batches on every rank as the busiest needs (the trainer pads them likewise)
        busiest = max(len(_my_paths(step, r, world, groups)) for r in range(world))
        chunks = np.array_split(np.arange(len(paths)), max(1, -(-busiest // MICRO_BATCH)))
        plan = bank.plan_step([(paths[c], None) for c in chunks])
        moved.append(_wire_bytes(plan, first, rank, 4))
        for k, c in enumerate(chunks):
            fetched = bank.fetch(plan, k)
            if len(c):
                sum(t.sum() for i in range(LAYERS) for t in fetched.layer(i)).backward()
            bank.return_grads(fetched)
        bank.finish_grads()
        bank.step(lr=1e-3)
    totals = [None] * world
    dist.all_gather_object(totals, float(np.mean(moved)))
    if rank == 0:
        Path(out).write_text(json.dumps(totals))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def predicted(world: int, placement: str, fetch: str) -> float:
    from hmtrain.memory.sizes import rank_footprint

    groups = _groups(world, "owner")
    f = rank_footprint(n_layers=LAYERS, params_per_unit=3 * D, branching=BRANCHING, units=UNITS, world_size=world,
                       replicate_levels=0, generic=False, weight_bytes=4, micro_batch=MICRO_BATCH,
                       global_batch=GLOBAL_BATCH, group_size=groups.group_size, placement=placement,
                       fetch_per_step=fetch == "step",
                       subtrees_per_group=groups.subtrees_per_group)
    return f.moved_gather if placement == "gather" else f.moved_owner


def measure(world: int, placement: str, fetch: str, steps: int, tmp: Path) -> list[float]:
    out = tmp / f"{placement}-{fetch}-{world}.json"
    cmd = ["timeout", "900", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(world), "-m", "hmtrain.bench.bank_traffic", "--worker", placement, fetch, str(steps), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HMTRAIN_LOG_LEVEL": "WARNING"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bank_traffic: {world} ranks failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hmtrain bench bank_traffic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--placements", nargs="+", choices=["gather", "owner"], default=["gather", "owner"])
    parser.add_argument("--fetch", nargs="+", choices=["step", "micro_batch"], default=["step", "micro_batch"])
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        placement, fetch, steps, out = args.worker
        worker(placement, fetch, int(steps), out)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bank all-to-all bytes per rank per step, tree {BRANCHING}, units {UNITS}, global batch "
                        f"{GLOBAL_BATCH}, micro-batches of {MICRO_BATCH}, {args.steps} steps, fp32")
    for name in ("ranks", "placement", "groups x ranks", "fetch", "measured KiB (min-max over ranks)",
                 "info KiB", "measured / info"):
        table.add_column(name, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.ranks:
            for placement in args.placements:
                groups = _groups(world, "owner")
                shape = f"{groups.num_groups} x {groups.group_size}" if placement == "owner" else "-"
                for fetch in args.fetch:
                    per_rank = measure(world, placement, fetch, args.steps, Path(tmp))
                    mean, expect = float(np.mean(per_rank)), predicted(world, placement, fetch)
                    table.add_row(str(world), placement, shape, fetch,
                                  f"{mean / 1024:.1f} ({min(per_rank) / 1024:.1f}-{max(per_rank) / 1024:.1f})",
                                  f"{expect / 1024:.1f}", f"{mean / expect:.3f}" if expect else "-")
    Console().print(table)


if __name__ == "__main__":
    main()
