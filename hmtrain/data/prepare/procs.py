"""The processes of one `hmtrain data prepare`: one, or every rank of a torchrun (or srun) job.

Input files are dealt to ranks by number; rank 0 alone fits the tree, trains the tokenizer, plans
the pack units and writes the manifest, and the others read what it wrote after a barrier (the work
directory is on a filesystem every rank sees). Every stage ends with `Group.run`'s agreement: if
any rank failed, every rank raises, naming the rank and its error, instead of waiting at the next
barrier until the timeout.
"""
from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_input_error(exc: BaseException) -> bool:
    """An error that rerunning on the same inputs would repeat (bad input or settings), as opposed to
    the environment's (killed, out of disk, a lost peer): the work directory is worth keeping only
    for the latter."""
    if isinstance(exc, PeerFailed):
        return exc.input_error
    return isinstance(exc, (ValueError, FileNotFoundError, FileExistsError))


class PeerFailed(RuntimeError):
    """Another rank failed in this stage."""

    def __init__(self, message: str, input_error: bool):
        super().__init__(message)
        self.input_error = input_error


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun/SLURM?)") from None


class Group:
    """This process's rank among the prepare processes; a gloo group with a timeout when there are several."""

    def __init__(self, timeout_s: int):
        self.world = _env_int("WORLD_SIZE", 1)
        self.rank = _env_int("RANK", 0)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"RANK={self.rank} is outside WORLD_SIZE={self.world}")
        self._dist = None
        self.agreed_failure = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                # gloo whatever the device: prepare only exchanges a few small objects at stage ends
                dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
            self._dist = dist
            log.info("prepare rank %d of %d (gloo, timeout %ds)", self.rank, self.world, timeout_s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, items: Sequence[T]) -> list[T]:
        """This rank's share: items rank, rank + world, ..."""
        return list(items[self.rank :: self.world])

    def run(self, stage: str, fn: Callable[[], T]) -> T:
        """Run `fn` here, then agree with the other ranks: if any failed, every rank raises."""
        error: Exception | None = None
        result = None
        try:
            result = fn()
        except Exception as exc:  # KeyboardInterrupt and kills end the process: torchrun stops the rest
            error = exc
        if self._dist is not None:
            mine = None if error is None else (" ".join(str(error).split()), is_input_error(error))
            reports: list = [None] * self.world
            self._dist.all_gather_object(reports, mine)
            failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
            self.agreed_failure = bool(failed)
            if error is None and failed:
                rank, (message, input_error) = failed[0]
                error = PeerFailed(f"rank {rank} failed in {stage}: {message}", input_error)
            if failed:
                error.every_rank_reports = True  # the CLI prints its line, then meets the others (exits.py)
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    def barrier(self) -> None:
        if self._dist is not None:
            self._dist.barrier()

    def settle(self) -> None:
        """After a failure every rank agreed on: wait until all have cleaned up, so that they report
        their errors together (torchrun stops the others as soon as one exits)."""
        if self.agreed_failure:
            self.barrier()
