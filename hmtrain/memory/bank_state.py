"""The bank in a checkpoint: every table as `Shard(0)` DTensors in the torch.chunk layout.

DCP reshards that layout to any world size (docs/design.md), so a bank saved on N ranks
loads on M, with either placement. Tables stored in another layout at run time are
converted on the way: replicated tables save their chunk slice and load the whole
table; subtree-placed tables are moved to chunk rows by one all-to-all per tensor.
On one process the live tensors are saved and loaded as they are.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from hmtrain.memory.bank import STATE_FIELDS, MemoryBank
from hmtrain.memory.layout import RowLayout, chunk_rows, chunked


def _mesh(bank: MemoryBank) -> DeviceMesh:
    mesh = bank._mesh
    if mesh is None:
        device_type = bank.comm.device.type
        group = bank.comm.group
        mesh = DeviceMesh.from_group(group, device_type) if group is not None else \
            init_device_mesh(device_type, (bank.comm.world_size,))
        bank._mesh = mesh
    return mesh


def _as_dtensor(bank: MemoryBank, local: Tensor, num_rows: int) -> DTensor:
    shape = torch.Size((num_rows, *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, _mesh(bank), [Shard(0)], run_check=False, shape=shape, stride=stride)


def relayout(bank: MemoryBank, tensor: Tensor, src: RowLayout, dst: RowLayout) -> Tensor:
    """Move this rank's rows of one table from layout `src` to layout `dst` (one all-to-all)."""
    comm = bank.comm
    mine = src.local_rows
    order = np.lexsort((dst.local[mine], dst.owner[mine]))
    send = tensor.index_select(0, torch.from_numpy(src.local[mine[order]]).to(tensor.device))
    row = int(np.prod(tensor.shape[1:]))
    send_splits = (np.bincount(dst.owner[mine], minlength=comm.world_size) * row).tolist()
    incoming = dst.local_rows
    arrival = incoming[np.lexsort((dst.local[incoming], src.owner[incoming]))]
    recv_splits = (np.bincount(src.owner[incoming], minlength=comm.world_size) * row).tolist()
    received = comm.all_to_all(send.reshape(-1), send_splits, recv_splits)
    out = tensor.new_empty((len(incoming), *tensor.shape[1:]))
    out[torch.from_numpy(dst.local[arrival]).to(tensor.device)] = received.view(-1, *tensor.shape[1:])
    return out


def bank_state_for_save(bank: MemoryBank) -> dict[str, Tensor]:
    """Flat `<table>.<field>` -> tensor (one process) or chunk-layout Shard(0) DTensor."""
    world, rank = bank.comm.world_size, bank.comm.rank
    out: dict[str, Tensor] = {}
    for spec in bank.specs:
        n = spec.layout.num_rows
        for field in STATE_FIELDS:
            live = bank._state[spec.name][field]
            key = f"{spec.name}.{field}"
            if world == 1:
                out[key] = live
            elif spec.layout.kind == "replicated":
                start, stop = chunk_rows(n, world, rank)
                out[key] = _as_dtensor(bank, live[start:stop], n)
            elif spec.layout.is_chunk_compatible:
                out[key] = _as_dtensor(bank, live, n)
            else:
                out[key] = _as_dtensor(bank, relayout(bank, live, spec.layout, chunked(n, world, rank)), n)
    return out


def bank_state_for_load(bank: MemoryBank) -> dict[str, Tensor]:
    """Tensors for dcp.load to fill in place: live storage wherever the layouts allow it."""
    world, rank = bank.comm.world_size, bank.comm.rank
    out: dict[str, Tensor] = {}
    for spec in bank.specs:
        n = spec.layout.num_rows
        for field in STATE_FIELDS:
            live = bank._state[spec.name][field]
            key = f"{spec.name}.{field}"
            if world == 1 or spec.layout.kind == "replicated":
                out[key] = live  # a plain tensor: DCP reads the whole table from whatever chunks were saved
            elif spec.layout.is_chunk_compatible:
                out[key] = _as_dtensor(bank, live, n)
            else:
                start, stop = chunk_rows(n, world, rank)
                out[key] = _as_dtensor(bank, live.new_empty((stop - start, *live.shape[1:])), n)
    return out


def restore_bank(bank: MemoryBank, loaded: dict[str, Tensor]) -> None:
    """Finish a load: move chunk-layout rows into subtree-placed tables; drop any planned step."""
    world, rank = bank.comm.world_size, bank.comm.rank
    for spec in bank.specs:
        if world == 1 or spec.layout.kind == "replicated" or spec.layout.is_chunk_compatible:
            continue
        for field in STATE_FIELDS:
            chunk = loaded[f"{spec.name}.{field}"].to_local()
            moved = relayout(bank, chunk, chunked(spec.layout.num_rows, world, rank), spec.layout)
            bank._state[spec.name][field].copy_(moved)
    bank.abandon_step()
