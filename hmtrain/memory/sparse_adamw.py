"""Row-wise (lazy) AdamW: update only the rows that received a gradient.

A memory bank has millions of rows of which one step touches a few thousand,
so a dense optimizer would decay and move every row every step. Instead, as in
torchrec's row-wise optimizers, each row keeps its own step counter for the
bias correction and rows without a gradient are left exactly as they are
(weight and moments bit-identical). For a row that is touched every step this
is exactly torch.optim.AdamW: decoupled weight decay, then the Adam update.

A weight stored in bf16 keeps an fp32 master copy (`master`, as Megatron's and DeepSpeed's mixed
precision do): the update runs on the master and the weight is its rounding. Without it, rounding
every step back to bf16 (8 bits of mantissa) loses any change below half a unit in the last place:
at the memory phase's learning rates (1e-4 -> 1e-5) most updates and every weight decay vanish.

The bank updates all its tables in one pass (`sparse_adamw_tables_`): the arithmetic runs once over every
table's touched rows as torch._foreach_* ops, so a step's update kernels do not grow with the number of
tables, and a table whose touched rows are a run of consecutive ids (the generic row, a one-row touch, a
level every row of which is touched) is updated in place on views of its state, with no gather or scatter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Rows are updated in chunks of about this many elements so the fp32 copies of
# weight, moments and gradient stay small even for a level-0 row (one row of the
# paper's 160M bank holds 35 layers * 256 units * 1,536 parameters per unit = 13.8M values).
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class SparseAdamW:
    """AdamW hyper-parameters plus the row-wise update (see `sparse_adamw_`)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-3

    def __post_init__(self) -> None:
        _check_hparams(self.lr, self.betas, self.eps, self.weight_decay)

    def update_(
        self,
        weight: Tensor,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        step: Tensor,
        rows: Tensor,
        grads: Tensor,
        lr: float | None = None,
        validate: bool = True,
        master: Tensor | None = None,
    ) -> None:
        sparse_adamw_(
            weight, exp_avg, exp_avg_sq, step, rows, grads,
            lr=self.lr if lr is None else lr, betas=self.betas, eps=self.eps,
            weight_decay=self.weight_decay, validate=validate, master=master,
        )

    def update_tables_(self, tables: list[Rows], lr: float | None = None, validate: bool = True) -> int:
        """Every table's rows in one pass (see `sparse_adamw_tables_`); returns the number of passes."""
        return sparse_adamw_tables_(tables, lr=self.lr if lr is None else lr, betas=self.betas, eps=self.eps,
                                    weight_decay=self.weight_decay, validate=validate)


def _check_hparams(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")


def _check_shapes(
    weight: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, rows: Tensor, grads: Tensor,
    master: Tensor | None,
) -> None:
    fp32 = [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)] + ([("master", master)] if master is not None else [])
    for name, t in fp32:
        if t.shape != weight.shape or t.dtype != torch.float32:
            raise ValueError(
                f"{name} must be float32 of weight's shape {tuple(weight.shape)}, got {t.dtype} {tuple(t.shape)}"
            )
    if step.shape != weight.shape[:1]:
        raise ValueError(
            f"step must have one counter per row, shape {tuple(weight.shape[:1])}, got {tuple(step.shape)}"
        )
    if rows.ndim != 1 or rows.dtype != torch.int64:
        raise ValueError(f"rows must be a 1-d int64 tensor, got {rows.dtype} of shape {tuple(rows.shape)}")
    if grads.shape != (rows.shape[0], *weight.shape[1:]):
        raise ValueError(
            f"grads must have shape (len(rows), *weight.shape[1:]) = {(rows.shape[0], *weight.shape[1:])}, "
            f"got {tuple(grads.shape)}"
        )
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= weight.shape[0]):
        raise ValueError(f"rows must lie in [0, {weight.shape[0]}), got min {int(rows.min())} max {int(rows.max())}")
    # a duplicated row would be updated twice from stale moments: the caller must coalesce
    if torch.unique(rows).numel() != rows.numel():
        raise ValueError("rows must be unique (sum the gradients of duplicated rows first)")


@dataclass(frozen=True)
class Rows:
    """One table's rows for `sparse_adamw_tables_`: its state, which rows, their gradients.

    weight [N, ...] any float dtype; exp_avg, exp_avg_sq: fp32 like weight; step: [N] per-row update counts
    (int64); rows: unique int64 row ids (device); grads[r]: the gradient of weight[rows[r]]; master: None,
    or the fp32 master of a low-precision weight, which the update reads and writes. `run`: (first, stop)
    when the caller knows, on the host, that rows are exactly first, first + 1, ..., stop - 1: the update
    then works on views of the rows in place instead of gathering them and scattering them back.
    """

    weight: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: Tensor
    rows: Tensor
    grads: Tensor
    master: Tensor | None = None
    run: tuple[int, int] | None = None


