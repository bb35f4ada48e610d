"""Fault injection for reliability tests: a process kills itself at a named point of training.

    HMTRAIN_FAULT=POINT@STEP[:RANK]      e.g. async_save@6:1, phase_switch@4

The process with that global RANK (any rank when none is given) sends itself SIGKILL when it reaches
POINT at optimizer step STEP, so a test can crash a job exactly where a real failure hurts most:
- `async_save`: a background checkpoint of STEP has been handed to DCP's writer thread and is not complete;
- `phase_switch`: the memory phase is about to start at STEP (anchor moments reset, bank not yet touched).
Unset, `fault_point` costs one comparison (it reads the environment once).
"""
from __future__ import annotations

import os
import signal
from functools import lru_cache
from typing import Optional

POINTS = ("async_save", "phase_switch")


@lru_cache(maxsize=1)
def _spec() -> Optional[tuple[str, int, Optional[int]]]:
    text = os.environ.get("HMTRAIN_FAULT", "").strip()
    if not text:
        return None
    point, _, rest = text.partition("@")
    step, _, rank = rest.partition(":")
    if point not in POINTS or not step.isdigit() or (rank and not rank.isdigit()):
        raise ValueError(f"HMTRAIN_FAULT={text!r}: expected POINT@STEP[:RANK] with POINT one of {', '.join(POINTS)}")
    return point, int(step), int(rank) if rank else None


def fault_point(point: str, step: int) -> None:
    """SIGKILL this process if HMTRAIN_FAULT names `point` at `step` (and this rank)."""
    spec = _spec()
    if spec is None or spec[0] != point or spec[1] != step:
        return
    if spec[2] is not None and spec[2] != int(os.environ.get("RANK", "0")):
        return
    os.kill(os.getpid(), signal.SIGKILL)
