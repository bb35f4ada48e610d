"""A trained bank that is only read: the lookup evaluation and generation use.

Two banks share it: the memory-mapped export (hmtrain/memory/mapped_bank.py) and a checkpoint's
weights held in host memory (hmtrain/memory/host_bank.py). Both hold one table per level with
m_i > 0 units (N_i rows of the memory kind's row shape, as MemoryBank lays them out) and maybe the
generic row; they differ only in how a table's rows reach the device (`device_rows`).

`lookup` returns the FetchedMemory that `MemoryBank.lookup` builds on the same rows: unique row ids
in ascending order, each sequence's index into them, generic sequences one past the rows. So the
model cannot tell the banks apart, bit for bit.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from hmtrain.memory.fetched import GENERIC, FetchedMemory, Part
from hmtrain.memory.kind import MemoryKind
from hmtrain.memory.plan import validate_paths


class ReadOnlyBank(ABC):
    def __init__(self, *, n_layers: int, kind: MemoryKind, branching: tuple[int, ...], units: tuple[int, ...],
                 has_generic: bool, device: str | torch.device = "cpu"):
        self.n_layers, self.kind = n_layers, kind
        self.branching, self.units = tuple(branching), tuple(units)
        self.units_total = sum(self.units)
        self.has_generic = has_generic
        self.device = torch.device(device)
        self.parts: list[Part] = []
        offset = 0
        for level, m in enumerate(self.units):
            if m > 0:
                self.parts.append(Part(f"level{level + 1}", m, offset))
            offset += m

    @abstractmethod
    def device_rows(self, name: str, ids: np.ndarray) -> Tensor:
        """Rows `ids` (ascending, unique) of table `name` on the device, layer-major and contiguous:
        [n_layers, len(ids), *rest of the row shape], as FetchedMemory holds them."""

    def fetched_parameters(self) -> int:
        """Parameters one sequence fetches: n_layers * params-per-unit * M."""
        return self.n_layers * self.kind.params_per_unit * self.units_total

    @torch.no_grad()
    def lookup(self, paths: Tensor, use_generic: Optional[Tensor] = None) -> FetchedMemory:
        """The memory of a batch, as MemoryBank.lookup gives it: paths [B, L], use_generic [B] bool or None."""
        host = np.asarray(paths.cpu() if isinstance(paths, Tensor) else paths, dtype=np.int64)
        if host.ndim != 2 or host.shape[1] != len(self.branching):
            raise ValueError(f"paths must have shape [B, {len(self.branching)}] (one node per level), "
                             f"got {tuple(host.shape)}")
        batch = len(host)
        if use_generic is None:
            generic = np.zeros(batch, dtype=bool)
        else:
            generic = np.asarray(use_generic.cpu() if isinstance(use_generic, Tensor) else use_generic, dtype=bool)
        if generic.shape != (batch,):
            raise ValueError(f"use_generic must have shape [{batch}], got {generic.shape}")
        if generic.any() and not self.has_generic:
            raise ValueError("use_generic asks for the generic memory, but this bank was trained without one "
                             "(memory.generic=false)")
        if batch:
            validate_paths(host, self.branching)
        own = ~generic
        rows: dict[str, Tensor] = {}
        index: dict[str, np.ndarray] = {}
        for part in self.parts:
            level = int(part.table[len("level"):]) - 1  # tables are numbered from 1, path columns from 0
            ids, inverse = np.unique(host[own, level], return_inverse=True)
            index[part.table] = np.full(batch, len(ids), dtype=np.int64)  # generic sequences: one past the rows
            index[part.table][own] = inverse.reshape(-1)
            rows[part.table] = self.device_rows(part.table, ids)
        if self.has_generic:
            rows[GENERIC] = self.device_rows(GENERIC, np.zeros(1 if generic.any() else 0, dtype=np.int64))
        return FetchedMemory(rows, index, self.parts, self.kind, n_layers=self.n_layers, batch_size=batch,
                             requires_grad=False)
