"""A trained bank read through memory maps: a lookup reads its paths' rows and nothing else.

`hmtrain export` writes one plain `.npy` file per table (hmtrain/serve/export.py): `level{i}.npy`
holds that level's N_i rows, each of the memory kind's row shape for m_i units, as in MemoryBank
(hmtrain/memory/kind.py), `generic.npy` the one generic row of the fetched size. Rows are C-contiguous,
so node j of a level is the single byte range
`data_offset + j * row_bytes` of its file. A bf16 bank is stored as its raw bit patterns
(`uint16`; numpy has no bfloat16) and viewed back as torch.bfloat16 here, bit for bit.

`lookup` (hmtrain/memory/read_only.py) returns the same FetchedMemory that `MemoryBank.lookup` builds
on the same rows, so the model cannot tell the two apart; it needs one process and no checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hmtrain.memory.fetched import GENERIC
from hmtrain.memory.kind import MemoryKind, SwiGLUUnits, kind_from_spec
from hmtrain.memory.read_only import ReadOnlyBank

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


class MappedBank(ReadOnlyBank):
    """The bank section of an export's manifest, opened. Build with `MappedBank.open(root, manifest["bank"])`."""

    def __init__(self, *, n_layers: int, kind: MemoryKind, branching: tuple[int, ...], units: tuple[int, ...],
                 dtype: str, tables: dict[str, np.memmap], device: str | torch.device = "cpu"):
        super().__init__(n_layers=n_layers, kind=kind, branching=branching, units=units,
                         has_generic=GENERIC in tables, device=device)
        self.dtype_name = dtype
        self.dtype = TORCH_DTYPES[dtype]
        self.tables = tables  # table name -> read-only memory map [N, *kind.row_shape(n_layers, m)]

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
            # an export from before memory kinds names none: its memory is SwiGLU units (memory.kind 'ffn')
            kind = kind_from_spec(bank["kind"]) if "kind" in bank else SwiGLUUnits(d_model=int(bank["d_model"]))
            return cls(n_layers=int(bank["n_layers"]), kind=kind, branching=branching, units=units, dtype=dtype,
                       tables=tables, device=device)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"export {root}: the manifest's bank section is malformed ({exc!r}); "
                             "export the checkpoint again") from exc

    def read_rows(self, name: str, ids: np.ndarray) -> Tensor:
        """Rows `ids` (ascending, unique) of one table as [len(ids), *row shape]: only their bytes are read."""
        rows = self.tables[name][ids]  # fancy indexing a memory map copies just these rows
        tensor = torch.from_numpy(np.ascontiguousarray(rows))
        return tensor.view(self.dtype) if self.dtype == torch.bfloat16 else tensor

    def device_rows(self, name: str, ids: np.ndarray) -> Tensor:
        return self.read_rows(name, ids).to(self.device).transpose(0, 1).contiguous()

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}={tuple(t.shape)}" for name, t in self.tables.items())
        return f"MappedBank({self.dtype_name}, {shapes}, fetched={self.fetched_parameters():,})"
