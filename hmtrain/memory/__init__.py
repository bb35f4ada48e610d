"""The hierarchical memory bank: per-level storage, fetch, gradient return, sparse optimizer; the weights-only
bank evaluation reads."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from hmtrain.config import Config
from hmtrain.memory.bank import MemoryBank
from hmtrain.memory.exchange import Comm
from hmtrain.memory.fetched import FetchedMemory
from hmtrain.memory.host_bank import HostBank
from hmtrain.memory.kind import memory_kind
from hmtrain.memory.sizes import LevelSize, memory_sizes
from hmtrain.memory.sparse_adamw import SparseAdamW
from hmtrain.memory.unit_split import UnitSplit

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def uses_memory(cfg: Config) -> bool:
    """Whether a run trains a bank: an LM (not a memory model) in hierarchical mode, a memory phase, and
    some units."""
    return (cfg.model.family in ("lm", "hf") and cfg.train.mode == "hierarchical" and cfg.train.memory_steps > 0
            and sum(cfg.memory.units) > 0)


def memory_layers(cfg: Config) -> tuple[int, ...]:
    """The decoder layers that carry memory (`memory.layers` against `model.n_layers`), ascending: a bank
    row holds one layer slot for each, in this order, so the bank is built with n_layers = their count."""
    return cfg.memory.decoder_layers(cfg.model.n_layers)


def build_bank(cfg: Config, device: torch.device | str = "cpu", comm: Comm | None = None,
               owner_of_subtree: Sequence[int] | None = None, group_size: int = 1,
               unit_split: UnitSplit | None = None) -> MemoryBank:
    """The bank a config describes, with the memory phase's optimizer settings; owner placement: each
    level-1 subtree's group, and the ranks per group (hmtrain/parallel/placement.py); tensor parallelism:
    this rank's units of every row (hmtrain/memory/unit_split.py), `comm` then the data-parallel group's."""
    optim = cfg.train.memory_optim
    return MemoryBank(
        n_layers=len(memory_layers(cfg)), kind=memory_kind(cfg), branching=cfg.tree.branching,
        units=cfg.memory.units, generic=cfg.memory.generic, init_std=cfg.memory.init_std,
        seed=cfg.train.seed, device=device, dtype=DTYPES[cfg.memory.dtype],
        optimizer=SparseAdamW(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay),
        comm=comm, placement=cfg.parallel.placement, replicate_levels=cfg.parallel.replicate_levels,
        owner_of_subtree=owner_of_subtree, group_size=group_size, fetch_per_step=cfg.parallel.fetch == "step",
        unit_split=unit_split,
    )


def build_host_bank(cfg: Config, device: torch.device | str = "cpu") -> HostBank:
    """The bank a config trains, weights only, for a checkpoint to load into (evaluation, generation): empty
    tables in host memory, in the dtype training stores them in; lookups move their rows to `device`."""
    return HostBank(n_layers=len(memory_layers(cfg)), kind=memory_kind(cfg), branching=cfg.tree.branching,
                    units=cfg.memory.units, generic=cfg.memory.generic, dtype=DTYPES[cfg.memory.dtype], device=device)


__all__ = ["Comm", "FetchedMemory", "HostBank", "LevelSize", "MemoryBank", "SparseAdamW", "UnitSplit", "build_bank",
           "build_host_bank", "memory_layers", "memory_sizes", "uses_memory"]
