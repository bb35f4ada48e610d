"""The hierarchical memory bank: per-level storage, fetch, gradient return, sparse optimizer."""
from __future__ import annotations

import torch

from hmtrain.config.schema import Config
from hmtrain.memory.bank import FetchedMemory, MemoryBank
from hmtrain.memory.sizes import LevelSize, memory_sizes


def uses_memory(cfg: Config) -> bool:
    """Whether a run trains a bank: hierarchical mode, a memory phase, and some units."""
    return cfg.train.mode == "hierarchical" and cfg.train.memory_steps > 0 and sum(cfg.memory.units) > 0


def build_bank(cfg: Config, device: torch.device | str = "cpu") -> MemoryBank:
    """The bank a config describes, with the memory phase's optimizer settings."""
    optim = cfg.train.memory_optim
    return MemoryBank(
        n_layers=cfg.model.n_layers, d_model=cfg.model.d_model, branching=cfg.tree.branching,
        units=cfg.memory.units, generic=cfg.memory.generic, init_std=cfg.memory.init_std,
        seed=cfg.train.seed, device=device, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
        weight_decay=optim.weight_decay,
    )


__all__ = ["FetchedMemory", "LevelSize", "MemoryBank", "build_bank", "memory_sizes", "uses_memory"]
