"""What the `hmtrain` command exits with: one meaning per code, so a scheduler can tell them apart.

    0      done
    1      an internal error: CUDA out of memory, a dead or unreachable rank (any distributed failure),
           any exception hmtrain did not expect; rerunning as is may succeed (or needs a fix in hmtrain)
    2      bad input: a config key, a file or directory, a checkpoint, an argument, a missing optional
           package; the one-line message names it, and rerunning unchanged fails again
    128+N  stopped by signal N (SIGTERM from a scheduler): requeue

An exception says itself which it is with an `input_error` attribute (True: 2, False: 1), as a
broken checkpoint, a locked run directory and a peer rank's failure in `data prepare` do; otherwise
its type decides. One that failed for the machine's sake (`environment = True`: a full disk) exits 1
with its own words, not as an "internal error".

An exception with `every_rank_reports = True` is one every rank of the job raised together (the ranks of
`data prepare` agree on a failure): each prints its line, then they meet at a barrier before leaving, because
torchrun stops the other ranks as soon as one exits and a slower rank's line would be lost.
"""
from __future__ import annotations

INTERNAL, BAD_INPUT = 1, 2

# OSErrors that name a path the user gave; the others (out of disk, I/O errors) are the environment's
INPUT_TYPES = (ValueError, ImportError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)


def exit_code(exc: BaseException) -> int:
    """The exit code for an exception that ended a command."""
    from hmtrain.train.signals import Interrupted  # torch comes with it: not for `hmtrain --help`

    if isinstance(exc, Interrupted):
        return 128 + exc.signum  # the shell convention for death by signal
    declared = getattr(exc, "input_error", None)
    if isinstance(declared, bool):
        return BAD_INPUT if declared else INTERNAL
    return BAD_INPUT if isinstance(exc, INPUT_TYPES) else INTERNAL


def one_line(exc: BaseException) -> str:
    """The message on one line; an unexpected exception also names its type, and an internal one says how to
    see more."""
    text = " ".join(str(exc).split())
    code = exit_code(exc)
    if code == BAD_INPUT or code > 128 or getattr(exc, "environment", False) is True:
        return text
    named = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"internal error: {named} (rerun with --debug for the traceback)"


def every_rank_reports(exc: BaseException) -> bool:
    return getattr(exc, "every_rank_reports", False) is True