@torch.no_grad()
def sparse_adamw_(
    weight: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    rows: Tensor,
    grads: Tensor,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    validate: bool = True,
    master: Tensor | None = None,
) -> None:
    """AdamW on `weight[rows]` in place, given `grads[r]` for `weight[rows[r]]` (one table; see `Rows`).
    The math runs in fp32 and is written back in weight's dtype. `validate=False` skips the row checks,
    which read device values back to the host: the bank's rows come from a step plan that was validated
    on the host already."""
    sparse_adamw_tables_([Rows(weight, exp_avg, exp_avg_sq, step, rows, grads, master)], lr=lr, betas=betas,
                         eps=eps, weight_decay=weight_decay, validate=validate)


@torch.no_grad()
def sparse_adamw_tables_(
    tables: list[Rows],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    validate: bool = True,
) -> int:
    """AdamW on every table's rows in place, in as few passes as the chunk size allows (one for a step
    of up to `_CHUNK_ELEMENTS` touched values, however many tables): each pass runs the update's
    arithmetic once over all its tables' rows (torch._foreach_*), so the kernels a step launches for it
    do not grow with the number of tables. Returns the number of passes.

    Bit-identical to updating each table alone: every value meets the same fp32 operations in the same
    order, and each table's bias corrections are computed from its own step counts, chunk by chunk as
    before (a float64 power over a longer vector may round differently)."""
    _check_hparams(lr, betas, eps, weight_decay)
    pieces = []
    for t in tables:
        if validate:
            _check_shapes(t.weight, t.exp_avg, t.exp_avg_sq, t.step, t.rows, t.grads, t.master)
        row_numel = max(1, math.prod(t.weight.shape[1:]))
        chunk = max(1, _CHUNK_ELEMENTS // row_numel)
        pieces += [(t, start, min(start + chunk, t.rows.numel()), row_numel)
                   for start in range(0, t.rows.numel(), chunk)]
    passes, batch, size = 0, [], 0
    for piece in pieces:  # greedy: pieces in order, each pass at most _CHUNK_ELEMENTS values (or one piece)
        numel = (piece[2] - piece[1]) * piece[3]
        if batch and size + numel > _CHUNK_ELEMENTS:
            _update_pass(batch, lr, betas, eps, weight_decay)
            passes, batch, size = passes + 1, [], 0
        batch.append(piece)
        size += numel
    if batch:
        _update_pass(batch, lr, betas, eps, weight_decay)
        passes += 1
    return passes


class _Piece:
    """Rows start:stop of one table, read for one pass: fp32 weight, moments and step counts, as views of the
    table (a run) or gathered copies, and how they go back."""

    def __init__(self, t: Rows, start: int, stop: int):
        self.table, self.gathered = t, t.run is None
        source = t.master if t.master is not None else t.weight
        if self.gathered:
            self.idx = t.rows[start:stop].to(t.weight.device)
            self.w = source.index_select(0, self.idx).float()
            self.m, self.v = t.exp_avg.index_select(0, self.idx), t.exp_avg_sq.index_select(0, self.idx)
            self.t = t.step.index_select(0, self.idx)
        else:
            first = t.run[0] + start
            self.views = [x.narrow(0, first, stop - start) for x in (t.weight, t.step)]
            self.w = source.narrow(0, first, stop - start).float()  # a view unless a bf16 weight has no master
            self.m, self.v = (x.narrow(0, first, stop - start) for x in (t.exp_avg, t.exp_avg_sq))
            self.t = self.views[1]
        self.g = t.grads[start:stop].to(device=t.weight.device, dtype=torch.float32)

    def write_back(self, steps: Tensor) -> None:
        t = self.table
        if self.gathered:
            t.weight.index_copy_(0, self.idx, self.w.to(t.weight.dtype))
            if t.master is not None:
                t.master.index_copy_(0, self.idx, self.w)
            t.exp_avg.index_copy_(0, self.idx, self.m)
            t.exp_avg_sq.index_copy_(0, self.idx, self.v)
            t.step.index_copy_(0, self.idx, steps.to(t.step.dtype))
            return
        weight, step = self.views
        if t.master is not None or t.weight.dtype != torch.float32:  # the stored rows: the fp32 ones rounded
            weight.copy_(self.w)
        step.copy_(steps)


def _update_pass(batch: list, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    beta1, beta2 = betas
    pieces = [_Piece(t, start, stop) for t, start, stop, _ in batch]
    ws, ms, vs, gs = ([getattr(p, f) for p in pieces] for f in "wmvg")
    steps = torch._foreach_add([p.t for p in pieces], 1)
    step_sizes, bc2_sqrts = [], []
    for p, t in zip(pieces, steps):
        # bias corrections differ per row (each row has its own step count); computed in float64 like
        # torch's python-float path, then broadcast
        bshape = (-1,) + (1,) * (p.w.ndim - 1)
        td = t.to(torch.float64)
        step_sizes.append((lr / (1.0 - beta1**td)).to(torch.float32).view(bshape))
        bc2_sqrts.append((1.0 - beta2**td).sqrt().to(torch.float32).view(bshape))

    torch._foreach_mul_(ws, 1.0 - lr * weight_decay)  # decoupled weight decay, as torch.optim.AdamW
    torch._foreach_lerp_(ms, gs, 1.0 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2_sqrts)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_mul(step_sizes, ms)
    torch._foreach_div_(update, denom)
    torch._foreach_sub_(ws, update)
    for p, t in zip(pieces, steps):
        p.write_back(t)
