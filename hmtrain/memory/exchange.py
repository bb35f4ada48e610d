"""The bank's transport: torch.distributed collectives on one process group (no home-made transport).

NCCL wants device tensors and gloo host tensors; `Comm.device` is where collective
buffers live. With one process every call is the identity, so the single-process
bank runs the same code path without a process group.

`reduce_scatter` and `all_gather` take uneven parts (rank r's part is `splits[r]` rows along dim 0): the
replicated tables' ZeRO-1 step (hmtrain/memory/zero.py) splits a step's touched rows by the rank whose
torch.chunk slice holds them, and those counts differ from rank to rank.
"""
from __future__ import annotations

import datetime

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


class Comm:
    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu",
                 control_group: dist.ProcessGroup | None = None, timeout: datetime.timedelta | None = None,
                 siblings: list[list[int]] | None = None):
        self.group = group
        # a group's Comm: the global ranks of every group made beside it (this one among them), so that `split`
        # can cut them all (every rank makes every subgroup); None for the default group
        self.siblings = siblings
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        self.device = torch.device(device)
        self.timeout = timeout  # for the groups `split` makes (None: torch's default)
        # host integers (sizes, row ids, counts) travel on their own gloo group when one is given (the
        # trainer gives one, NCCL or not): exchanging them never makes the host wait for the GPU, and
        # no other thread's collectives (a background checkpoint's) share their order
        self.control_group = control_group
        self.backend = dist.get_backend(group) if distributed else None

    def split(self, group_size: int) -> Comm:
        """This rank's group of `group_size` consecutive ranks (group g: this Comm's ranks g*R .. g*R + R - 1), as a
        Comm of its own: owner placement's in-group collectives then involve the group's ranks alone, whatever the
        world size. Collective: every rank calls it, in the same order as its other new_group calls (it makes
        every group, of both the main backend and gloo for the control plane)."""
        if group_size < 1 or self.world_size % group_size:
            raise ValueError(f"group_size must divide the world size {self.world_size}, got {group_size}")
        if group_size == self.world_size:
            return self
        if group_size == 1:
            return Comm.alone(self.device)
        if self.group is None:
            group, _ = dist.new_subgroups(group_size, timeout=self.timeout)
            control = None
            if self.control_group is not None:
                control, _ = dist.new_subgroups(group_size, timeout=self.timeout, backend="gloo")
            return Comm(group, self.device, control_group=control, timeout=self.timeout)
        if self.siblings is None:
            raise ValueError("split() of a process group needs the groups made beside it (Comm's siblings)")
        # each sibling group's consecutive ranks (a data-parallel group's, under tensor parallelism)
        cuts = [ranks[g:g + group_size] for ranks in self.siblings for g in range(0, len(ranks), group_size)]
        group, _ = dist.new_subgroups_by_enumeration(cuts, timeout=self.timeout)
        control = None
        if self.control_group is not None:
            control, _ = dist.new_subgroups_by_enumeration(cuts, timeout=self.timeout, backend="gloo")
        return Comm(group, self.device, control_group=control, timeout=self.timeout)

    @classmethod
    def alone(cls, device: torch.device | str = "cpu") -> Comm:
        """A world of this rank alone, inside a job of many: every collective is the identity."""
        comm = cls.__new__(cls)
        comm.group, comm.control_group, comm.backend, comm.timeout, comm.siblings = None, None, None, None, None
        comm.world_size, comm.rank, comm.device = 1, 0, torch.device(device)
        return comm

    def all_to_all(self, send: Tensor, send_splits: list[int], recv_splits: list[int],
                   async_op: bool = False) -> Tensor | tuple[Tensor, dist.Work | None]:
        """Uneven all-to-all along dim 0 (both sides know the splits from the step plan). `async_op`: returns
        (the receive buffer, the collective's handle: wait on it before reading the buffer)."""
        if self.world_size == 1:
            return (send, None) if async_op else send
        recv = send.new_empty((sum(recv_splits), *send.shape[1:]))
        work = dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=recv_splits,
                                      input_split_sizes=send_splits, group=self.group, async_op=async_op)
        return (recv, work) if async_op else recv

    def exchange_ints(self, send: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Send int64 ids to every rank, receive every rank's: `counts` [world, n] says how many ids of each
        of n kinds go to each rank, and `send` holds them rank by rank, kind by kind. Returns the ids
        received (source by source, kind by kind) and their counts [world, n]. Two collectives, the
        counts first (equal parts), whatever the world size; no Python loop runs per peer."""
        counts = np.asarray(counts, dtype=np.int64)
        if self.world_size == 1:
            return np.asarray(send, dtype=np.int64), counts
        group, device = self._control()
        recv_counts = torch.empty(counts.shape, dtype=torch.int64, device=device)
        dist.all_to_all_single(recv_counts, torch.from_numpy(counts).to(device), group=group)
        got = recv_counts.cpu().numpy()
        send_t = torch.from_numpy(np.ascontiguousarray(send, dtype=np.int64)).to(device)
        recv = send_t.new_empty(int(got.sum()))
        dist.all_to_all_single(recv, send_t, output_split_sizes=got.sum(1).tolist(),
                               input_split_sizes=counts.sum(1).tolist(), group=group)
        return recv.cpu().numpy(), got

    def _control(self) -> tuple[dist.ProcessGroup | None, torch.device]:
        if self.control_group is not None:
            return self.control_group, torch.device("cpu")
        return self.group, self.device

    def all_reduce_(self, tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def reduce_scatter(self, send: Tensor, splits: list[int],
                       async_op: bool = False) -> tuple[Tensor, dist.Work | None]:
        """Sum `send` over ranks and keep this rank's part, rows [sum(splits[:rank]), +splits[rank]) of dim 0.
        Returns (that part, the collective's handle when `async_op`: wait on it before reading the part)."""
        if self.world_size == 1:
            return send, None
        out = send.new_empty((splits[self.rank], *send.shape[1:]))
        if len(set(splits)) == 1:  # equal parts: the one ring collective
            work = dist.reduce_scatter_single(out, send.contiguous(), group=self.group, async_op=async_op)
        else:  # torch's uneven form: on NCCL one reduce per rank, coalesced into one launch; gloo has it as is
            work = dist.reduce_scatter(out, list(send.contiguous().split(splits)), group=self.group,
                                       async_op=async_op)
        return out, work if async_op else None

    def all_gather(self, send: Tensor, splits: list[int]) -> Tensor:
        """Every rank's part (rank r sends `splits[r]` rows), concatenated in rank order on every rank."""
        if self.world_size == 1:
            return send
        recv = send.new_empty((sum(splits), *send.shape[1:]))
        if len(set(splits)) == 1:
            dist.all_gather_single(recv, send.contiguous(), group=self.group)
        elif self.backend != dist.Backend.GLOO:  # torch's uneven form: on NCCL one broadcast per rank, coalesced
            dist.all_gather(list(recv.split(splits)), send.contiguous(), group=self.group)
        else:  # gloo's all_gather wants equal parts: broadcast each rank's part that has rows, into its place
            parts = recv.split(splits)
            parts[self.rank].copy_(send)
            for source, part in enumerate(parts):
                if part.numel():
                    dist.broadcast(part, group=self.group, group_src=source)
        return recv

    def all_reduce_ints(self, values: np.ndarray, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> np.ndarray:
        if self.world_size == 1:
            return np.asarray(values, dtype=np.int64)
        group, device = self._control()
        t = torch.from_numpy(np.asarray(values, dtype=np.int64)).to(device)
        dist.all_reduce(t, op=op, group=group)
        return t.cpu().numpy()
