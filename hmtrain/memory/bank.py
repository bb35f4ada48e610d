"""The hierarchical memory bank: per-level tables, sharded by row, fetched by step plan.

One table per level i with m_i > 0 units: N_i rows (tree nodes) of the memory kind's row
shape for m_i units (hmtrain/memory/kind.py: for SwiGLU units, gate, up and down rows of every
memory layer: `n_layers` counts the decoder layers that carry memory, `memory.layers`), plus
optionally the generic (context-free) memory: one row of the fetched size M = sum(m_i). Rows live where
their layout says (hmtrain/memory/layout.py): replicated, in torch.chunk slices
(gather placement) or by level-1 subtree (owner placement: each subtree's rows in the group of ranks
that owns it, fetched only within that group). Optimizer moments are fp32
beside the weights, whatever the storage dtype. A table stored in less than fp32 (bf16) also keeps
fp32 master rows, which the optimizer updates; the stored rows are their rounding, and are what
fetches read and send. Row gradients are fp32 from the backward to the update: summed in fp32 over
a micro-batch's sequences (hmtrain/memory/gather.py), returned to owners in fp32, accumulated over
micro-batches in fp32. A replicated table keeps its masters and moments for its torch.chunk slice of
rows only, and each rank updates only those (ZeRO-1, hmtrain/memory/zero.py). docs/design.md states
the bytes per parameter of each layout.

A training step, as the loop calls it:

    plan = bank.plan_step([(paths, use_generic) for each micro-batch])   # host; one id exchange
    for k: memory = bank.fetch(plan, k); ...backward...; bank.return_grads(memory)
    bank.reduce_grads()                  # replicated tables: reduce-scatter issued async, on every rank here
    sq_norm = bank.finish_grads()        # waits for it; device scalar
    bank.step(lr, grad_scale)            # sparse AdamW, touched rows only (replicated: own rows, all-gathered)

Only fetched rows and their gradients ever cross the network (one all-to-all each
way per micro-batch); rows no sequence fetched, and their optimizer state, stay
bit-identical.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from torch import Tensor

from hmtrain.memory import bank_state, zero
from hmtrain.memory import layout as layouts
from hmtrain.memory.exchange import Comm
from hmtrain.memory.fetched import GENERIC, FetchedMemory, Part, unit_index
from hmtrain.memory.indices import DeviceIndices
from hmtrain.memory.kind import MemoryKind
from hmtrain.memory.plan import StepPlan, TableSpec, make_plan
from hmtrain.memory.sizes import level_nodes, validate_tree
from hmtrain.memory.sparse_adamw import Rows, SparseAdamW
from hmtrain.memory.unit_split import UnitSplit

# A table's state fields: weight, [master,] exp_avg, exp_avg_sq, step. MASTER: the fp32 master rows,
# held (and saved) only by tables stored in less than fp32.
MASTER = "master"


def _row_seed(seed: int, table: int, row: int) -> int:
    # every row's initial values depend on (seed, table, row) only, so a bank initialises
    # identically however its rows are spread over ranks
    return (seed * 1_000_003 + table * 7_919 + row) % (2**63 - 1)


class MemoryBank:
    def __init__(
        self,
        *,
        n_layers: int,
        kind: MemoryKind,
        branching: Sequence[int],
        units: Sequence[int],
        generic: bool = True,
        init_std: float = 0.02,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        optimizer: SparseAdamW | None = None,
        comm: Comm | None = None,
        placement: str = "gather",
        replicate_levels: int = 0,
        owner_of_subtree: Sequence[int] | None = None,
        group_size: int = 1,
        fetch_per_step: bool = False,
        unit_split: UnitSplit | None = None,
    ) -> None:
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
        validate_tree(branching, units)
        if sum(units) == 0:
            raise ValueError(f"units must give at least one level a positive number of units, got {tuple(units)}")
        if not (math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"init_std must be a finite number >= 0, got {init_std}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        if placement not in ("gather", "owner"):
            raise ValueError(f"placement must be gather or owner, got {placement!r}")
        if unit_split is not None and len(kind.groups) != 1:
            raise ValueError(f"memory.kind={kind.name}: only a kind of one slot width splits its units over "
                             "tensor-parallel ranks")
        self.n_layers, self.kind = n_layers, kind
        self.branching = tuple(int(k) for k in branching)
        # tensor parallelism: this rank's units of every row (hmtrain/memory/unit_split.py), `units` being the
        # whole rows'; everything below sees the rank's share alone
        self.unit_split = unit_split
        self.units = tuple(int(m) if unit_split is None else unit_split.units(int(m)) for m in units)
        self.units_total = sum(self.units)
        self.nodes = tuple(level_nodes(self.branching))
        self.has_generic = generic
        self.device = torch.device(device)
        self.dtype = dtype
        self.optimizer = optimizer or SparseAdamW()
        self.comm = comm or Comm(device=self.device)
        self.placement = placement
        self.fetch_per_step = fetch_per_step  # rows of other ranks move once per step, not per micro-batch
        world, rank = self.comm.world_size, self.comm.rank
        if placement == "owner" and owner_of_subtree is None:
            owner_of_subtree = np.arange(self.branching[0]) % (world // group_size)
        # owner placement: the group's own collectives (its tables' all-to-alls, id exchange and reductions)
        # run on a Comm over its ranks alone (every rank builds the bank, so every rank makes the groups)
        self.group_comm = self.comm.split(group_size) if placement == "owner" and world > 1 else self.comm
        self.specs: list[TableSpec] = []
        self.parts: list[Part] = []
        offset = 0
        for level, m in enumerate(self.units):
            if m > 0:
                n = self.nodes[level]
                in_groups = placement == "owner" and 1 < world // group_size
                if level < replicate_levels and in_groups and group_size > 1:  # whole in each group, not the world
                    lay = layouts.in_group(n, self.branching[0], np.asarray(owner_of_subtree), world, rank,
                                           group_size)
                    transport = "replicated"
                elif level < replicate_levels and not (in_groups and group_size == 1):
                    lay, transport = layouts.replicated(n, world, rank), "replicated"
                elif placement == "owner":  # groups of one rank read locally; larger ones fetch from each other
                    lay = layouts.by_subtree(n, self.branching[0], np.asarray(owner_of_subtree), world, rank,
                                             group_size)
                    transport = "local" if group_size == 1 else "remote"
                else:
                    lay, transport = layouts.chunked(n, world, rank), "remote"
                self.specs.append(TableSpec(f"level{level + 1}", level, kind.row_shape(n_layers, m), lay, transport))
                self.parts.append(Part(f"level{level + 1}", m, offset))
            offset += m
        if generic:
            self.specs.append(TableSpec(GENERIC, None, kind.row_shape(n_layers, self.units_total),
                                        layouts.replicated(1, world, rank), "replicated"))
        self.spec = {s.name: s for s in self.specs}
        self._remote = [s for s in self.specs if s.transport == "remote"]  # tables fetched from other ranks
        # replicated tables: which pieces of their rows this rank holds the optimizer state (masters, moments,
        # steps) of (ZeRO-1 over the world, or over the group for a table each group keeps whole); every other
        # table holds the state of every row it stores
        self._sharding = {s.name: self._shard(s, np.asarray(owner_of_subtree), group_size)
                          for s in self.specs if s.transport == "replicated"}

        self.has_master = dtype.itemsize < 4
        self._state: dict[str, dict[str, Tensor]] = {}
        for table_index, spec in enumerate(self.specs):
            sharding = self._sharding.get(spec.name)
            n_own, shape = (sharding.owned.num_local, sharding.piece_shape) if sharding else \
                (spec.layout.num_local, spec.row_shape)
            rows = self._init_rows(spec, table_index, init_std, seed)
            # a copy of the owned pieces, so a replicated table's whole fp32 init is not kept alive by a view
            master = sharding.owned_part(rows).clone() if sharding else rows
            self._state[spec.name] = {
                "weight": rows.to(dtype),  # the rows themselves when dtype is fp32
                **({MASTER: master} if self.has_master else {}),
                "exp_avg": torch.zeros((n_own, *shape), device=self.device, dtype=torch.float32),
                "exp_avg_sq": torch.zeros((n_own, *shape), device=self.device, dtype=torch.float32),
                "step": torch.zeros(n_own, device=self.device, dtype=torch.int64),
            }
        self._plan: StepPlan | None = None
        self._indices: DeviceIndices | None = None  # the planned step's index arrays, on the device
        self._lookup: tuple[StepPlan, DeviceIndices] | None = None  # the last lookup plan's, uploaded once
        self._grads: dict[str, Tensor] = {}
        self._step_grads: dict[str, Tensor] = {}  # per-step fetch: gradients of the step's remote rows, fp32
        self._incoming: tuple | None = None  # per-step fetch: the step's rows on their way (buffer, handle)
        self._returning = None  # per-step fetch: finishes the gradients' return (waits, adds them)
        self._shares: dict[str, zero.Shares] = {}  # replicated tables: the step's touched rows by owner
        self._reducing: dict[str, tuple[Tensor, object]] | None = None  # reduce-scatters in flight
        self._mesh = None  # the DeviceMesh checkpoints use (hmtrain/memory/bank_state.py), made on first use

    def comm_of(self, spec: TableSpec) -> Comm:
        """The ranks a table's collectives run on: its owner group's, or the world's."""
        return self.group_comm if spec.in_group else self.comm

    def _shard(self, spec: TableSpec, owner_of_subtree: np.ndarray, group_size: int) -> zero.Sharding:
        """A replicated table's ZeRO-1 cut, and how it lies over the world (what checkpoints convert from)."""
        comm, world, rank, n = self.comm_of(spec), self.comm.world_size, self.comm.rank, spec.layout.num_rows
        if spec.layout.kind == "group":  # over the group's rows; pieces from its fewest rows
            fewest = int(np.bincount(spec.layout.owner // group_size).min())  # every group owns a subtree
            pieces = layouts.pieces_per_row(fewest, spec.row_numel, comm.world_size)

            def cut(rows: int) -> layouts.RowLayout:
                return layouts.by_subtree(rows, self.branching[0], owner_of_subtree, world, rank, group_size)
        else:
            pieces = layouts.pieces_per_row(n, spec.row_numel, world)

            def cut(rows: int) -> layouts.RowLayout:
                return layouts.chunked(rows, world, rank)
        return zero.sharding(spec.layout, spec.row_shape, comm, cut(n * pieces), cut(n), pieces)

    def _owned_part(self, spec: TableSpec, rows: Tensor) -> Tensor:
        """The part of `rows` (a table as stored on this rank) whose optimizer state this rank holds: a
        replicated table's pieces, every row of the others."""
        sharding = self._sharding.get(spec.name)
        return sharding.owned_part(rows) if sharding else rows

    def _init_rows(self, spec: TableSpec, table_index: int, init_std: float, seed: int) -> Tensor:
        """Every row as the kind starts a fresh memory, from its own seed (a fresh memory changes nothing), fp32."""
        rows = spec.layout.local_rows
        weight = torch.zeros((len(rows), *spec.row_shape), device=self.device, dtype=torch.float32)
        gen = torch.Generator(device="cpu")
        split = self.unit_split
        if split is not None:  # each row drawn whole, as one process draws it, and cut to this rank's units
            shape = list(spec.row_shape)
            shape[2] *= split.size
            whole = torch.zeros(shape, device=self.device, dtype=torch.float32)
        for slot, row in enumerate(rows.tolist()):
            gen.manual_seed(_row_seed(seed, table_index, row))
            if split is None:
                self.kind.init_row(weight[slot], init_std, gen)
            else:
                whole.zero_()
                self.kind.init_row(whole, init_std, gen)
                weight[slot].copy_(split.local(whole))
        return weight

    # ---- sizes -------------------------------------------------------------

    @property
    def _split_size(self) -> int:
        return 1 if self.unit_split is None else self.unit_split.size

    def num_parameters(self, include_generic: bool = True) -> int:
        """Parameters of the whole bank, over all ranks (the paper's bank size is include_generic=False); under
        tensor parallelism each rank holds 1/N of them."""
        return self._split_size * sum(s.layout.num_rows * s.row_numel for s in self.specs
                                      if include_generic or s.name != GENERIC)

    def fetched_parameters(self) -> int:
        """Parameters one sequence fetches: n_layers * params-per-unit * M (over its tensor-parallel ranks)."""
        return self.n_layers * self.kind.params_per_unit * self.units_total * self._split_size

    @property
    def tables(self) -> dict[str, Tensor]:
        """Table name -> this rank's stored rows (live; the whole table on one process). Read them only:
        a bf16 table trains its fp32 masters, and the stored rows are rewritten from those."""
        return {name: state["weight"] for name, state in self._state.items()}

    # ---- a training step ---------------------------------------------------

    def plan_step(self, micro_batches: Sequence[tuple[np.ndarray | Tensor, np.ndarray | Tensor | None]]) -> StepPlan:
        """Plan the step's fetches from its micro-batches' (paths [B, L], use_generic [B] or None), on the host."""
        if self._plan is not None:
            raise RuntimeError("plan_step: the previous step was not finished with step()")
        plan = make_plan(self.specs, self._host_batches(micro_batches), self.comm, self.branching,
                         element_size=self.dtype.itemsize, group_comm=self.group_comm, per_step=self.fetch_per_step)
        self._grads = {name: torch.zeros((len(rows), *self.spec[name].row_shape), device=self.device,
                                         dtype=torch.float32) for name, rows in plan.step_rows.items()}
        self._step_grads = {name: torch.zeros((len(f.ids), *self.spec[name].row_shape), device=self.device,
                                              dtype=torch.float32) for name, f in (plan.step_fetch or {}).items()}
        self._shares = {name: sharding.shares(plan.step_rows[name]) for name, sharding in self._sharding.items()}
        self._indices = self._upload(plan)
        self._plan = plan
        remote = self._remote
        if remote and plan.step_fetch is not None:  # the step's rows start moving now; the first fetch waits
            self._incoming = self._send_rows(remote, plan, 0, self._indices, "step")
        return plan

    def plan_lookup(self, micro_batches: Sequence[tuple[np.ndarray | Tensor, np.ndarray | Tensor | None]]) -> StepPlan:
        """Plan fetches that train nothing (validation inside training): the same collective id exchange as
        `plan_step`, so every rank calls it at the same point, but no gradient buffers, and a planned step is
        left as it was. Fetch its micro-batches with `fetch(plan, k, requires_grad=False)`."""
        return make_plan(self.specs, self._host_batches(micro_batches), self.comm, self.branching,
                         element_size=self.dtype.itemsize, group_comm=self.group_comm, per_step=self.fetch_per_step)

    def _host_batches(self, micro_batches) -> list[tuple[np.ndarray, np.ndarray]]:
        """(paths [B, L] int64, use_generic [B] bool) numpy pairs for `make_plan`, checked."""
        host = []
        for paths, use_generic in micro_batches:
            paths = np.asarray(paths.cpu() if isinstance(paths, Tensor) else paths, dtype=np.int64)
            if use_generic is None:
                use_generic = np.zeros(len(paths), dtype=bool)
            use_generic = np.asarray(use_generic.cpu() if isinstance(use_generic, Tensor) else use_generic, dtype=bool)
            if use_generic.shape != (len(paths),):
                raise ValueError(f"use_generic must have shape [{len(paths)}], got {use_generic.shape}")
            if use_generic.any() and not self.has_generic:
                raise ValueError("use_generic asks for the generic memory, but this bank was built with generic=False")
            if paths.size == 0:  # an empty micro-batch (owner placement) still takes part in the plan
                paths = np.zeros((0, len(self.branching)), dtype=np.int64)
            host.append((paths, use_generic))
        return host

    def _upload(self, plan: StepPlan) -> DeviceIndices:
        """Every index array the step's fetches, gradient returns and updates use, copied to the device at once."""
        arrays = {}
        for k, fetches in enumerate(plan.fetches):
            index = {p.table: fetches[p.table].index for p in self.parts}
            arrays[k, "units"] = unit_index(self.parts, index, {name: len(f.ids) for name, f in fetches.items()},
                                            plan.batch_sizes[k])  # every layer's blocks, in one gather
            for spec in self.specs:
                fetch = fetches[spec.name]
                if spec.transport == "remote" and plan.step_fetch is None:
                    arrays.update(self._wire_arrays(plan, spec, k))
                elif spec.transport == "remote":  # its rows' places among the step's
                    arrays[k, spec.name, "slots"] = fetch.slots
                else:
                    arrays.update({(k, spec.name, "rows"): spec.stored_index(fetch.ids),
                                   (k, spec.name, "slots"): fetch.slots})
        for spec in self.specs:
            if spec.transport == "remote" and plan.step_fetch is not None:
                arrays.update(self._wire_arrays(plan, spec, 0, key="step"))
            # the rows step() updates: a replicated table's own share, every touched row else
            shares = self._shares.get(spec.name)
            arrays[spec.name, "update"] = shares.mine if shares is not None else plan.step_rows[spec.name]
        return DeviceIndices(arrays, self.device)

    @staticmethod
    def _wire_arrays(plan: StepPlan, spec: TableSpec, k: int, key: int | str | None = None) -> dict:
        """A remote table's index arrays for all-to-all k of the plan (under `key`: k, or "step")."""
        key = k if key is None else key
        serve, wire = plan.serves[k][spec.name], plan.wires[k]
        return {(key, spec.name, "serve"): serve.local_ids, (key, spec.name, "serve_slots"): serve.slots,
                (key, spec.name, "serve_at"): wire.serve_at[spec.name],
                (key, spec.name, "fetch_at"): wire.fetch_at[spec.name]}

    def _lookup_indices(self, plan: StepPlan) -> DeviceIndices:
        """A lookup plan's index arrays, uploaded at its first fetch rather than at every one."""
        if self._lookup is None or self._lookup[0] is not plan:
            if self._lookup is not None:
                self._lookup[0].rows = None  # the previous lookup's step rows go with it
            self._lookup = (plan, self._upload(plan))
        return self._lookup[1]

    def fetch(self, plan: StepPlan, k: int, *, requires_grad: bool = True,
              padded_to: int | None = None) -> FetchedMemory:
        """Micro-batch k's rows (one all-to-all for rows other ranks own), as per-layer autograd leaves.
        `padded_to`: the model's batch, when padding rows follow the planned sequences (a micro-batch of
        fixed shape); their blocks are zeros, a memory that adds nothing, and their gradients go nowhere."""
        sequences = plan.batch_sizes[k]
        padding = 0 if padded_to is None else padded_to - sequences
        if padding < 0:
            raise ValueError(f"fetch: padded_to={padded_to} is fewer than the {sequences} sequences micro-batch "
                             f"{k} planned")
        # a plan of this bank's step, or one made for a lookup (no step: its indices are uploaded here)
        fetches, idx = plan.fetches[k], self._indices if plan is self._plan else self._lookup_indices(plan)
        rows: dict[str, Tensor] = {}
        for spec in self.specs:
            if spec.transport != "remote":
                rows[spec.name] = idx.take(self._state[spec.name]["weight"], (k, spec.name, "rows"))
        remote = self._remote
        if remote and plan.step_fetch is not None:  # the step's rows, arrived by its first fetch, sliced
            if plan.rows is None:
                incoming = self._incoming if plan is self._plan else self._send_rows(remote, plan, 0, idx, "step")
                self._incoming = None
                plan.rows = self._unpack_rows(remote, incoming, idx, "step", plan.step_fetch)
            for spec in remote:
                rows[spec.name] = idx.take(plan.rows[spec.name], (k, spec.name, "slots"))
        elif remote:
            rows.update(self._unpack_rows(remote, self._send_rows(remote, plan, k, idx, k), idx, k, fetches))
        layer_major = {name: r.transpose(0, 1) for name, r in rows.items()}  # FetchedMemory copies them once
        index = {p.table: fetches[p.table].index for p in self.parts}
        return FetchedMemory(layer_major, index, self.parts, self.kind, n_layers=self.n_layers,
                             batch_size=sequences, requires_grad=requires_grad, micro_batch=k,
                             padding=padding, units_on_device=idx[k, "units"])

    def _send_rows(self, remote: list[TableSpec], plan: StepPlan, k: int, idx: DeviceIndices, key) -> tuple:
        """Issue all-to-all k of the plan (async): each table's served rows go into one buffer with one gather
        and one scatter. Returns (the receive buffer, the handle)."""
        wire = plan.wires[k]
        send = self._state[remote[0].name]["weight"].new_empty((sum(wire.serve_splits), wire.chunk))
        for spec in remote:
            served = idx.take(self._state[spec.name]["weight"], (key, spec.name, "serve"))
            idx.put(send, (key, spec.name, "serve_at"), served)
        return self.comm_of(remote[0]).all_to_all(send, wire.serve_splits, wire.fetch_splits, async_op=True)

    @staticmethod
    def _unpack_rows(remote: list[TableSpec], incoming: tuple, idx: DeviceIndices, key,
                     fetches: dict) -> dict[str, Tensor]:
        """Wait for an all-to-all `_send_rows` issued, and cut what arrived into each table's rows."""
        received, work = incoming
        if work is not None:
            work.wait()
        return {spec.name: idx.take(received, (key, spec.name, "fetch_at")).view(
            len(fetches[spec.name].ids), *spec.row_shape) for spec in remote}

    def return_grads(self, fetched: FetchedMemory, scale: float = 1.0) -> None:
        """After backward: add the micro-batch's row gradients into the owners' step buffers."""
        plan = self._plan
        if plan is None or fetched.micro_batch < 0 or not fetched.requires_grad:
            raise ValueError("return_grads needs a FetchedMemory from fetch() with requires_grad, in a planned step")
        if fetched.returned:
            raise ValueError("this FetchedMemory's gradients were already returned (they would count twice)")
        if self._reducing is not None:
            raise ValueError(f"micro-batch {fetched.micro_batch}'s gradients came after reduce_grads(), which reduces "
                             "the replicated tables' gradients: they would be missing from the sum")
        fetched.returned = True
        k, idx = fetched.micro_batch, self._indices
        grads = {name: g.transpose(0, 1) for name, g in fetched.grads.items()}  # [U, n_layers, ...] views
        per_step = self._plan.step_fetch is not None
        for spec in self.specs:
            if spec.transport != "remote" or per_step:  # per-step remote rows: into the step's buffer, sent once
                buffer = self._step_grads if spec.transport == "remote" else self._grads
                buffer[spec.name].index_add_(0, idx[k, spec.name, "slots"], grads[spec.name].float(), alpha=scale)
        remote = self._remote
        if remote and not per_step:
            self._return_remote(remote, k, k, grads, scale)

    def _return_remote(self, remote: list[TableSpec], k: int, key, grads: dict[str, Tensor], scale: float,
                       async_op: bool = False):
        """Send all-to-all k's gradients of other ranks' rows to their owners (one all-to-all, the fetch's
        buffer layout backwards), add what arrives: one scatter and one gather per table. `async_op`: return
        a function that waits for the all-to-all and adds what arrived."""
        wire, idx = self._plan.wires[k], self._indices
        send = torch.empty((sum(wire.fetch_splits), wire.chunk), device=self.device, dtype=torch.float32)
        for spec in remote:
            idx.put(send, (key, spec.name, "fetch_at"), grads[spec.name].float())
        received, work = self.comm_of(remote[0]).all_to_all(send, wire.fetch_splits, wire.serve_splits, async_op=True)
        finish = partial(self._add_returned, remote, k, key, received, work, scale)
        return finish if async_op else finish()

    def _add_returned(self, remote: list[TableSpec], k: int, key, received: Tensor, work, scale: float) -> None:
        if work is not None:
            work.wait()
        idx = self._indices
        for spec in remote:
            served = idx.take(received, (key, spec.name, "serve_at"))
            rows = served.view(len(self._plan.serves[k][spec.name].local_ids), *spec.row_shape)
            self._grads[spec.name].index_add_(0, idx[key, spec.name, "serve_slots"], rows, alpha=scale)

    def reduce_grads(self) -> None:
        """After the step's last return_grads: issue the replicated tables' reduce-scatters (async), after
        which each rank holds the summed gradients of the touched rows it owns. Every rank calls it at the
        same point among its collectives (the loop: before the anchor's gradient norm, whose kernels then
        run beside them); `finish_grads` waits for them, and calls it if the loop did not. Sharing its group
        with FSDP (the trainer's default group), NCCL runs them after the anchor's gradient reduce-scatter."""
        if self._plan is None:
            raise RuntimeError("reduce_grads() without plan_step(): no gradients to reduce")
        if self._reducing is not None:
            return
        remote = self._remote
        if remote and self._plan.step_fetch is not None:  # the step's remote rows' gradients, home in one go
            self._returning = self._return_remote(remote, 0, "step", self._step_grads, 1.0, async_op=True)
            self._step_grads, self._plan.rows = {}, None
        self._reducing = {}
        for spec in self.specs:
            if spec.transport == "replicated" and len(self._shares[spec.name].rows):
                self._reducing[spec.name] = self.comm_of(spec).reduce_scatter(
                    self._grads[spec.name].view(-1, *self._sharding[spec.name].piece_shape),
                    self._shares[spec.name].counts, async_op=True)

    def _finish_reduction(self) -> None:
        """Wait for the reduce-scatters; a replicated table's step gradients become those of its own rows; the
        per-step remote gradients are added to their owners' buffers."""
        self.reduce_grads()
        if self._returning is not None:
            returning, self._returning = self._returning, None
            returning()
        for name, (own, work) in self._reducing.items():
            if work is not None:
                work.wait()
                self._reducing[name] = (own, None)
            self._grads[name] = own  # the whole-table buffer is released here

    def finish_grads(self) -> Tensor:
        """Reduce the replicated tables' step gradients to their owners; return the squared L2 norm of all bank
        gradients of the step, over all ranks (fp32 device scalar; no host sync)."""
        self._finish_reduction()
        # every rank now holds gradients of its own rows only, disjoint across ranks: sum them. One norm pass
        # over all tables reads each gradient once (pow(2).sum() would write a gradient-sized square first)
        norms = torch._foreach_norm([self._grads[spec.name] for spec in self.specs])
        sq = torch.stack(norms).square().sum() if norms else torch.zeros((), device=self.device)
        sq = self.comm.all_reduce_(sq.to(self.comm.device))
        if self.unit_split is not None:  # and the tensor-parallel ranks' disjoint unit slices
            sq = self.unit_split.comm.all_reduce_(sq.to(self.unit_split.comm.device))
        return sq.to(self.device)

    def step(self, lr: float, grad_scale: Tensor | float = 1.0) -> dict[str, int]:
        """Scale the step's gradients (global clipping) and apply row-wise AdamW to touched rows only; a
        replicated table's owners update their rows and send them to every rank."""
        if self._plan is None:
            raise RuntimeError("step() without plan_step(): nothing to update")
        self._finish_reduction()  # done already when finish_grads() ran
        updated = {spec.name: len(self._plan.step_rows[spec.name]) for spec in self.specs}
        touched = [spec for spec in self.specs if updated[spec.name]]
        grads = [self._grads[spec.name] for spec in touched]
        if grads and not (isinstance(grad_scale, float) and grad_scale == 1.0):  # x * 1.0 is x: skip the pass
            torch._foreach_mul_(grads, grad_scale)
        tables = []
        for spec, g in zip(touched, grads):
            state, key = self._state[spec.name], (spec.name, "update")
            tables.append(Rows(self._owned_part(spec, state["weight"]), state["exp_avg"], state["exp_avg_sq"],
                               state["step"], self._indices[key], g, state.get(MASTER), self._indices.run(key)))
        self.optimizer.update_tables_(tables, lr=lr, validate=False)  # one pass over every table's rows
        for spec, rows in zip(touched, tables):
            if spec.transport == "replicated":
                pieces = self._state[spec.name]["weight"].view(-1, *self._sharding[spec.name].piece_shape)
                zero.gather_updated(self.comm_of(spec), pieces, rows.weight, self._shares[spec.name])
        self.abandon_step()
        return updated

    def abandon_step(self) -> None:
        """Drop a planned step without updating (e.g. evaluation inside a step)."""
        pending = [work for _, work in (self._reducing or {}).values()]
        pending += [self._incoming[1]] if self._incoming is not None else []
        for work in pending:
            if work is not None:
                work.wait()  # every rank issued it: let it finish before its buffers go
        if self._returning is not None:
            self._returning()
        if self._plan is not None:
            self._plan.rows = None
        self._plan, self._grads, self._shares, self._reducing = None, {}, {}, None
        self._step_grads, self._incoming, self._returning = {}, None, None
        self._indices = None

    # ---- checkpoint state (hmtrain/memory/bank_state.py) ----------------------

    def _checkpoint_mesh(self):
        """The mesh checkpoints' DTensors live on: the bank's ranks, or (dp, tp) under tensor parallelism; None
        for a bank alone on one process (saved as plain tensors)."""
        if self.unit_split is not None:
            return self.unit_split.mesh
        if self.comm.world_size == 1:
            return None
        if self._mesh is None:
            self._mesh = bank_state.checkpoint_mesh(self.comm)
        return self._mesh

    def _laid_out(self, spec: TableSpec, field: str) -> tuple[Tensor, layouts.RowLayout] | None:
        """The rows of a state field this rank saves and loads, and how they lie over the world: a table's
        stored rows as its layout says; for a replicated table its row share of the weight and its state's
        rows (each row saved by one rank). None for state held in pieces of rows, which checkpoints convert."""
        live, sharding = self._state[spec.name][field], self._sharding.get(spec.name)
        if sharding is None:
            return live, spec.layout
        if field == "weight":
            return sharding.row_share(live), sharding.world_rows
        return (live, sharding.world_state) if sharding.pieces == 1 else None

    def _saved(self, spec: TableSpec, field: str, mesh) -> Tensor:
        laid_out = self._laid_out(spec, field)
        if laid_out is None:  # pieces -> the chunk rows a checkpoint holds
            laid_out = (bank_state.pieces_to_rows(self.comm, self._state[spec.name][field], self._sharding[spec.name],
                                                  spec.row_shape), self._chunk(spec))
        return bank_state.saved(*laid_out, self.comm, mesh)

    def _chunk(self, spec: TableSpec) -> layouts.RowLayout:
        return layouts.chunked(spec.layout.num_rows, self.comm.world_size, self.comm.rank)

    def _to_load(self, spec: TableSpec, field: str, mesh) -> Tensor:
        laid_out = self._laid_out(spec, field)
        if laid_out is None:  # the checkpoint's chunk rows, relaid out into pieces by _restore
            live, rows = self._state[spec.name][field], self._chunk(spec).num_local
            laid_out = (live.new_empty((rows,) if live.dim() == 1 else (rows, *spec.row_shape)), self._chunk(spec))
        return bank_state.to_load(*laid_out, self.comm, mesh)

    def _restore(self, spec: TableSpec, field: str, loaded: Tensor) -> None:
        laid_out = self._laid_out(spec, field)
        if laid_out is not None:
            bank_state.restore(laid_out[0], loaded, laid_out[1], self.comm)
            return
        live = self._state[spec.name][field]
        live.copy_(bank_state.rows_to_pieces(self.comm, loaded.to_local(), self._sharding[spec.name]).view_as(live))

    def state_dict(self) -> dict[str, Tensor]:
        """Flat `<table>.<field>` -> tensor (one process) or chunk-layout Shard(0) DTensor; a bf16 table
        saves its fp32 masters too (`<table>.master`), so a resume continues exactly. The on-disk form does
        not depend on the layouts or the pieces (hmtrain/memory/bank_state.py)."""
        mesh = self._checkpoint_mesh()
        return {f"{spec.name}.{field}": self._saved(spec, field, mesh) for spec in self.specs
                for field in self._state[spec.name]}

    def load_template(self) -> dict[str, Tensor]:
        """The tensors a checkpoint's bank loads into (`load_state_dict` then finishes the load)."""
        mesh = self._checkpoint_mesh()
        return {f"{spec.name}.{field}": self._to_load(spec, field, mesh) for spec in self.specs
                for field in self._state[spec.name]}

    def load_state_dict(self, loaded: dict[str, Tensor]) -> None:
        """Finish loading `load_template()`'s tensors: rows into subtree-placed tables, a replicated table's
        pieces into place and its weight gathered from the rows each rank loaded; drop any planned step.
        Masters a checkpoint lacks (a bf16 bank saved before they existed, checkpoint format < 3: the
        loader leaves their entries out, hmtrain/checkpoint/formats.py) start from the loaded rows."""
        for spec in self.specs:
            state = self._state[spec.name]
            for field in state:  # "weight" comes before MASTER
                if field == MASTER and f"{spec.name}.{MASTER}" not in loaded:
                    state[MASTER].copy_(self._owned_part(spec, state["weight"]))
                    continue
                self._restore(spec, field, loaded[f"{spec.name}.{field}"])
            sharding = self._sharding.get(spec.name)
            if sharding is not None and sharding.comm.world_size > 1:  # each rank loaded its rows: gather the rest
                counts = np.bincount(sharding.rows.owner, minlength=sharding.comm.world_size).tolist()
                state["weight"].copy_(sharding.comm.all_gather(sharding.row_share(state["weight"]), counts))
        self.abandon_step()

    # ---- evaluation (one process) ------------------------------------------

    @torch.no_grad()
    def lookup(self, paths: Tensor, use_generic: Tensor | None = None) -> FetchedMemory:
        """The memory of a batch for evaluation: no gradients, every row local (one process)."""
        if self.comm.world_size != 1:
            raise RuntimeError("lookup() reads rows locally: evaluate on one process (or an exported bank)")
        ug = None if use_generic is None else use_generic.cpu().numpy().astype(bool)
        plan = make_plan(self.specs, [(paths.cpu().numpy().astype(np.int64), ug if ug is not None else
                                       np.zeros(len(paths), dtype=bool))], self.comm, self.branching)
        if ug is not None and ug.any() and not self.has_generic:
            raise ValueError("use_generic asks for the generic memory, but this bank was built with generic=False")
        return self.fetch(plan, 0, requires_grad=False)

    def _to_device(self, array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(self.device, non_blocking=True)

    def __repr__(self) -> str:
        return (f"MemoryBank(n_layers={self.n_layers}, kind={self.kind}, branching={self.branching}, "
                f"units={self.units}, generic={self.has_generic}, placement={self.placement}, "
                f"world={self.comm.world_size}, params={self.num_parameters():,}, "
                f"fetched={self.fetched_parameters():,})")
