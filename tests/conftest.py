"""Test-wide settings: one torch thread per process, and how tests share the cores under pytest-xdist.

The suite runs on 2 shared cores, often beside CLI subprocesses; torch's OpenMP threads
spin-wait when cores are oversubscribed, which slows small ops by orders of magnitude.
README's test command runs it on one xdist worker per core (`-n auto`); tests/cores.py runs one
`multiprocess` test at a time, and a launcher test (tests/launch) alone.
"""
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tests.cores import lock_dir, machine  # noqa: E402

torch.set_num_threads(1)
LOCKS = lock_dir()
LAUNCH = Path(__file__).parent / "launch"


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup, call and teardown under the machine lock (outside pytest-timeout's clock: waiting is not running)."""
    with machine(LOCKS, kind_of(item)):
        yield


def kind_of(item) -> str:
    """How a test shares the cores (tests/cores.py): launcher tests time jobs, so they run alone."""
    if item.path.is_relative_to(LAUNCH):
        return "alone"
    return "several" if item.get_closest_marker("multiprocess") is not None else "one"
