"""Share the machine's cores between pytest-xdist workers: one multi-process test at a time, a launcher test alone.

Most of the suite is one process per test (a CLI subprocess, or in-process torch with one thread), so
two workers keep two cores busy. A `multiprocess` test (torchrun on gloo) starts several ranks that spend
part of their time waiting on each other, so one of them may run beside another worker's one-process
test, but two at once would oversubscribe the cores several times over. A launcher test (tests/launch:
torchrun or SLURM killed, signalled or timed out) checks that a job ends within a time, so it runs alone.

Three kinds, two locks held through setup, call and teardown:
  one       shares `cores`
  several   shares `cores` and holds `ranks` exclusively (one multi-process test at a time)
  alone     holds `cores` exclusively
The locks are `flock`s, so a worker that dies releases what it held. An exclusive holder of `cores` takes
the gate and keeps it while it waits for the sharers to finish, and a sharer takes the gate before its
shared lock and drops it after; so a waiting launcher test stops new sharers and cannot starve.

Without xdist (`PYTEST_XDIST_TESTRUNUID` unset) nothing is locked.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

KINDS = ("one", "several", "alone")


def lock_dir() -> Path | None:
    """The directory every worker of this pytest run shares its locks in; None outside xdist."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        return None
    path = Path(tempfile.gettempdir()) / f"hmtrain-pytest-{run}"
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def _cores(directory: Path, exclusive: bool) -> Iterator[None]:
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


@contextlib.contextmanager
def machine(directory: Path | None, kind: str) -> Iterator[None]:
    """Hold the machine as `kind` (one of KINDS) while the block runs."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if directory is None:
        yield
        return
    if kind != "several":
        with _cores(directory, exclusive=kind == "alone"):
            yield
        return
    with open(directory / "ranks", "a+") as ranks:
        fcntl.flock(ranks, fcntl.LOCK_EX)  # before `cores`: a waiting test holds no share of the cores
        try:
            with _cores(directory, exclusive=False):
                yield
        finally:
            fcntl.flock(ranks, fcntl.LOCK_UN)
