"""The hierarchical memory bank (single process): storage, fetch, sparse update.

One table per level i (with m_i > 0 units): [N_i, n_layers, 3, m_i, d_model],
one row per tree node holding that node's block for every layer; slot 0 = gate
rows, 1 = up rows, 2 = down rows (the down matrix [d, m_i] stored transposed,
so all three slots share a shape). An optional generic (context-free) memory
of the fetched size M = sum(m_i) is one more table of a single row.

The seams are the distributed ones (DESIGN.md, "The bank in a distributed
job"): the model only sees a `FetchedMemory` built from the unique rows of a
micro-batch, and the loop only calls fetch / accumulate_grads /
pending_grad_norm / scale_pending_grads / step / state_dict. A sharded bank
replaces how rows arrive (all-to-all from owners) and where their gradients go,
not this interface.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hmtrain.memory.sizes import level_nodes, validate_tree
from hmtrain.memory.sparse_adamw import SparseAdamW

GENERIC = "generic"
# Initialise big tables this many elements at a time (64 MiB of fp32), so a
# 4.6B bank never needs a second full-size random temporary.
_INIT_CHUNK_ELEMENTS = 1 << 24


@dataclass
class _Part:
    """One level's share of a fetch: its unique rows and which one each sequence uses."""

    name: str
    units: int
    offset: int  # first unit of this level in the concatenated memory (and in the generic row)
    rows: Tensor | None  # [U, n_layers, 3, m, d] leaf, or None if every sequence is generic
    index: Tensor  # [B] into rows; == U (one past the rows) means "generic row"


