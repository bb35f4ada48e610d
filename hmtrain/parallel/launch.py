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
Under this launcher a rank does not print its one-line error itself: it writes it to torchrun's error
file (TORCHELASTIC_ERROR_FILE, see `report_to_launcher`), and the launcher prints the root cause's line,
then any other rank's line that says something else, then one line naming the root cause; no traceback.
So a bad config on 64 ranks is one error line, not 64 (plain torchrun still shows each rank's line).
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Mapping

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import parse_args, run

from hmtrain.parallel.supervisor import LAUNCHED

STOPPED = 128 + signal.SIGTERM
def reported_lines(root: int, failures: Mapping[int, ProcessFailure]) -> list[str]:
    """The ranks' own error lines, each different one once with the ranks that gave it, the root cause's first."""
    by_line: dict[tuple[str, str], list[int]] = {}
    for rank in (root, *sorted(failures)):
        reported = failures[rank].error_file_data.get("hmtrain")
        if reported and rank not in by_line.setdefault(tuple(reported), []):
            by_line[tuple(reported)].append(rank)
    lines = []
    for (who, text), ranks in by_line.items():
        which = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, sorted(ranks)))}"
        lines.append(f"{who} ({which}): {text}")
    return lines


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
    os.environ[LAUNCHED] = "1"  # the ranks inherit it
    try:
        run(args)
    except SignalException as exc:
        name = signal.Signals(exc.sigval).name
        print(f"torchrun: got {name}: the ranks were told to stop (they checkpoint first)", file=sys.stderr)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = root_cause(exc.failures)
        for line in reported_lines(rank, exc.failures):
            print(line, file=sys.stderr)
        others = sorted(r for r in exc.failures if r != rank)
        also = f"; ranks {others} stopped with it" if others else ""
        print(f"torchrun: rank {rank} ended the job ({describe(failure.exitcode)}){also}", file=sys.stderr)
        return exit_code(failure.exitcode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
