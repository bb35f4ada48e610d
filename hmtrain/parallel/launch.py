"""torchrun as the launchers run it: the same agent, with the shell's exit codes and one line per failure.

    python -m hmtrain.parallel.launch [torchrun's arguments] -m hmtrain.cli COMMAND ...

torchrun itself ends every failed job with 1 and a traceback of its own (a ChildFailedError table, or a
SignalException when it was signalled), and its "root cause" is the first failure it happened to record,
which can be a rank it stopped itself. A scheduler needs the code to mean something, and a user the rank
that failed. Here:
- torchrun signalled (SIGTERM from a scheduler or a user): 128 + the signal, like a process it killed;
- a rank failed: the root cause is a rank killed by a signal other than SIGTERM (the OOM killer, a crash,
  a user), else a rank that failed on its own (not stopped by torchrun's SIGTERM), and the job leaves with
  that rank's code (2 for bad input, 1 for an internal error, 128 + N for death by signal N);
- every rank stopped by SIGTERM (one rank was signalled, all agreed to checkpoint and stop): 143.
Each rank prints its own one-line error; this adds one line naming the root cause, and no traceback.
"""
from __future__ import annotations

import signal
import sys
from typing import Mapping

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import parse_args, run

STOPPED = 128 + signal.SIGTERM


def exit_code(exitcode: int) -> int:
    """A rank's exit as the shell writes it: death by signal N is 128 + N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def _blame(failure: ProcessFailure) -> int:
    """0: killed by a signal other than SIGTERM (a rank never does that to itself because a peer failed);
    1: a failed exit (it may be the cause, or a peer's failure reaching it); 2: stopped by SIGTERM."""
    if exit_code(failure.exitcode) == STOPPED:
        return 2
    return 0 if failure.exitcode < 0 else 1


def root_cause(failures: Mapping[int, ProcessFailure]) -> tuple[int, ProcessFailure]:
    """The most likely cause among the failed ranks (by `_blame`), the earliest recorded, then the lowest rank."""
    return min(failures.items(), key=lambda item: (_blame(item[1]), item[1].timestamp, item[0]))


def describe(exitcode: int) -> str:
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except SignalException as exc:
        name = signal.Signals(exc.sigval).name
        print(f"torchrun: got {name}: the ranks were told to stop (they checkpoint first)", file=sys.stderr)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = root_cause(exc.failures)
        others = sorted(r for r in exc.failures if r != rank)
        also = f"; ranks {others} stopped with it" if others else ""
        print(f"torchrun: rank {rank} ended the job ({describe(failure.exitcode)}){also}", file=sys.stderr)
        return exit_code(failure.exitcode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
