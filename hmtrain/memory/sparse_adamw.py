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
    """AdamW on `weight[rows]` in place, given `grads[r]` for `weight[rows[r]]`.

    weight: [N, ...] any float dtype; exp_avg, exp_avg_sq: fp32 like weight;
    step: [N] per-row update counts (int64); rows: unique int64 row ids; master: None, or the
    fp32 master of a low-precision weight (like weight), which the update reads and writes.
    The math runs in fp32 and is written back in weight's dtype. `validate=False` skips
    the row checks, which read device values back to the host: the bank's rows come
    from a step plan that was validated on the host already.
    """
    _check_hparams(lr, betas, eps, weight_decay)
    if validate:
        _check_shapes(weight, exp_avg, exp_avg_sq, step, rows, grads, master)
    beta1, beta2 = betas
    rows = rows.to(weight.device)
    row_numel = max(1, math.prod(weight.shape[1:]))
    chunk = max(1, _CHUNK_ELEMENTS // row_numel)
    for start in range(0, rows.numel(), chunk):
        idx = rows[start : start + chunk]
        g = grads[start : start + chunk].to(device=weight.device, dtype=torch.float32)
        w = (master if master is not None else weight).index_select(0, idx).float()
        m = exp_avg.index_select(0, idx)
        v = exp_avg_sq.index_select(0, idx)
        t = step.index_select(0, idx) + 1

        w.mul_(1.0 - lr * weight_decay)  # decoupled weight decay, as torch.optim.AdamW
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        # bias corrections differ per row (each row has its own step count);
        # computed in float64 like torch's python-float path, then broadcast
        bshape = (-1,) + (1,) * (weight.ndim - 1)
        td = t.to(torch.float64)
        step_size = (lr / (1.0 - beta1**td)).to(torch.float32).view(bshape)
        bc2_sqrt = (1.0 - beta2**td).sqrt().to(torch.float32).view(bshape)
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        w.sub_(step_size * m / denom)

        weight.index_copy_(0, idx, w.to(weight.dtype))
        if master is not None:
            master.index_copy_(0, idx, w)
        exp_avg.index_copy_(0, idx, m)
        exp_avg_sq.index_copy_(0, idx, v)
        step.index_copy_(0, idx, t.to(step.dtype))
