"""A checkpoint's bank as evaluation and generation read it: the weights alone, in host memory.

Training keeps fp32 Adam moments and a step count beside every row (hmtrain/memory/bank.py); reading
a bank needs none of them, so this holds one tensor per table, `[N_i, *row shape]`, in the bank's
dtype, on the CPU: paper-size banks (9-40 GiB of bf16 weights) need not fit beside the anchor on an
accelerator. A lookup gathers its batch's rows on the host, straight into the layer-major layout the
model reads, and copies only those to the device; on CUDA through a pinned buffer, so the copy is
asynchronous. (Pinning the tables themselves would lock the whole bank in RAM for no gain: rows are
gathered on the host either way.)

`load_template()` is the state a checkpoint loads into (`<table>.weight` only: DCP reads just the keys
asked for), so loading costs the weights' bytes and one saved chunk in flight, never the moments.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from hmtrain.memory.fetched import GENERIC
from hmtrain.memory.kind import MemoryKind
from hmtrain.memory.read_only import ReadOnlyBank
from hmtrain.memory.sizes import level_nodes, validate_tree


class HostBank(ReadOnlyBank):
    def __init__(self, *, n_layers: int, kind: MemoryKind, branching: Sequence[int], units: Sequence[int],
                 generic: bool, dtype: torch.dtype, device: str | torch.device = "cpu"):
        """Empty tables (uninitialised: a checkpoint load fills every byte) for the bank a run trains."""
        validate_tree(branching, units)
        super().__init__(n_layers=n_layers, kind=kind, branching=tuple(branching), units=tuple(units),
                         has_generic=generic, device=device)
        self.dtype = dtype
        nodes = level_nodes(self.branching)
        shapes = {f"level{level + 1}": (nodes[level], *kind.row_shape(n_layers, m))
                  for level, m in enumerate(self.units) if m > 0}  # as MemoryBank lays its tables out
        if generic:
            shapes[GENERIC] = (1, *kind.row_shape(n_layers, self.units_total))
        self.tables = {name: torch.empty(shape, dtype=dtype) for name, shape in shapes.items()}
        # staging buffers are pinned only where that makes the copy to the device asynchronous
        self.pin = self.device.type == "cuda" and torch.cuda.is_available()

    def load_template(self) -> dict[str, Tensor]:
        """What a checkpoint's `bank` loads into, in place: each table's weights, nothing else."""
        return {f"{name}.weight": table for name, table in self.tables.items()}

    def device_rows(self, name: str, ids: np.ndarray) -> Tensor:
        table = self.tables[name]
        staged = torch.empty((table.shape[1], len(ids), *table.shape[2:]), dtype=table.dtype, pin_memory=self.pin)
        if len(ids):
            # one pass over the rows, into [n_layers, U, ...]: index_select + transpose would copy twice
            torch.stack([table[i] for i in ids.tolist()], dim=1, out=staged)
        return staged.to(self.device, non_blocking=True)  # the pinned block is kept until the copy is done

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}={tuple(t.shape)}" for name, t in self.tables.items())
        return f"HostBank({self.dtype}, {shapes}, fetched={self.fetched_parameters():,}, device={self.device})"
