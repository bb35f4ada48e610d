"""Share the machine's cores between pytest-xdist workers: a multi-process test runs alone.

Most of the suite is one process per test (a CLI subprocess, or in-process torch with one thread), so
two workers keep two cores busy. A `multiprocess` test (torchrun, SLURM, a killed rank) starts several
processes and some of them check that a job ends within a time; beside another worker's test it would
run slower and could time out. So every test holds a readers-writer lock on the machine while it runs,
fixtures and teardown included: a `multiprocess` test holds it exclusively, any other shares it.

The lock is two `flock`s, so a worker that dies releases what it held. A writer takes the gate and keeps
it while it waits for the readers to finish, and a reader takes the gate before its shared lock and
drops it after; so a waiting multi-process test stops new readers and cannot starve.

Without xdist (`PYTEST_XDIST_TESTRUNUID` unset) nothing is locked.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def lock_dir() -> Path | None:
    """The directory every worker of this pytest run shares its locks in; None outside xdist."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        return None
    path = Path(tempfile.gettempdir()) / f"hmtrain-pytest-{run}"
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def machine(directory: Path | None, exclusive: bool) -> Iterator[None]:
    """Hold the machine while the block runs: alone if `exclusive`, else beside other shared holders."""
    if directory is None:
        yield
        return
    with open(directory / "gate", "a+") as gate, open(directory / "cores", "a+") as cores:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(cores, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(cores, fcntl.LOCK_UN)
