"""Stopping a run whose loss or gradient norm is no longer finite, before it checkpoints the damage.

The rule: after every step the loop notes on the device, without a host sync, the first step whose
loss (this rank's sum) or global gradient norm was inf or NaN. It reads the note where it syncs
anyway: at every logged step, and before every checkpoint (collective, so every rank stops at the same
step). A non-finite step stops the run there with exit 2, naming that step and the optimizers of its
phase; no checkpoint taken after it is written, so the latest checkpoint predates the damage and
`--resume` with a lower learning rate or a tighter `train.clip_grad` continues from it. Steps are
not skipped (OLMo-core's rule for spikes): by the time a step is known to be bad without a sync per
step, the optimizers have taken it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from hmtrain.memory.exchange import Comm

NONE = torch.iinfo(torch.int64).max  # no bad step yet


class Diverged(RuntimeError):
    """Training produced a non-finite loss or gradient norm; rerun unchanged, it would again."""

    input_error = True  # exit 2 (hmtrain/exits.py): the hyperparameters need changing
    every_rank_reports = True  # every rank raises it at the same step

    def __init__(self, step: int, stopped: int, keys: list[str], checkpoint: Optional[Path]):
        kept = f"the latest checkpoint, {checkpoint}, predates it" if checkpoint else "no checkpoint was written"
        lowers = " or ".join(f"{key}.lr" for key in keys)
        there = "there" if stopped == step else f"at step {stopped}"
        super().__init__(f"training diverged: the loss or the gradient norm was not finite (inf or nan) at step "
                         f"{step}; stopped {there} without checkpointing it ({kept}); lower {lowers} or "
                         "train.clip_grad")
        self.step = step


class DivergenceWatch:
    def __init__(self, device: torch.device):
        self.first = torch.full((), NONE, dtype=torch.int64, device=device)

    def note(self, step: int, loss_sum: Tensor, grad_norm: Tensor) -> None:
        """`step`: the step just taken, counted from 1 as metrics.jsonl counts. Device operations only."""
        bad = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        self.first = torch.where(bad & (self.first == NONE), step, self.first)

    def first_bad_step(self, comm: Comm) -> Optional[int]:
        """The first non-finite step on any rank, or None; a collective (and a host sync)."""
        first = self.first.to(comm.device).clone()
        comm.all_reduce_(first, op=torch.distributed.ReduceOp.MIN)
        step = int(first)
        return None if step == NONE else step
