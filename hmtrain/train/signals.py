"""Stopping on a signal: SIGTERM/SIGINT (e.g. SLURM preemption) checkpoint at the end of the step.

Every rank must stop at the same step to write one checkpoint, so the ranks agree on it (one tiny
all-reduce per step). The command then exits 128 + the signal number, the shell's convention for
death by signal, which schedulers read as "requeue".
"""
from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hmtrain.memory.exchange import Comm

log = logging.getLogger(__name__)


class Interrupted(RuntimeError):
    """Training stopped early on a signal, after writing a checkpoint to resume from."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint {checkpoint}; "
                         "continue with --resume")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopRequest:
    """SIGTERM/SIGINT (e.g. SLURM preemption) ask for a checkpoint at the end of the step."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing at the end of this step, then stopping", signum)
        self.signum = signum

    def agreed(self, comm: Comm) -> Optional[int]:
        """The signal any rank got (ranks must stop at the same step to write one checkpoint)."""
        return int(comm.all_reduce_ints(np.array([self.signum or 0]), op=torch.distributed.ReduceOp.MAX)[0]) or None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
