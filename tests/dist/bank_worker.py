"""torchrun worker: train a bank alone for a few steps on a fixed global batch, save it with DCP.

Usage: bank_worker.py OUT --placement gather|owner --replicate N --steps S [--resume DIR] [--generic]
                     [--dtype fp32|bf16] [--background] [--dump DIR] [--fetch-per-step] [--even]
(HMTRAIN_TEST_BRANCHING picks the tree; 4,3,2 when unset.)
Every rank takes its part of each global batch (gather: equal chunks; owner: the sequences of the
subtrees it owns, routed inside a group to the rank storing their rows as the loader routes them, or with
`--even` cut evenly in stream order as before that routing), so the union over ranks is the same whatever
the world size, and the saved bank must match the one-process run's. `--background` saves with
dcp.async_save on a gloo group of its own (as `train.async_checkpoint` does) and trains one more step while
the write runs: the checkpoint still holds the bank as it was when the save began. `--dump DIR` writes each
rank's live state (every field of every table, as this rank holds it) to DIR/rank<r>.pt after the save, and
the ranks its plans exchanged rows with and the rows and bytes they moved to DIR/traffic<r>.json.
"""
import argparse
import datetime
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from hmtrain.data.loading.route import share_in_group
from hmtrain.memory import Comm, MemoryBank, SparseAdamW
from hmtrain.memory.kind import SwiGLUUnits
from hmtrain.memory.layout import group_routing
from hmtrain.parallel.placement import Groups, assign_groups

# HMTRAIN_TEST_BRANCHING="2,6,2": a tree with 2 level-1 subtrees, so 4 ranks form 2 owner groups of 2
BRANCHING = tuple(int(k) for k in os.environ.get("HMTRAIN_TEST_BRANCHING", "4,3,2").split(","))
UNITS, LAYERS, D = (3, 2, 2), 2, 4
GLOBAL_BATCH, MICRO = 12, 2
LEAVES = int(np.prod(BRANCHING))
TOKENS = [5, 1, 3, 2][:BRANCHING[0]]  # the subtrees' token counts owner placement balances
TIMEOUT = datetime.timedelta(seconds=60)  # a hung collective fails the worker, not the suite
TRAFFIC: dict = {"peers": set()}  # what this rank's plans moved, written beside the --dump


