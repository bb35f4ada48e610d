"""A trained bank read through memory maps: a lookup reads its paths' rows and nothing else.

`hmtrain export` writes one plain `.npy` file per table (hmtrain/serve/export.py): `level{i}.npy`
holds that level's N_i rows, each of the memory kind's row shape for m_i units, as in MemoryBank
(hmtrain/memory/kind.py), `generic.npy` the one generic row of the fetched size. Rows are C-contiguous,
so node j of a level is the single byte range
`data_offset + j * row_bytes` of its file. A bf16 bank is stored as its raw bit patterns
(`uint16`; numpy has no bfloat16) and viewed back as torch.bfloat16 here, bit for bit.

`lookup` returns the same FetchedMemory that `MemoryBank.lookup` builds on the same rows, so the
model cannot tell the two apart; it needs one process and no checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from hmtrain.memory.fetched import GENERIC, FetchedMemory, Part
from hmtrain.memory.kind import MemoryKind, SwiGLUUnits
from hmtrain.memory.plan import validate_paths

# what a table's elements are, and how they are stored in the .npy file
STORAGE = {"float32": np.dtype("<f4"), "bfloat16": np.dtype("<u2")}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def open_table(path: Path, shape: tuple[int, ...], dtype: str) -> np.memmap:
    """Memory-map one exported table read-only, checking its header against the manifest."""
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"exported table {path} is missing; export the checkpoint again") from None
    except (ValueError, OSError) as exc:  # a truncated file fails to map; a foreign one has no .npy header
        raise ValueError(f"exported table {path} is truncated or not a .npy file ({' '.join(str(exc).split())}); "
                         "export the checkpoint again") from exc
    if tuple(table.shape) != tuple(shape) or table.dtype != STORAGE[dtype]:
        raise ValueError(f"exported table {path} holds {table.dtype} {tuple(table.shape)}, its manifest says "
                         f"{STORAGE[dtype]} {tuple(shape)} ({dtype}); export the checkpoint again")
    if not table.flags.c_contiguous:
        raise ValueError(f"exported table {path} is stored in Fortran order; export the checkpoint again")
    return table


class MappedBank:
    """The bank section of an export's manifest, opened. Build with `MappedBank.open(root, manifest["bank"])`."""

    def __init__(self, *, n_layers: int, kind: MemoryKind, branching: tuple[int, ...], units: tuple[int, ...],
                 dtype: str, tables: dict[str, np.memmap], device: str | torch.device = "cpu"):
        self.n_layers, self.kind = n_layers, kind
        self.branching, self.units = tuple(branching), tuple(units)
        self.units_total = sum(self.units)
        self.dtype_name = dtype
        self.dtype = TORCH_DTYPES[dtype]
        self.tables = tables  # table name -> read-only memory map [N, *kind.row_shape(n_layers, m)]
        self.has_generic = GENERIC in tables
        self.device = torch.device(device)
        self.parts: list[Part] = []
        offset = 0
        for level, m in enumerate(self.units):
            if m > 0:
                self.parts.append(Part(f"level{level + 1}", m, offset))
            offset += m

    @classmethod
    def open(cls, root: str | Path, bank: dict, device: str | torch.device = "cpu") -> "MappedBank":
        root = Path(root)
        try:
            dtype = bank["dtype"]
            if dtype not in STORAGE:
                raise ValueError(f"unknown bank dtype {dtype!r}")
            units, branching = tuple(bank["units"]), tuple(bank["branching"])
            tables = {name: open_table(root / entry["file"], tuple(entry["shape"]), dtype)
                      for name, entry in bank["tables"].items()}
            expected = {f"level{i + 1}" for i, m in enumerate(units) if m > 0}
            expected |= {GENERIC} if bank["generic"] else set()
            if set(tables) != expected:
                raise ValueError(f"tables {sorted(tables)} do not match units {list(units)} "
                                 f"(generic={bank['generic']}): expected {sorted(expected)}")
            # the manifest names no kind: hmtrain trains only SwiGLU FFN memories (memory.kind 'ffn')
            kind = SwiGLUUnits(d_model=int(bank["d_model"]))
            return cls(n_layers=int(bank["n_layers"]), kind=kind, branching=branching, units=units, dtype=dtype,
                       tables=tables, device=device)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"export {root}: the manifest's bank section is malformed ({exc!r}); "
                             "export the checkpoint again") from exc

    def fetched_parameters(self) -> int:
        """Parameters one sequence fetches: n_layers * params-per-unit * M."""
        return self.n_layers * self.kind.params_per_unit * self.units_total

    def read_rows(self, name: str, ids: np.ndarray) -> Tensor:
        """Rows `ids` (ascending, unique) of one table as [len(ids), *row shape]: only their bytes are read."""
        rows = self.tables[name][ids]  # fancy indexing a memory map copies just these rows
        tensor = torch.from_numpy(np.ascontiguousarray(rows))
        return tensor.view(self.dtype) if self.dtype == torch.bfloat16 else tensor

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
            raise ValueError("use_generic asks for the generic memory, but this bank was exported without one "
                             "(trained with memory.generic=false)")
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
            rows[part.table] = self.read_rows(part.table, ids)
        if self.has_generic:
            rows[GENERIC] = self.read_rows(GENERIC, np.zeros(1 if generic.any() else 0, dtype=np.int64))
        layer_major = {name: r.to(self.device).transpose(0, 1).contiguous() for name, r in rows.items()}
        return FetchedMemory(layer_major, index, self.parts, self.kind, n_layers=self.n_layers, batch_size=batch,
                             requires_grad=False)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}={tuple(t.shape)}" for name, t in self.tables.items())
        return f"MappedBank({self.dtype_name}, {shapes}, fetched={self.fetched_parameters():,})"
