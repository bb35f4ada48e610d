"""One bank table in a checkpoint: its rows as a `Shard(0)` DTensor in the torch.chunk layout.

Under tensor parallelism the mesh is (dp, tp) and a rank holds its units of each row
(hmtrain/memory/unit_split.py): tables are then 2-D DTensors, rows `Shard(0)` over dp and units `Shard(3)` over
tp (step counts, one per row, `Replicate()` over tp), whose global tensor is the one-process table.

DCP reshards that layout to any world size (docs/design.md), so a bank saved on N ranks loads on M,
with either placement. Tables stored in another layout at run time are converted on the way:
replicated tables save and load only the rows whose optimizer state a rank holds (MemoryBank then
all-gathers the rest), so no rank reads a whole table; subtree-placed rows are moved to chunk rows
by one all-to-all per tensor. On one process the live tensors are saved and loaded as
they are. `MemoryBank.state_dict` / `load_template` / `load_state_dict` apply these to every table.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from hmtrain.memory.exchange import Comm
from hmtrain.memory.layout import RowLayout, chunk_rows, chunked, pieces_of
from hmtrain.memory.unit_split import UNIT_AXIS
from hmtrain.memory.zero import Sharding


def checkpoint_mesh(comm: Comm) -> DeviceMesh:
    """The one-dimensional mesh over the bank's ranks that the chunk-layout DTensors live on."""
    device_type = comm.device.type
    if comm.group is not None:
        return DeviceMesh.from_group(comm.group, device_type)
    return init_device_mesh(device_type, (comm.world_size,))


def _as_dtensor(local: Tensor, mesh: DeviceMesh, num_rows: int) -> DTensor:
    shape = [num_rows, *local.shape[1:]]
    placements = [Shard(0)]
    if mesh.ndim == 2:  # (dp, tp): a table's units split over tp (UNIT_AXIS of a row), a step count whole
        units_split = local.dim() > UNIT_AXIS + 1
        placements.append(Shard(UNIT_AXIS + 1) if units_split else Replicate())
        if units_split:
            shape[UNIT_AXIS + 1] *= mesh.size(1)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


def relayout(comm: Comm, tensor: Tensor, src: RowLayout, dst: RowLayout) -> Tensor:
    """Move this rank's rows of one table from layout `src` to layout `dst` (one all-to-all)."""
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


def saved(live: Tensor, layout: RowLayout, comm: Comm, mesh: DeviceMesh | None) -> Tensor:
    """What a checkpoint saves of one table tensor: the live tensor (one process: no mesh) or its chunk rows."""
    world, rank, n = comm.world_size, comm.rank, layout.num_rows
    if mesh is None:
        return live
    if layout.is_chunk_compatible:
        # a view (a replicated table's slice) is saved as a copy: a DTensor takes its local tensor's storage
        # offset, and DCP's async stager takes a DTensor with a nonzero offset for one with storage of its own
        # and fails ("copy_() on an invalid python storage"). The copy is 1/world of a small table.
        return _as_dtensor(live if _is_whole(live) else live.clone(), mesh, n)
    return _as_dtensor(relayout(comm, live, layout, chunked(n, world, rank)), mesh, n)


def _is_whole(tensor: Tensor) -> bool:
    """Whether a tensor is all of its storage (not a view into a larger one)."""
    return tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def to_load(live: Tensor, layout: RowLayout, comm: Comm, mesh: DeviceMesh | None) -> Tensor:
    """A tensor for dcp.load to fill in place: live storage wherever the layouts allow it."""
    world, rank, n = comm.world_size, comm.rank, layout.num_rows
    if mesh is None:
        return live
    if layout.is_chunk_compatible and _is_whole(live):
        return _as_dtensor(live, mesh, n)
    start, stop = chunk_rows(n, world, rank)
    return _as_dtensor(live.new_empty((stop - start, *live.shape[1:])), mesh, n)


def restore(live: Tensor, loaded: Tensor, layout: RowLayout, comm: Comm) -> None:
    """Finish a load: move the chunk rows `to_load` made (a view's, or a subtree-placed table's) into `live`."""
    world, rank = comm.world_size, comm.rank
    if not isinstance(loaded, DTensor):
        return  # one process: loaded in place
    rows = loaded.to_local()
    if rows.data_ptr() == live.data_ptr() and rows.numel():
        return  # loaded in place
    live.copy_(rows if layout.is_chunk_compatible else relayout(comm, rows, chunked(layout.num_rows, world, rank),
                                                               layout))


def pieces_to_rows(comm: Comm, live: Tensor, sharding: Sharding, row_shape: tuple[int, ...]) -> Tensor:
    """A replicated table's state field as this rank holds it (its pieces, `Sharding`) as the chunk rows a
    checkpoint saves: one all-to-all. Step counts ([pieces]) become one per row (a row's pieces share it)."""
    rows = chunked(sharding.world_rows.num_rows, comm.world_size, comm.rank)
    flat = live.reshape(len(live), int(np.prod(live.shape[1:])))  # step counts: [pieces, 1]
    moved = relayout(comm, flat, sharding.world_state, pieces_of(rows, sharding.pieces))
    if live.dim() == 1:
        return moved.view(-1, sharding.pieces)[:, 0].contiguous()
    return moved.reshape(-1, *row_shape)


def rows_to_pieces(comm: Comm, rows: Tensor, sharding: Sharding) -> Tensor:
    """`pieces_to_rows` backwards: the chunk rows a checkpoint loaded as this rank's pieces, [pieces, ...]."""
    chunk = chunked(sharding.world_rows.num_rows, comm.world_size, comm.rank)
    if rows.dim() == 1:  # step counts: every piece of a row has the row's
        flat = rows.repeat_interleave(sharding.pieces)[:, None]
    else:
        flat = rows.reshape(len(rows) * sharding.pieces, int(np.prod(sharding.piece_shape)))
    return relayout(comm, flat, pieces_of(chunk, sharding.pieces), sharding.world_state)