def global_batch(step: int, branching: tuple[int, ...] = BRANCHING) -> tuple[np.ndarray, np.ndarray]:
    """Leaves drawn per step, fixed by the step alone; returns (sequence ids, paths)."""
    rng = np.random.default_rng(step)
    leaves = rng.integers(0, int(np.prod(branching)), size=GLOBAL_BATCH)
    paths = np.stack([leaves // (branching[1] * branching[2]), leaves // branching[2], leaves], axis=1)
    return np.arange(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH), paths


def routing(groups: Groups | None, replicate: int, world: int, even: bool,
            branching: tuple[int, ...] = BRANCHING) -> tuple[int, np.ndarray] | None:
    """Owner groups' routing (level, the rank storing each of its nodes), as the trainer gives the loader."""
    if groups is None or even:
        return None
    home, level = group_routing(branching, replicate, groups.group_of_subtree, groups.subtrees_per_group, world,
                                groups.group_size)
    return None if home is None else (level, home)


def my_share(ids, paths, rank, world, groups, route=None):
    if groups is None:
        per = GLOBAL_BATCH // world
        return ids[rank * per:(rank + 1) * per], paths[rank * per:(rank + 1) * per]
    size = groups.group_size  # the group's sequences, cut among its ranks as the loader cuts them
    mine = np.flatnonzero(groups.group_of_subtree[paths[:, 0]] == rank // size)
    level, home = route or (0, None)
    mine = mine[share_in_group(len(mine), rank, size, paths[mine, level], home)]
    return ids[mine], paths[mine]


def loss_for(fetched, ids: np.ndarray) -> torch.Tensor:
    """A memory FFN on inputs keyed by global sequence id, summed over sequences."""
    loss = torch.zeros(())
    for layer in range(LAYERS):
        gate, up, down = (t.float() for t in fetched.layer(layer))  # a bf16 bank's blocks computed in fp32
        x = torch.stack([torch.randn(3, D, generator=torch.Generator().manual_seed(int(i) * 10 + layer))
                         for i in ids]) if len(ids) else torch.zeros(0, 3, D)
        y = (F.silu(x @ gate.transpose(1, 2)) * (x @ up.transpose(1, 2))) @ down.transpose(1, 2)
        loss = loss + (y * x).sum() + 0.1 * (gate * up).sum()
    return loss


ROUTE: list = [None]  # main's routing() for this run


def train_step(bank: MemoryBank, step: int, world: int, owner, generic: bool) -> None:
    ids, paths = my_share(*global_batch(step), bank.comm.rank, world, owner, ROUTE[0])
    use_generic = (ids % 5 == 0) if generic else np.zeros(len(ids), dtype=bool)
    chunks = np.array_split(np.arange(len(ids)), MICRO)
    plan = bank.plan_step([(paths[c], use_generic[c]) for c in chunks])
    first = bank.comm.rank - bank.group_comm.rank  # an owner group's splits are indexed by rank in the group
    for wire in plan.wires:  # which ranks this one exchanged rows with, how many bytes, over how many ranks
        if wire is not None:
            TRAFFIC["peers"] |= {first + r for r, (a, b) in enumerate(zip(wire.fetch_splits, wire.serve_splits))
                                 if a or b}
            TRAFFIC["wire_ranks"] = len(wire.fetch_splits)
            TRAFFIC["all_to_alls"] = TRAFFIC.get("all_to_alls", 0) + 1
    for key, value in plan.stats.items():
        if key.endswith(("/bytes_fetched", "/bytes_returned", "/rows_remote")):
            TRAFFIC[key] = TRAFFIC.get(key, 0) + value
    for k, c in enumerate(chunks):
        fetched = bank.fetch(plan, k)
        if len(c):  # owner placement can leave a rank an empty micro-batch
            loss_for(fetched, ids[c]).backward()
        bank.return_grads(fetched)
    norm = bank.finish_grads().sqrt()
    bank.step(lr=0.05, grad_scale=torch.clamp(1.0 / (norm + 1e-6), max=1.0))


def save(bank: MemoryBank, out: str, background: bool, next_step: int, world: int, owner, generic: bool) -> None:
    state = {"bank": bank.state_dict()}
    if not background:
        dcp.save(state, checkpoint_id=out)
        return
    group = dist.new_group(backend="gloo", timeout=TIMEOUT) if world > 1 else None
    pending = dcp.async_save(state, checkpoint_id=out, process_group=group)
    train_step(bank, next_step, world, owner, generic)  # training goes on while the write runs
    pending.result()


def make_bank(placement: str, replicate: int, dtype: str, world: int,
              fetch_per_step: bool = False) -> tuple[MemoryBank, Groups | None]:
    """The bank every run trains (on a process group when there is one), and the subtree owners (owner placement)."""
    owner = assign_groups(TOKENS, world) if placement == "owner" else None
    bank = MemoryBank(n_layers=LAYERS, kind=SwiGLUUnits(d_model=D), branching=BRANCHING, units=UNITS, generic=True,
                      seed=0, optimizer=SparseAdamW(lr=0.05, weight_decay=0.1), comm=Comm(), placement=placement,
                      replicate_levels=replicate, owner_of_subtree=None if owner is None else owner.group_of_subtree,
                      group_size=1 if owner is None else owner.group_size, fetch_per_step=fetch_per_step,
                      dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    for name, table in bank._state.items():  # non-zero down rows, so every slot gets gradients from step 0
        table["weight"][:, :, 2] = 0.5
        if "master" in table:  # a bf16 bank's fp32 masters too (a replicated table's: its pieces of them)
            table["master"].copy_(bank._owned_part(bank.spec[name], table["weight"]))
    return bank, owner


def live_state(bank: MemoryBank) -> dict[str, torch.Tensor]:
    """`<table>.<field>` -> this rank's live tensor, copied."""
    return {f"{t}.{f}": v.clone() for t, fields in bank._state.items() for f, v in fields.items()}


def main() -> int:
    args = argparse.ArgumentParser()
    args.add_argument("out")
    args.add_argument("--placement", default="gather")
    args.add_argument("--replicate", type=int, default=0)
    args.add_argument("--steps", type=int, default=3)
    args.add_argument("--first-step", type=int, default=0)
    args.add_argument("--resume")
    args.add_argument("--generic", action="store_true")
    args.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args.add_argument("--background", action="store_true")
    args.add_argument("--dump")
    args.add_argument("--fetch-per-step", action="store_true")
    args.add_argument("--even", action="store_true")
    a = args.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    bank, owner = make_bank(a.placement, a.replicate, a.dtype, world, a.fetch_per_step)
    ROUTE[0] = routing(owner, a.replicate, world, a.even)
    if a.resume:
        state = {"bank": bank.load_template()}
        dcp.load(state, checkpoint_id=a.resume)
        bank.load_state_dict(state["bank"])
    for step in range(a.first_step, a.first_step + a.steps):
        train_step(bank, step, world, owner, a.generic)
    save(bank, a.out, a.background, a.first_step + a.steps, world, owner, a.generic)
    if a.dump:
        os.makedirs(a.dump, exist_ok=True)
        torch.save(live_state(bank), os.path.join(a.dump, f"rank{bank.comm.rank}.pt"))
        with open(os.path.join(a.dump, f"traffic{bank.comm.rank}.json"), "w") as f:
            json.dump({**TRAFFIC, "peers": sorted(TRAFFIC["peers"])}, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