class FetchedMemory:
    """What one micro-batch fetched; the model reads per-layer blocks from it.

    Holds only the unique rows per table (the fetched set a distributed bank
    receives from owners) plus per-sequence indices; `layer(i)` builds the
    per-sequence blocks of one layer on demand, so no copy of all layers is
    ever made per sequence.
    """

    def __init__(self, owner: MemoryBank, parts: list[_Part], generic_row: Tensor | None, touched: dict[str, Tensor],
                 batch_size: int, units: int, n_layers: int, requires_grad: bool) -> None:
        self._owner = owner
        self._parts = parts
        self._generic_row = generic_row  # [1, n_layers, 3, M, d] leaf, or None when unused
        self._n_layers = n_layers
        self.batch_size = batch_size
        self.units = units
        self.requires_grad = requires_grad
        self.accumulated = False
        self.touched: dict[str, Tensor] = touched  # table name -> unique node ids fetched
        self._leaves: dict[str, Tensor] = {}  # table name -> fetched rows (autograd leaves)
        for p in parts:
            if p.rows is not None:
                self._leaves[p.name] = p.rows
        if generic_row is not None:
            self._leaves[GENERIC] = generic_row

    def layer(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Blocks of transformer layer i: u_gate [B, M, d], u_up [B, M, d], u_down [B, d, M].

        Sequence b's units are [level0 block | level1 block | ...], or the
        generic row for generic sequences. u_down is a transposed view.
        """
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self._n_layers:
            raise ValueError(f"layer index must be an int in [0, {self._n_layers}), got {i!r}")
        blocks = []
        for p in self._parts:
            sources = [] if p.rows is None else [p.rows[:, i]]  # [U, 3, m, d]
            if self._generic_row is not None:
                sources.append(self._generic_row[:, i, :, p.offset : p.offset + p.units])
            src = sources[0] if len(sources) == 1 else torch.cat(sources, dim=0)
            blocks.append(src.index_select(0, p.index))  # [B, 3, m, d]
        mem = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)  # [B, 3, M, d]
        return mem[:, 0], mem[:, 1], mem[:, 2].transpose(1, 2)


class MemoryBank:
    """Per-level memory tables, their row-wise AdamW state and pending gradients."""

    def __init__(
        self,
        *,
        n_layers: int,
        d_model: int,
        branching: Sequence[int],
        units: Sequence[int],
        generic: bool = True,
        init_std: float = 0.02,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 1e-3,
    ) -> None:
        for name, v in (("n_layers", n_layers), ("d_model", d_model)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        validate_tree(branching, units)
        if sum(units) == 0:
            raise ValueError(f"units must give at least one level a positive number of units, got {tuple(units)}")
        if not (math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"init_std must be a finite number >= 0, got {init_std}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        self.n_layers = n_layers
        self.d_model = d_model
        self.branching = tuple(int(k) for k in branching)
        self.units = tuple(int(m) for m in units)
        self.num_levels = len(self.branching)
        self.units_total = sum(self.units)
        self.nodes = tuple(level_nodes(self.branching))
        self.has_generic = generic
        self.device = torch.device(device)
        self.dtype = dtype
        self.optimizer = SparseAdamW(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

        # unit offset of every level in the concatenated memory [level0 | level1 | ...]
        self._offsets = [sum(self.units[:i]) for i in range(self.num_levels)]
        shapes = {f"level{i}": (self.nodes[i], n_layers, 3, m, d_model) for i, m in enumerate(self.units) if m > 0}
        if generic:
            shapes[GENERIC] = (1, n_layers, 3, self.units_total, d_model)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self._weight: dict[str, Tensor] = {}
        self._exp_avg: dict[str, Tensor] = {}
        self._exp_avg_sq: dict[str, Tensor] = {}
        self._step: dict[str, Tensor] = {}
        for name, shape in shapes.items():  # insertion order: levels, then generic -> deterministic draws
            self._weight[name] = self._init_table(shape, init_std, gen)
            self._exp_avg[name] = torch.zeros(shape, device=self.device, dtype=torch.float32)
            self._exp_avg_sq[name] = torch.zeros(shape, device=self.device, dtype=torch.float32)
            self._step[name] = torch.zeros(shape[0], device=self.device, dtype=torch.int64)
        # table name -> list of (node ids, fp32 grads); coalesced lazily by _pending_coalesced
        self._pending: dict[str, list[tuple[Tensor, Tensor]]] = {}

    def _init_table(self, shape: tuple[int, ...], init_std: float, gen: torch.Generator) -> Tensor:
        # gate/up ~ N(0, init_std) like the anchor's; down = 0 so a fresh memory is a no-op.
        # Drawn on CPU in row chunks: same values on every device, no full-size temporary.
        table = torch.zeros(shape, device=self.device, dtype=self.dtype)
        row_elems = 2 * math.prod(shape[1:]) // 3
        chunk = max(1, _INIT_CHUNK_ELEMENTS // max(1, row_elems))
        for start in range(0, shape[0], chunk):
            n = min(chunk, shape[0] - start)
            block = torch.empty((n, shape[1], 2, *shape[3:]), dtype=torch.float32).normal_(0.0, init_std, generator=gen)
            table[start : start + n, :, 0:2] = block.to(device=self.device, dtype=self.dtype)
        return table

    # ---- sizes -------------------------------------------------------------

    @property
    def tables(self) -> dict[str, Tensor]:
        """Table name -> weight tensor (live, not a copy)."""
        return dict(self._weight)

    def num_parameters(self, include_generic: bool = True) -> int:
        """Parameters stored in the bank (the paper's bank size is include_generic=False)."""
        return sum(w.numel() for name, w in self._weight.items() if include_generic or name != GENERIC)

    def fetched_parameters(self) -> int:
        """Parameters one sequence fetches: n_layers * 3 * d_model * M."""
        return self.n_layers * 3 * self.d_model * self.units_total

    # ---- fetch -------------------------------------------------------------

    def _validate_paths(self, paths: Tensor) -> None:
        if not isinstance(paths, Tensor):
            raise ValueError(f"paths must be a torch.Tensor, got {type(paths).__name__}")
        if paths.dtype != torch.int64:
            raise ValueError(f"paths must be int64, got {paths.dtype}")
        if paths.ndim != 2 or paths.shape[1] != self.num_levels or paths.shape[0] == 0:
            raise ValueError(
                f"paths must have shape [B >= 1, {self.num_levels}] (one node per level), got {tuple(paths.shape)}"
            )
        for i, n in enumerate(self.nodes):
            col = paths[:, i]
            bad = ((col < 0) | (col >= n)).nonzero()
            if bad.numel():
                b = int(bad[0, 0])
                raise ValueError(f"paths[{b}, {i}] = {int(col[b])} is out of range for level {i} with {n} nodes")
            if i > 0:
                parent = torch.div(col, self.branching[i], rounding_mode="floor")
                bad = (parent != paths[:, i - 1]).nonzero()
                if bad.numel():
                    b = int(bad[0, 0])
                    raise ValueError(
                        f"paths[{b}] is not a tree path: node {int(col[b])} at level {i} has parent "
                        f"{int(parent[b])} (= node // {self.branching[i]}), but paths[{b}, {i - 1}] = "
                        f"{int(paths[b, i - 1])}"
                    )

    def fetch(self, paths: Tensor, use_generic: Tensor | None = None, *, requires_grad: bool = True) -> FetchedMemory:
        """Gather the unique rows on the batch's paths (and the generic row if used).

        paths: [B, L] int64, one node per level. use_generic: optional [B] bool;
        True sequences get the generic memory instead of their path's. With
        requires_grad=False (evaluation) no gradient leaves are made.
        """
        self._validate_paths(paths)
        paths = paths.to(self.device)
        batch = paths.shape[0]
        if use_generic is not None:
            if not isinstance(use_generic, Tensor) or use_generic.dtype != torch.bool or use_generic.shape != (batch,):
                if isinstance(use_generic, Tensor):
                    got = f"{use_generic.dtype} {tuple(use_generic.shape)}"
                else:
                    got = type(use_generic).__name__
                raise ValueError(f"use_generic must be a bool tensor of shape [{batch}], got {got}")
            use_generic = use_generic.to(self.device)
            if not bool(use_generic.any()):
                use_generic = None
        if use_generic is not None and not self.has_generic:
            raise ValueError("use_generic asks for the generic memory, but this bank was built with generic=False")

        own = torch.arange(batch, device=self.device) if use_generic is None else (~use_generic).nonzero().flatten()
        parts, touched = [], {}
        with torch.no_grad():
            for i, m in enumerate(self.units):
                if m == 0:
                    continue
                name = f"level{i}"
                index = torch.zeros(batch, dtype=torch.int64, device=self.device)
                rows = None
                if own.numel():
                    ids, inverse = torch.unique(paths[own, i], return_inverse=True)
                    rows = self._weight[name].index_select(0, ids).requires_grad_(requires_grad)
                    index[own] = inverse
                    touched[name] = ids
                    if use_generic is not None:
                        index[use_generic] = ids.numel()  # one past the rows = the generic slice
                parts.append(_Part(name, m, self._offsets[i], rows, index))
            generic_row = None
            if use_generic is not None:
                generic_row = self._weight[GENERIC].clone().requires_grad_(requires_grad)
                touched[GENERIC] = torch.zeros(1, dtype=torch.int64, device=self.device)
        return FetchedMemory(self, parts, generic_row, touched, batch, self.units_total, self.n_layers, requires_grad)

    # ---- gradients ---------------------------------------------------------

    def accumulate_grads(self, fetched: FetchedMemory) -> None:
        """Move the fetched rows' .grad into the pending per-table buffers (after backward)."""
        if not isinstance(fetched, FetchedMemory) or fetched._owner is not self:
            raise ValueError("accumulate_grads needs a FetchedMemory returned by this bank's fetch()")
        if not fetched.requires_grad:
            raise ValueError("this FetchedMemory was fetched with requires_grad=False; it has no gradients")
        if fetched.accumulated:
            raise ValueError("this FetchedMemory's gradients were already accumulated (would count them twice)")
        for name, leaf in fetched._leaves.items():
            if leaf.grad is None:
                continue
            self._pending.setdefault(name, []).append((fetched.touched[name], leaf.grad.detach().float()))
            leaf.grad = None  # the pending buffer owns it now; free the leaf's copy
        fetched.accumulated = True

    def _pending_coalesced(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Sum duplicated rows across micro-batches: table -> (unique ids, grads)."""
        out = {}
        for name, chunks in self._pending.items():
            if len(chunks) > 1:
                ids = torch.cat([c[0] for c in chunks])
                grads = torch.cat([c[1] for c in chunks])
                uniq, inverse = torch.unique(ids, return_inverse=True)
                summed = torch.zeros((uniq.numel(), *grads.shape[1:]), dtype=grads.dtype, device=grads.device)
                summed.index_add_(0, inverse, grads)
                self._pending[name] = [(uniq, summed)]
            out[name] = self._pending[name][0]
        return out

    def pending_grad_norm(self) -> Tensor:
        """L2 norm over all pending row gradients (after coalescing), fp32 scalar."""
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for _, grads in self._pending_coalesced().values():
            total += grads.pow(2).sum()
        return total.sqrt()

    def scale_pending_grads(self, factor: float) -> None:
        """Multiply every pending gradient by `factor` (global clipping with the anchor)."""
        factor = float(factor)
        if not math.isfinite(factor):
            raise ValueError(f"factor must be finite, got {factor}")
        for _, grads in self._pending_coalesced().values():
            grads.mul_(factor)

    def zero_pending(self) -> None:
        self._pending.clear()

    def step(self, lr: float | None = None) -> dict[str, int]:
        """Row-wise AdamW on rows with pending gradients; returns rows updated per table."""
        updated = {name: 0 for name in self._weight}
        for name, (ids, grads) in self._pending_coalesced().items():
            self.optimizer.update_(
                self._weight[name], self._exp_avg[name], self._exp_avg_sq[name], self._step[name], ids, grads, lr=lr
            )
            updated[name] = ids.numel()
        self.zero_pending()
        return updated

    # ---- checkpoint --------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        """Flat dict of the live tensors: "<table>.weight|exp_avg|exp_avg_sq|step".

        Pending gradients are not state: checkpoint between steps.
        """
        state = {}
        for name in self._weight:
            state[f"{name}.weight"] = self._weight[name]
            state[f"{name}.exp_avg"] = self._exp_avg[name]
            state[f"{name}.exp_avg_sq"] = self._exp_avg_sq[name]
            state[f"{name}.step"] = self._step[name]
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Strict in-place load; ValueError on missing/unexpected keys or a shape mismatch."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"memory bank state_dict mismatch: missing keys {missing}, unexpected keys {unexpected}")
        for key, dst in own.items():
            src = state[key]
            if not isinstance(src, Tensor):
                raise ValueError(f"state[{key!r}] must be a tensor, got {type(src).__name__}")
            if src.shape != dst.shape:
                raise ValueError(
                    f"state[{key!r}] has shape {tuple(src.shape)}, but this bank expects {tuple(dst.shape)}"
                )
        for key, dst in own.items():  # copy only after every key checked: no half-loaded bank
            src = state[key]
            if src is not dst:  # torch.distributed.checkpoint may already have loaded in place
                dst.copy_(src)
        self.zero_pending()

    def __repr__(self) -> str:
        return (
            f"MemoryBank(n_layers={self.n_layers}, d_model={self.d_model}, branching={self.branching}, "
            f"units={self.units}, generic={self.has_generic}, params={self.num_parameters():,}, "
            f"fetched={self.fetched_parameters():,})"
        )
